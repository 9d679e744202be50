r"""Redundant rows of ``A`` found and dropped without an SVD: a pivoted Cholesky of ``A A^T``.

A conservation law at every node of a connected network, or margins stacked
over several axes, has rows that are exact combinations of the others. The
Gaussian conditioning (:mod:`pyro_linconstr.ops.conditioning`) asks this
module for the independent rows before it falls back to the float64 SVD of
the dense ``A``:

* :func:`pivoted_cholesky` of the unit-diagonal gram ``D^{-1/2} A A^T D^{-1/2}``
  in float64 stops when every remaining pivot is at or below
  :func:`~pyro_linconstr.ops.numerics.redundant_pivot_tolerance`;
* :func:`row_reduction` checks each candidate's reconstruction from the kept
  rows on ``A`` itself (the gram squares the condition number) with the SVD's
  rank rule, and returns a :class:`RowReduction` (kept rows, and the map that
  checks ``b`` on the dropped ones) or ``None`` when the rows are merely
  ill-conditioned;
* :func:`select_rows` is the working operator ``A[kept]``.

The analysis depends on ``A`` alone, so an operator with an
``analysis_cache`` (a :class:`~pyro_linconstr.ops.sparse.SparseOperator`)
keeps it across calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyro_linconstr.ops.numerics import (
    RANK_RTOL,
    check_consistency,
    redundant_pivot_tolerance,
)
from pyro_linconstr.ops.operators import DenseOperator, LinearOperator

__all__ = ["RowReduction", "pivoted_cholesky", "row_reduction", "select_rows"]


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


def select_rows(A: LinearOperator, red: RowReduction) -> LinearOperator:
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
