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

1. **Redundant rows** (:mod:`pyro_linconstr.ops.redundancy`): a conservation
   law at every node of a connected network always has one (the node balances
   sum to zero). A pivoted Cholesky of ``A A^T`` finds them, ``b`` is checked on
   them (a ``ValueError`` otherwise), and the working system becomes the row
   selection ``(A[kept], b[kept])`` in the caller's dtype; if its own
   ``A Sigma A^T`` is trusted, that is all.
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

import torch

from pyro_linconstr.ops.covariance import Covariance, DiagonalCovariance
from pyro_linconstr.ops.numerics import (
    check_empty_groups,
    svd_solve,
)
from pyro_linconstr.ops.operators import DenseOperator, LinearOperator
from pyro_linconstr.ops.redundancy import RowReduction, row_reduction, select_rows

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
        A_k = select_rows(self.A_orig, red)
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


__all__ = ["Conditioning", "DiagonalCovariance", "trusted_condition"]
