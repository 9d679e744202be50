r"""Gaussian conditioning on ``A x = b`` as plain linear algebra.

:class:`Conditioning` factors ``S = A Sigma A^T`` once for a
:class:`~pyro_linconstr.ops.covariance.Covariance` and offers the solves the
Gaussian family needs: the residual ``b - A y``, the Kalman gain
``Sigma A^T S^{-1} r``, Matheron's update of a draw, the conditional
marginal variances and the normalising constant of the density. It draws no
randomness and knows no distribution.

Robustness: when the Cholesky factorization fails, or its pivots show an
estimated condition number above :func:`trusted_condition` (a numerically
redundant row or an ill-conditioned ``A``), two repairs are tried in turn.

1. **Redundant rows** (:func:`row_reduction`): a conservation law at every node
   of a connected network always has one (the node balances sum to zero). A
   greedy, diagonal-pivoting Cholesky (:func:`pivoted_cholesky`) of the
   unit-diagonal gram ``D^{-1/2} A A^T D^{-1/2}`` in float64 stops when every
   remaining pivot is at or below
   :func:`~pyro_linconstr.ops.numerics.redundant_pivot_tolerance`; those rows
   are candidates. Each one's reconstruction ``A_d ~ T_d A_K`` from the kept
   rows is refined twice and checked on ``A`` itself (not on the gram, which
   squares the condition number): ``||A_d - T_d A_K||_1 <= RANK_RTOL sqrt(m) eps
   (||A_d||_1 + |T_d| ||A_K||_1)``, the SVD's rank rule. When they all pass, ``b``
   is checked on the dropped rows (``b_d = T_d b_K`` up to
   :func:`~pyro_linconstr.ops.numerics.check_consistency`, a ``ValueError``
   otherwise) and the working system becomes the row selection
   ``(A[kept], b[kept])`` in the caller's dtype, in pivot order; if its own
   ``A Sigma A^T`` is trusted, that is all. The analysis depends on ``A`` alone
   (``A A^T``, not ``A Sigma A^T``: redundancy is a property of the rows, and one
   analysis serves every ``Sigma`` of a batch), so it is kept in the operator's
   ``analysis_cache`` where it has one (a
   :class:`~pyro_linconstr.ops.sparse.SparseOperator`); later calls go straight
   to the kept rows. It costs an ``m x m`` gram and ``O(m^2 r)`` in blocks of
   BLAS-3 updates, with one host synchronisation per pivot, and never forms the
   ``m x n`` matrix.
2. **Ill-conditioning** (not merely redundancy), a batched ``A``, or
   ``m >= n`` for a dense ``A``: ``(A, b)`` is re-expressed in float64 through
   the SVD of the dense ``A`` (:func:`~pyro_linconstr.ops.numerics.svd_solve`):
   redundant rows are dropped (after checking that ``b`` is consistent) and the
   kept rows are orthonormal, which removes ``cond(A)`` from the problem.

Samples get iterative refinement with the residual of the *original* ``A``
evaluated in float64 (on a row selection, the dropped rows follow from the kept
ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyro_linconstr.ops.covariance import Covariance, DiagonalCovariance
from pyro_linconstr.ops.numerics import (
    RANK_RTOL,
    check_consistency,
    check_empty_groups,
    redundant_pivot_tolerance,
    svd_solve,
)
from pyro_linconstr.ops.operators import DenseOperator, LinearOperator

_LOG_2PI = math.log(2 * math.pi)


def trusted_condition(dtype: torch.dtype) -> float:
    """Largest estimated ``cond(A Sigma A^T)`` factored in ``dtype`` (``eps^(-1/3)``).

    Beyond it the conditional mean, and with it ``log_prob``, would lose more
    than about ``eps^(2/3)`` relative accuracy, so the system is
    orthonormalized in float64 instead (about 200 in float32, 1.6e5 in float64).
    """
    return torch.finfo(dtype).eps ** (-1 / 3)


class _SPDSolve(torch.autograd.Function):
    """``u = S^{-1} r`` from a precomputed Cholesky factor ``L`` of ``S``.

    Backward: ``grad_r = S^{-1} grad_u`` and ``grad_S = -grad_r u^T``, which
    costs ``O(m^2 k)``; differentiating through the Cholesky factorization
    instead would cost ``O(m^3)`` per batch element.
    """

    @staticmethod
    def forward(ctx, S, r, L):
        u = torch.cholesky_solve(r, L)
        ctx.save_for_backward(u, L)
        ctx.shapes = S.shape, r.shape
        return u

    @staticmethod
    def backward(ctx, grad_u):
        u, L = ctx.saved_tensors
        S_shape, r_shape = ctx.shapes
        grad_r = torch.cholesky_solve(grad_u, L)
        grad_S = None
        if ctx.needs_input_grad[0]:
            grad_S = -(grad_r @ u.transpose(-1, -2)).sum_to_size(S_shape)
        return grad_S, grad_r.sum_to_size(r_shape), None


class _SPDLogdet(torch.autograd.Function):
    """``log det S`` from its Cholesky factor; backward ``grad_S = g S^{-1}``."""

    @staticmethod
    def forward(ctx, S, L):
        ctx.save_for_backward(L)
        return 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def backward(ctx, grad):
        (L,) = ctx.saved_tensors
        return grad[..., None, None] * torch.cholesky_inverse(L), None


def _safe_cholesky(S: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Cholesky factor of ``S`` and whether it is trustworthy.

    Untrustworthy: the factorization failed, or a pivot ``L_ii^2`` fell below
    ``S_ii / trusted_condition`` (a numerically redundant row, or an
    ill-conditioned ``A`` that is better handled by orthonormalizing it in float64).
    """
    chol, info = torch.linalg.cholesky_ex(S.detach())
    if S.numel() == 0:
        return chol, True
    if bool((info != 0).any()):
        return chol, False
    piv = chol.diagonal(dim1=-2, dim2=-1) ** 2
    ratio = piv / S.detach().diagonal(dim1=-2, dim2=-1)
    return chol, not bool((ratio * trusted_condition(S.dtype) < 1).any())


class _GroupMatheron(torch.autograd.Function):
    r"""Matheron's update for a diagonal ``Sigma = diag(s)`` and a group sum, fused.

    ``x = y + s * (r / S)[g]`` with ``S = A s`` and ``r = b - A y`` (the gain
    ``s_i / S_g`` times the group's residual), then one step of refinement with
    the residual evaluated in float64 (no gradient). Backward, with
    ``G = A (g_x * s) / S``: ``grad_y = g_x - G[g]``,
    ``grad_s = (r / S)[g] * grad_y``, ``grad_b = G``: one segment sum and one
    gather, instead of the graph of a dozen ops. Under ``create_graph`` the
    backward rebuilds ``r`` and ``S`` from the inputs, so higher derivatives
    stay exact.
    """

    @staticmethod
    def forward(ctx, y, s, S, b, A, b64):
        q = A.rmatvec((b - A.matvec(y)) / S)  # (r / S)[g]
        x = torch.addcmul(y, s, q)
        r64 = b64 - A.matvec(x.to(torch.float64))
        x.addcmul_(s, A.rmatvec((r64 / S).to(x.dtype)))
        ctx.save_for_backward(y, s, S, b, q)
        ctx.A = A
        return x

    @staticmethod
    def backward(ctx, gx):
        y, s, S, b, q = ctx.saved_tensors
        A = ctx.A
        if torch.is_grad_enabled():  # create_graph: keep the dependence on the inputs
            S = A.matvec(s)
            S = S.where(S > 0, torch.ones_like(S))
            q = A.rmatvec((b - A.matvec(y)) / S)
        G = A.matvec(gx * s) / S  # = A (g_x * w): S is constant within a group
        grad_y = gx - A.rmatvec(G)
        grad_s = q * grad_y
        return (
            grad_y.sum_to_size(y.shape),
            grad_s.sum_to_size(s.shape),
            None,
            G.sum_to_size(b.shape),
            None,
            None,
        )


def _swap(u: torch.Tensor, v: torch.Tensor) -> None:
    """Swap two equally shaped views in place (plain copies: no indexing kernels)."""
    tmp = u.clone()
    u.copy_(v)
    v.copy_(tmp)


def pivoted_cholesky(
    C: torch.Tensor, tol: float, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy diagonal-pivoting Cholesky of a symmetric PSD ``m x m`` matrix (unbatched).

    At each step the row with the largest remaining pivot is swapped to the front
    of the trailing matrix and eliminated; the factorization stops when no
    remaining pivot exceeds ``tol``. As in LAPACK's ``pstrf``, the columns of a
    block of ``block`` pivots are computed left-looking (one matrix-vector
    product each) and the trailing matrix is updated once per block, a BLAS-3
    product in place.

    :returns: ``(order, L, rest)``: the ``r`` pivot rows in order, ``L`` of
        shape ``(m, r)`` (rows in the original order) with
        ``C[i, j] = (L L^T)[i, j]`` whenever ``i`` or ``j`` is a pivot row and
        ``L[order]`` lower triangular, and the rows never pivoted.
    """
    m = C.shape[-1]
    W = C.clone()  # trailing Schur complement in its lower-right block (both triangles)
    d = W.diagonal().clone()  # remaining pivots, updated at every step
    L = C.new_zeros(m, m)  # rows in pivot order
    perm = list(range(m))
    k = 0
    while k < m:
        k0, nb = k, min(block, m - k)
        Lb = C.new_zeros(nb, m)  # the block's columns of L, stored as rows
        stop = False
        for j in range(nb):
            k = k0 + j
            val, p = d[k:].max(0)
            val, p = float(val), int(p) + k
            if not val > tol:  # also stops on nan
                stop = True
                break
            if p != k:  # swap rows and columns k and p of what is still used
                _swap(W[k, k0:], W[p, k0:])
                _swap(W[k0:, k], W[k0:, p])
                _swap(d[k], d[p])
                _swap(Lb[:, k], Lb[:, p])
                _swap(L[k, :k0], L[p, :k0])
                perm[k], perm[p] = perm[p], perm[k]
            root = math.sqrt(val)
            # row k of the trailing matrix (symmetric: a contiguous read), updated by the block
            col = torch.addmv(W[k, k:], Lb[:j, k:].T, Lb[:j, k], alpha=-1.0).div_(root)
            col[0] = root
            Lb[j, k:] = col
            d[k:].addcmul_(col, col, value=-1.0)
        else:
            k = k0 + nb
        jb = k - k0
        L[k0:, k0:k] = Lb[:jb, k0:].T
        if stop or k >= m:
            break
        Lt = Lb[:jb, k:]
        W[k:, k:].addmm_(Lt.T, Lt, alpha=-1.0)
    perm_t = torch.tensor(perm, dtype=torch.long, device=C.device)
    L_orig = torch.empty(m, k, dtype=C.dtype, device=C.device)
    L_orig[perm_t] = L[:, :k]
    return perm_t[:k], L_orig, perm_t[k:]


@dataclass
class RowReduction:
    """The redundant rows of ``A`` and how the kept rows imply them.

    :ivar kept: ``(r,)`` kept rows, in pivot order.
    :ivar dropped: ``(k,)`` redundant rows.
    :ivar T: ``(k, r)`` float64, ``A[dropped] = T A[kept]`` (to the rank tolerance).
    :ivar logdet: float64 ``log det(A_K A_K^T)`` of the kept rows.
    """

    kept: torch.Tensor
    dropped: torch.Tensor
    T: torch.Tensor
    logdet: torch.Tensor
    m: int
    operators: dict = field(default_factory=dict)  # the kept rows' operator per dtype

    def check_consistent(self, b: torch.Tensor, eps: float, what: str) -> None:
        """``ValueError`` unless ``b[dropped] = T b[kept]`` (the rule of
        :func:`~pyro_linconstr.ops.numerics.check_consistency`, measured against
        ``|b_d| + |T_d| |b_K|``, the terms whose cancellation it tests)."""
        b64 = b.to(torch.float64)
        bK = b64.index_select(-1, self.kept.to(b.device))
        bD = b64.index_select(-1, self.dropped.to(b.device))
        T = self.T.to(b.device)
        resid = bD - bK @ T.T
        scale = bD.abs() + bK.abs() @ T.abs().T
        check_consistency(resid.norm(dim=-1), scale.norm(dim=-1), self.m, eps, what)


def row_reduction(A: LinearOperator, eps: float) -> RowReduction | None:
    """The redundant rows of an unbatched ``A`` (see the module), or ``None``.

    ``None``: no row is redundant, or a candidate fails the reconstruction
    test (an ill-conditioned, not a redundant, ``A``: the SVD decides). The
    result is cached in ``A.analysis_cache`` when the operator has one.

    :param float eps: the caller's machine epsilon (sets the tolerances).
    """
    cache = getattr(A, "analysis_cache", None)
    key = ("row_reduction", eps)
    if cache is not None and key in cache:
        return cache[key]
    red = _analyse_rows(A, eps)
    if cache is not None:
        cache[key] = red
    return red


def _analyse_rows(A: LinearOperator, eps: float) -> RowReduction | None:
    f64 = torch.float64
    m, n = A.num_rows, A.num_cols
    A64 = A.to(f64)
    ones = torch.ones(n, dtype=f64, device=A.device)
    G = A64.weighted_gram(ones)
    if A64.diagonal_gram:
        G = torch.diag_embed(G)
    diag = G.diagonal()
    zero = diag <= 0  # zero rows: always candidates (their b must be 0)
    sc = torch.where(zero, 1.0, diag).rsqrt()  # D^{-1/2}
    C = G * sc.unsqueeze(-1) * sc
    order, L, rest = pivoted_cholesky(C, redundant_pivot_tolerance(m, eps))
    if not rest.numel():
        return None
    LK, LD = L[order], L[rest]
    # scaled rows: hat A_D = T_C hat A_K with T_C = L_D L_K^{-1}; then unscale
    TC = torch.linalg.solve_triangular(LK, LD, upper=False, left=False)  # T_C L_K = L_D
    T = TC * sc[order] / sc[rest].unsqueeze(-1)
    row1 = A64.abs_matvec(ones)  # row 1-norms
    sK = sc[order]

    def solve_gram(v):  # G_KK^{-1} v for v (r, k), G_KK = D_K^{1/2} L_K L_K^T D_K^{1/2}
        return torch.cholesky_solve(v * sK.unsqueeze(-1), LK) * sK.unsqueeze(-1)

    for lo in range(0, rest.numel(), 256):  # bounded memory: (n, 256) at a time
        rows = rest[lo : lo + 256]
        Tc = T[lo : lo + 256]
        W = torch.zeros(m, rows.numel(), dtype=f64, device=A.device)
        W[rows, torch.arange(rows.numel(), device=A.device)] = 1.0
        for step in range(3):  # two refinements of T, then the test
            W[order] = -Tc.T
            R = A64.rmatmul(W)  # (n, k): A_d - T_d A_K
            if step == 2:
                break
            Tc = Tc + solve_gram(A64.matmul(R)[order]).T
        tol = RANK_RTOL * math.sqrt(m) * eps * (row1[rows] + Tc.abs() @ row1[order])
        if bool((R.abs().sum(0) > tol).any()):
            return None
        T[lo : lo + 256] = Tc
    logdet = diag[order].log().sum() + 2 * LK.diagonal().log().sum()
    return RowReduction(order, rest, T, logdet, m)


class _RowSelection(LinearOperator):
    """The rows ``rows`` of an operator (any kind), through its own products."""

    def __init__(self, base: LinearOperator, rows: torch.Tensor) -> None:
        self.base, self.rows = base, rows
        self.num_rows, self.num_cols = rows.numel(), base.num_cols
        self.structured_quad_diag = base.structured_quad_diag

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _scatter(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(y.shape)
        shape[dim] = self.base.num_rows
        return y.new_zeros(shape).index_copy(dim, self.rows.to(y.device), y)

    def matvec(self, x):
        return self.base.matvec(x).index_select(-1, self.rows.to(x.device))

    def rmatvec(self, y):
        return self.base.rmatvec(self._scatter(y, y.dim() - 1))

    def matmul(self, x):
        return self.base.matmul(x).index_select(-2, self.rows.to(x.device))

    def rmatmul(self, y):
        return self.base.rmatmul(self._scatter(y, y.dim() - 2))

    def abs_matvec(self, x):
        return self.base.abs_matvec(x).index_select(-1, self.rows.to(x.device))

    def weighted_gram(self, s):
        G = self.base.weighted_gram(s)
        if self.base.diagonal_gram:
            G = torch.diag_embed(G)
        rows = self.rows.to(s.device)
        return G.index_select(-2, rows).index_select(-1, rows)

    def quad_diag(self, M):
        return self.base.quad_diag(self._scatter(self._scatter(M, M.dim() - 1), M.dim() - 2))

    def gram_logdet(self):
        ones = torch.ones(self.num_cols, dtype=torch.float64, device=self.device)
        chol, _ = torch.linalg.cholesky_ex(self.to(torch.float64).weighted_gram(ones))
        return (2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)).to(self.dtype)

    def to_dense(self):
        return self.base.to_dense().index_select(-2, self.rows)

    def to(self, dtype):
        return self if dtype == self.dtype else _RowSelection(self.base.to(dtype), self.rows)


def _select_rows(A: LinearOperator, red: RowReduction) -> LinearOperator:
    """The kept rows as an operator of the same kind where there is one (kept with the
    reduction, so that a cached reduction also keeps its operator per dtype)."""
    if A.dtype not in red.operators:
        rows = red.kept.to(A.device)
        if hasattr(A, "select_rows"):  # a SparseOperator: sparse again, O(nnz) products
            out = A.select_rows(rows)
        elif isinstance(A, DenseOperator):
            out = DenseOperator(A.matrix.index_select(-2, rows))
        else:
            out = _RowSelection(A, rows)
        red.operators[A.dtype] = out
    return red.operators[A.dtype]


class Conditioning:
    """Factorized conditioning of ``N(., Sigma)`` on ``A x = b``.

    :param Covariance cov: ``Sigma``.
    :param A: the constraint operator, in ``b``'s dtype.
    :param torch.Tensor b: ``(..., m)``, already broadcast to the batch shape.

    Attributes after factoring: the *working* system ``(A, b)`` and
    covariance (the original ones, the kept rows ``kept`` after dropping
    redundant ones, or float64 orthonormal rows after
    :meth:`_orthonormalize`), and either ``gram_diag`` (a diagonal ``S``) or
    ``S`` with its Cholesky factor ``chol``.
    """

    def __init__(
        self, cov: Covariance, A: LinearOperator, b: torch.Tensor, eps: float | None = None
    ) -> None:
        self.n = A.num_cols
        self.dtype = b.dtype
        # the caller's machine epsilon, for the redundant-row decisions (a float32 problem
        # refactored in float64 for its variances keeps the float32 decisions)
        self.eps = torch.finfo(b.dtype).eps if eps is None else eps
        self.cov_orig, self.A_orig, self.b_orig = cov, A, b
        self.cov, self.A, self.b = cov, A, b
        self.wd = self.dtype
        self.row_map = None  # maps residuals of the original A to the kept rows
        self.kept = None  # kept rows of a row selection (redundant rows dropped)
        self.mask = None  # kept rows of a diagonal gram (empty groups dropped)
        self.gram_diag = None
        self.S = self.chol = None
        self._factor()
        # log det(A A^T) and the float64 A of the refinement now, not in rsample / log_prob:
        # for a dense A they are host-side cache lookups, kept out of traced code
        self.constraint_logdet()
        self.A64 = A.to(torch.float64)

    # ---------------------------------------------------------------- factor
    def _factor(self) -> None:
        A = self.A
        if isinstance(A, DenseOperator) and A.num_rows >= self.n:
            self._orthonormalize()
            return
        known = self._known_reduction()
        if known is not None:  # redundant rows found on an earlier call: go to the kept rows
            if not self._reduce(known):
                self._orthonormalize()
            return
        S = self.cov.gram(A)
        if self.cov.has_diagonal_gram(A):
            self._factor_diagonal(S)
            return
        chol, ok = _safe_cholesky(S)
        if ok:
            if A.num_rows >= self.n:  # full rank, m = n: nothing left to sample
                raise ValueError(
                    f"constrain: m >= n (A has {A.num_rows} independent rows and n = {self.n} "
                    "columns): the constraint determines x completely; there is nothing to "
                    "sample. Use fewer constraints than entries."
                )
            self.S, self.chol = S, chol
            return
        if self._reduce_rows():
            return
        self._orthonormalize()

    # ------------------------------------------------------- redundant rows
    def _known_reduction(self) -> RowReduction | None:
        cache = getattr(self.A_orig, "analysis_cache", None)
        if cache is None or self.cov.has_diagonal_gram(self.A_orig):
            return None
        return cache.get(("row_reduction", self.eps))

    def _reduce_rows(self) -> bool:
        """Drop exactly redundant rows (:func:`row_reduction`); False when that is not the
        problem (or the kept rows are still untrusted), so that the SVD decides."""
        A = self.A_orig
        if len(A.batch_shape) or A.num_rows == 0:
            return False
        red = row_reduction(A, self.eps)
        return red is not None and self._reduce(red)

    def _reduce(self, red: RowReduction) -> bool:
        red.check_consistent(self.b_orig, self.eps, "constrain")
        r = red.kept.numel()
        if r >= self.n:
            raise ValueError(
                f"constrain: m >= n after dropping redundant rows (rank of A is {r}, "
                f"n = {self.n}): the constraint determines x completely; there is nothing "
                "to sample. Use fewer constraints than entries."
            )
        A_k = _select_rows(self.A_orig, red)
        S = self.cov.gram(A_k)
        chol, ok = _safe_cholesky(S)
        if not ok:  # ill-conditioned on top of redundant: orthonormalize
            return False
        self.A, self.b = A_k, self.b_orig.index_select(-1, red.kept.to(self.b_orig.device))
        self.S, self.chol = S, chol
        self.kept = red.kept.to(self.b_orig.device)
        self._constraint_logdet = red.logdet.to(self.wd)
        return True

    def _factor_diagonal(self, S: torch.Tensor) -> None:
        empty = check_empty_groups(self.A.group_sizes(), self.b, "constrain")
        if bool(empty.any()):  # an empty group's row is dropped
            self.mask = ~empty
            self._rank = int(self.mask.sum())
        if self.rank >= self.n:
            raise ValueError(
                "constrain: m >= n after dropping empty groups: the constraint "
                "determines x completely; there is nothing to sample."
            )
        self.gram_diag = S

    @property
    def gain_weights(self) -> torch.Tensor:
        """Kalman gain weights ``s_i / S_g(i)`` of a diagonal ``S`` (a singleton group gets 1)."""
        if "_gain_weights" not in self.__dict__:
            self._gain_weights = self.cov.var * self.A.rmatvec(self.safe_gram_diag().reciprocal())
        return self._gain_weights

    def safe_gram_diag(self) -> torch.Tensor:
        """The diagonal ``S`` with dropped (empty) rows set to 1."""
        return self.gram_diag if self.mask is None else self.gram_diag.where(self.mask, 1.0)

    def _orthonormalize(self) -> None:
        """Replace ``(A, b)`` by an equivalent float64 system with orthonormal rows."""
        eps = torch.finfo(self.dtype).eps
        sol = svd_solve(self.A_orig.to_dense(), self.b_orig, eps, "constrain")
        r = sol.uniform_rank("constrain")
        if r >= self.n:
            raise ValueError(
                f"constrain: m >= n after dropping redundant rows (rank of A is {r}, "
                f"n = {self.n}): the constraint determines x completely; there is nothing "
                "to sample. Use fewer constraints than entries."
            )
        self.row_map = (sol.U[..., :r], sol.sv[..., :r])
        self.A = DenseOperator(sol.Vh[..., :r, :])
        self.b = sol.coef[..., :r]
        self.wd = torch.float64
        self.cov = self.cov_orig.to(torch.float64)
        S = self.cov.gram(self.A)
        chol, info = torch.linalg.cholesky_ex(S.detach())
        if bool((info != 0).any()):
            raise ValueError(
                "constrain: A Sigma A^T is singular even after orthonormalizing A in float64: "
                "the base's covariance is degenerate on the constrained rows, or its "
                "variances span more than float64 resolves. Rescale the problem."
            )
        self.S, self.chol = S, chol

    # --------------------------------------------------------------- algebra
    @property
    def rank(self) -> int:
        """The number of kept constraint rows."""
        if self.mask is not None:
            return self._rank
        return self.A.num_rows

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """``S^{-1} r`` over the kept rows (0 on dropped ones)."""
        if self.gram_diag is not None:
            if self.mask is None:
                return r / self.gram_diag
            return torch.where(self.mask, r / self.safe_gram_diag(), 0.0)
        return _SPDSolve.apply(self.S, r.unsqueeze(-1), self.chol).squeeze(-1)

    def residual(self, y: torch.Tensor) -> torch.Tensor:
        """``b - A y`` over the kept rows, in the working dtype (differentiable)."""
        return self.b - self.A.matvec(y.to(self.wd))

    def plus_gain(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``y + Sigma A^T S^{-1} r`` in the working dtype (one fused op for a diagonal S)."""
        if self.gram_diag is not None:
            return torch.addcmul(y, self.gain_weights, self.A.rmatvec(r))
        return y + self.cov.cross(self.A, self.solve(r))

    def condition(self, y: torch.Tensor) -> torch.Tensor:
        """Map a draw ``y ~ N(loc, Sigma)`` to the exact constrained sample, in ``dtype``.

        Matheron's update ``x = y + Sigma A^T S^{-1} (b - A y)``, then
        iterative refinement with the residual of the original ``A`` in
        float64, :attr:`refinement_steps` steps (a diagonal ``S`` is solved
        elementwise and one step suffices). The refinement is applied in place
        without gradient (it is zero in exact arithmetic); nothing here
        synchronises with the host.
        """
        if self.gram_diag is not None and self.wd == self.dtype:
            b64 = self.b_orig.to(torch.float64)
            return _GroupMatheron.apply(y, self.cov.var, self.safe_gram_diag(), self.b, self.A, b64)
        yw = y.to(self.wd)
        x = self.plus_gain(yw, self.residual(yw)).to(self.dtype)
        with torch.no_grad():
            A64 = self.A64
            b64 = self.b_orig.to(torch.float64)
            for _ in range(self.refinement_steps):
                r = b64 - A64.matvec(x.detach().to(torch.float64))
                # in place, outside autograd: x's graph is that of the Matheron update
                r_eff = self._effective_residual(r).to(self.wd)
                x.add_(self.cov.cross(self.A, self.solve(r_eff)).to(self.dtype))
        return x

    @property
    def refinement_steps(self) -> int:
        """Fixed number of refinement steps (no data-dependent stopping, no synchronisation).

        Each step contracts the error by about ``kappa * eps_w``, ``kappa`` the
        condition number of the working ``S``: at most :func:`trusted_condition`
        when ``S`` was factored directly (``<= 2.4e-5`` per step in float32,
        ``3.5e-11`` in float64), so two steps reach the rounding of ``x``; an
        orthonormalized system (working dtype float64, ``kappa`` up to the
        spread of the variances, ``1e12`` in the documented range, ``1e-4``
        per step) gets three.
        """
        return 3 if self.row_map is not None else 2

    def _effective_residual(self, r: torch.Tensor) -> torch.Tensor:
        """Map a residual of the original rows to the kept (orthonormal, or selected) rows."""
        if self.kept is not None:
            return r.index_select(-1, self.kept)
        if self.row_map is None:
            return r
        U_r, s_r = self.row_map
        return (U_r.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1) / s_r

    # ------------------------------------------------------------- variances
    def solve_columns(self, R: torch.Tensor) -> torch.Tensor:
        """``S^{-1} R`` for ``R`` of shape ``(..., m, k)`` (a full ``S``)."""
        return _SPDSolve.apply(self.S, R, self.chol)

    def variance(self) -> torch.Tensor:
        """Conditional marginal variances ``diag(Sigma - K S^{-1} K^T)``, in ``dtype``.

        The covariance structure computes them
        (:meth:`~pyro_linconstr.ops.covariance.Covariance.conditional_variance`).
        A diagonal ``S`` is handled exactly in the working dtype; otherwise a
        float32 problem is factored once more in float64 first, so that the
        subtraction ``Sigma_ii - (K S^{-1} K^T)_ii`` loses at most
        ``eps_64 * Sigma_ii``.
        """
        if self.gram_diag is None and self.wd != torch.float64:
            cond64 = Conditioning(
                self.cov_orig.to(torch.float64),
                self.A_orig.to(torch.float64),
                self.b_orig.to(torch.float64),
                eps=self.eps,
            )
            return cond64.variance().to(self.dtype)
        return self.cov.conditional_variance(self).to(self.dtype)

    # --------------------------------------------------------------- density
    def gram_logdet(self) -> torch.Tensor:
        """``log det(A Sigma A^T)`` over the kept rows."""
        if self.gram_diag is not None:
            logs = self.gram_diag.log()
            if self.mask is not None:
                logs = logs.where(self.mask, 0.0)
            return logs.sum(-1)
        return _SPDLogdet.apply(self.S, self.chol)

    def constraint_logdet(self) -> torch.Tensor:
        """``log det(A A^T)`` over the kept rows (0 once orthonormalized)."""
        if not hasattr(self, "_constraint_logdet"):
            if self.row_map is not None:
                self._constraint_logdet = torch.zeros((), dtype=self.wd)
            else:
                self._constraint_logdet = self.A.gram_logdet().to(self.wd)
        return self._constraint_logdet

    def log_normalizer(self) -> torch.Tensor:
        r"""``c`` with ``log p(x | A x = b) = log N(x - mean; 0, Sigma) + c`` on the subspace.

        ``c = 1/2 log det S + (m/2) log 2 pi - 1/2 log det(A A^T)``: for ``x``
        with ``A x = b``, ``(x - loc)^T Sigma^{-1} (x - loc) - r^T S^{-1} r``
        equals ``(x - mean)^T Sigma^{-1} (x - mean)`` (``r = b - A loc``), and
        the right-hand side has no cancellation when ``b`` is far from
        ``A loc``.
        """
        return (
            0.5 * self.gram_logdet() + 0.5 * self.rank * _LOG_2PI - 0.5 * self.constraint_logdet()
        )

    def expand(self, batch_shape: torch.Size) -> Conditioning:
        new = Conditioning.__new__(Conditioning)
        new.__dict__.update(self.__dict__)
        new.b_orig = self.b_orig.expand(batch_shape + self.b_orig.shape[-1:])
        new.b = self.b.expand(batch_shape + self.b.shape[-1:])
        return new


__all__ = [
    "Conditioning",
    "DiagonalCovariance",
    "RowReduction",
    "pivoted_cholesky",
    "row_reduction",
    "trusted_condition",
]
