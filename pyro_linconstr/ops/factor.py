"""Factorization of ``S = A Sigma A^T`` and the solves of Gaussian conditioning.

:class:`Conditioning` holds everything a :class:`ConstrainedGaussian` needs:
the Cholesky factor of ``S`` (or its diagonal, for a
:class:`~pyro_linconstr.GroupSum` with a diagonal ``Sigma``), and the products
``Sigma A^T u``. A covariance or an ``A`` shared across the batch is factored
once, never once per item.

Robustness: when the Cholesky factorization fails or shows a pivot below
``sqrt(eps)`` of its diagonal, or when ``m >= n``, ``A`` is re-expressed in
float64 through its SVD: redundant rows are dropped (after checking that ``b``
is consistent with them) and the kept rows are orthonormal, which removes
``cond(A)`` from the problem. Samples get one step of iterative refinement
with the residual of the *original* ``A`` evaluated in float64.
"""

from __future__ import annotations

import math

import torch

from pyro_linconstr.ops.operators import DenseOperator, LinearOperator

_LOG_2PI = math.log(2 * math.pi)


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


def check_rhs(A: LinearOperator, b: torch.Tensor, *, finite: bool = True) -> None:
    """Shape and finiteness checks shared by every constrained family."""
    if b.dim() < 1 or b.shape[-1] != A.num_rows:
        raise ValueError(
            f"constrain: b must have shape (..., m) with m = {A.num_rows} (the rows of A), "
            f"got shape {tuple(b.shape)}."
        )
    if finite:
        if not bool(torch.isfinite(b).all()):
            raise ValueError("constrain: b has non-finite entries (nan or inf).")
        if isinstance(A, DenseOperator) and not bool(torch.isfinite(A.matrix).all()):
            raise ValueError("constrain: A has non-finite entries (nan or inf).")


def constraint_batch_shape(
    A: LinearOperator, b: torch.Tensor, n: int, base_batch: torch.Size, event_shape: torch.Size
) -> torch.Size:
    """Check ``A`` and ``b`` against a base with ``n`` event entries; return the batch shape.

    Shared by every constrained family: ``A`` must have ``n`` columns, ``b`` its
    ``m`` rows (finite), and the leading dims of the base, ``A`` and ``b`` must
    broadcast.
    """
    if A.num_cols != n:
        raise ValueError(
            f"constrain: A has {A.num_cols} columns but the base's event "
            f"{tuple(event_shape)} has n = {n} entries; A must have shape (..., m, {n})."
        )
    check_rhs(A, b)
    try:
        return torch.broadcast_shapes(base_batch, A.batch_shape, b.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"constrain: batch shapes do not broadcast: base {tuple(base_batch)}, "
            f"A {tuple(A.batch_shape)}, b {tuple(b.shape[:-1])}."
        ) from None


def _cast_params(params: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in params.items()}


class Conditioning:
    """Factorized conditioning of a Gaussian ``(kind, params)`` on ``A x = b``.

    ``kind`` is ``"diag"`` (``params = {var, scale}``), ``"lowrank"``
    (``{factor, diag}``) or ``"full"`` (``{tril}``).
    """

    def __init__(self, kind: str, params: dict, A: LinearOperator, b: torch.Tensor, n: int):
        self.kind, self.params, self.n = kind, params, n
        self.dtype = b.dtype if b.is_floating_point() else torch.get_default_dtype()
        self.A_orig, self.b_orig = A, b
        self.A, self.b = A, b
        self.wd = self.dtype
        self.params_wd = params
        self.row_map = None  # maps residuals of the original A to the kept rows
        self.mask = None  # kept rows of a diagonal gram (empty groups dropped)
        self.gram_diag = None
        self.chol = None
        self._factor()

    # ---------------------------------------------------------------- factor
    def _factor(self) -> None:
        A = self.A
        if isinstance(A, DenseOperator) and A.num_rows >= self.n:
            self._orthonormalize()
            return
        S = self._gram(A, self.params)
        if A.diagonal_gram and self.kind == "diag":
            self.mask = S > 0  # an empty group has S_g = 0: its row is dropped
            all_kept = bool(self.mask.all())  # the only synchronization in the common case
            if not all_kept and bool(((self.b != 0) & ~self.mask).any()):
                raise ValueError(
                    "constrain: inconsistent b: a group with no entries has a nonzero "
                    "target sum; remove the empty group or set its b to 0."
                )
            if A.num_rows >= self.n and int(self.mask.sum(-1).min()) >= self.n:
                raise ValueError(
                    "constrain: m >= n after dropping empty groups: the constraint "
                    "determines x completely; there is nothing to sample."
                )
            if all_kept:
                self.mask = None
            self.gram_diag = S
            # Kalman gain weights s_i / S_g(i); a singleton group gets exactly 1.
            self.gain_weights = self.params["var"] * A.rmatvec(S.reciprocal())
            return
        chol, ok = _safe_cholesky(S)
        if ok:
            self.S, self.chol = S, chol
            return
        self._orthonormalize()

    def _gram(self, A: LinearOperator, params: dict) -> torch.Tensor:
        if self.kind == "diag":
            return A.weighted_gram(params["var"])
        if self.kind == "lowrank":
            G0 = A.weighted_gram(params["diag"])
            if A.diagonal_gram:
                G0 = torch.diag_embed(G0)
            P = A.matmul(params["factor"])
            self._P = P
            return G0 + P @ P.transpose(-1, -2)
        Q = A.matmul(params["tril"])
        self._Q = Q
        return Q @ Q.transpose(-1, -2)

    def _orthonormalize(self) -> None:
        """Replace ``(A, b)`` by an equivalent float64 system with orthonormal rows."""
        orig_eps = torch.finfo(self.dtype).eps
        A64 = self.A_orig.to_dense().to(torch.float64)
        b64 = self.b_orig.to(torch.float64)
        m, n = A64.shape[-2:]
        U, sv, Vh = torch.linalg.svd(A64, full_matrices=False)
        smax = sv[..., :1]
        ranks = (sv > 10 * orig_eps * smax).sum(-1)
        r = int(ranks.max())
        if int(ranks.min()) != r:
            raise ValueError(
                f"constrain: the rank of A differs across the batch ({int(ranks.min())} to {r}); "
                "redundant rows can only be dropped when every batch element has the same rank."
            )
        if r == 0:
            raise ValueError("constrain: A is zero (rank 0): there is no constraint to impose.")
        if r >= n:
            raise ValueError(
                f"constrain: m >= n after dropping redundant rows (rank of A is {r}, n = {n}): "
                "the constraint determines x completely; there is nothing to sample. "
                "Use fewer constraints than entries."
            )
        U_r, s_r, Vh_r = U[..., :r], sv[..., :r], Vh[..., :r, :]
        coef = (U_r.transpose(-1, -2) @ b64.unsqueeze(-1)).squeeze(-1)
        resid = b64 - (U_r @ coef.unsqueeze(-1)).squeeze(-1)
        b_eff = coef / s_r
        scale = b64.norm(dim=-1) + smax.squeeze(-1) * b_eff.norm(dim=-1)
        if bool((resid.norm(dim=-1) > 100 * math.sqrt(m) * orig_eps * scale).any()):
            worst = float((resid.norm(dim=-1) / scale.clamp_min(1e-300)).max())
            raise ValueError(
                f"constrain: inconsistent b: A x = b has no solution (rank of A is {r} < m = {m} "
                f"and b leaves the range of A, relative residual {worst:.3g}). "
                "Fix b, or drop the contradictory rows of A."
            )
        self.row_map = (U_r, s_r)
        self.A = DenseOperator(Vh_r)
        self.b = b_eff
        self.wd = torch.float64
        self.params_wd = _cast_params(self.params, torch.float64)
        S = self._gram(self.A, self.params_wd)
        chol, info = torch.linalg.cholesky_ex(S.detach())
        if bool((info != 0).any()):
            raise ValueError(
                "constrain: A Sigma A^T is singular even after orthonormalizing A in float64; "
                "the base variances span more than float64 can resolve. Rescale the problem."
            )
        self.S, self.chol = S, chol

    # --------------------------------------------------------------- algebra
    @property
    def rank(self) -> int:
        if self.mask is not None:
            return int(self.mask.sum(-1).max())
        return self.A.num_rows

    def _solve(self, r: torch.Tensor) -> torch.Tensor:
        if self.gram_diag is not None:
            if self.mask is None:
                return r / self.gram_diag
            return torch.where(self.mask, r / self.gram_diag.where(self.mask, 1.0), 0.0)
        return _SPDSolve.apply(self.S, r.unsqueeze(-1), self.chol).squeeze(-1)

    def _sigma_At(self, u: torch.Tensor) -> torch.Tensor:
        """``Sigma A^T u`` in the working dtype."""
        p = self.params_wd
        Atu = self.A.rmatvec(u)
        if self.kind == "diag":
            return p["var"] * Atu
        if self.kind == "lowrank":
            Ptu = self._P.transpose(-1, -2) @ u.unsqueeze(-1)
            return (p["factor"] @ Ptu).squeeze(-1) + p["diag"] * Atu
        Qtu = self._Q.transpose(-1, -2) @ u.unsqueeze(-1)
        return (p["tril"] @ Qtu).squeeze(-1)

    def _gain(self, r: torch.Tensor) -> torch.Tensor:
        """``Sigma A^T S^{-1} r`` in the working dtype."""
        if self.gram_diag is not None:
            return self.gain_weights * self.A.rmatvec(r)
        return self._sigma_At(self._solve(r))

    def _effective_residual(self, r: torch.Tensor) -> torch.Tensor:
        """Map a residual of the original rows to the kept (orthonormal) rows."""
        if self.row_map is None:
            return r
        U_r, s_r = self.row_map
        return (U_r.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1) / s_r

    def residual(self, loc: torch.Tensor) -> torch.Tensor:
        """``b - A loc`` over the kept rows, in the working dtype (differentiable)."""
        return self.b - self.A.matvec(loc.to(self.wd))

    def mean(self, loc: torch.Tensor, r_loc: torch.Tensor) -> torch.Tensor:
        """``loc + Sigma A^T S^{-1} (b - A loc)``, given ``r_loc = residual(loc)``."""
        return self._plus_gain(loc.to(self.wd), r_loc).to(self.dtype)

    def _plus_gain(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``y + Sigma A^T S^{-1} r`` in the working dtype (one fused op for a diagonal S)."""
        if self.gram_diag is not None:
            return torch.addcmul(y, self.gain_weights, self.A.rmatvec(r))
        return y + self._gain(r)

    def condition(self, y: torch.Tensor) -> torch.Tensor:
        """Map an unconstrained draw ``y ~ N(loc, Sigma)`` to the exact constrained sample.

        Matheron's update ``x = y + Sigma A^T S^{-1} (b - A y)``, then
        iterative refinement with the residual of the original ``A`` in
        float64: one step always, up to two more while a row exceeds
        ``2 sqrt(n) eps (|A||x| + |b|)`` (a diagonal ``S``, as for a
        :class:`GroupSum`, is solved elementwise and one step suffices). The
        refinement is applied in place without gradient (it is zero in exact
        arithmetic).
        """
        yw = y.to(self.wd)
        x = self._plus_gain(yw, self.b - self.A.matvec(yw)).to(self.dtype)
        with torch.no_grad():
            A64 = self.A_orig.to(torch.float64)
            b64 = self.b_orig.to(torch.float64)
            eps = torch.finfo(self.dtype).eps
            for step in range(1 if self.gram_diag is not None else 3):
                x64 = x.detach().to(torch.float64)
                r = b64 - A64.matvec(x64)
                if step > 0:
                    tol = 2 * math.sqrt(self.n) * eps * (A64.abs_matvec(x64) + b64.abs())
                    if bool((r.abs() <= tol).all()):
                        break
                # in place, outside autograd: x's graph is that of the Matheron update
                r_eff = self._effective_residual(r).to(self.wd)
                if self.gram_diag is not None and self.wd == self.dtype:
                    x.addcmul_(self.gain_weights, self.A.rmatvec(r_eff))
                else:
                    x.add_(self._gain(r_eff).to(self.dtype))
        return x

    def base_sample(self, loc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A reparametrized draw ``y ~ N(loc, Sigma)`` of shape ``shape + (n,)``."""
        if self.kind == "diag":
            eps = torch.randn(shape + (self.n,), dtype=self.dtype, device=self.b_orig.device)
            return torch.addcmul(loc, self.params["scale"], eps)
        return loc + self._base_noise(shape)

    def _base_noise(self, shape: torch.Size) -> torch.Tensor:
        p = self.params
        dev = self.b_orig.device
        if self.kind == "lowrank":
            r = p["factor"].shape[-1]
            e1 = torch.randn(shape + (r, 1), dtype=self.dtype, device=dev)
            e2 = torch.randn(shape + (self.n,), dtype=self.dtype, device=dev)
            return (p["factor"] @ e1).squeeze(-1) + p["diag"].sqrt() * e2
        eps = torch.randn(shape + (self.n, 1), dtype=self.dtype, device=dev)
        return (p["tril"] @ eps).squeeze(-1)

    def variance(self) -> torch.Tensor:
        p = self.params_wd
        if self.gram_diag is not None:
            return (p["var"] * (1 - self.gain_weights)).clamp_min(0).to(self.dtype)
        if self.kind == "diag":
            sigma_diag = p["var"]
            KT = self.A.to_dense().to(self.wd) * p["var"].unsqueeze(-2)
        elif self.kind == "lowrank" and self.A.diagonal_gram:
            return self._lowrank_group_variance().to(self.dtype)
        elif self.kind == "lowrank":
            sigma_diag = (p["factor"] ** 2).sum(-1) + p["diag"]
            KT = self._P @ p["factor"].transpose(-1, -2)
            KT = KT + self.A.to_dense().to(self.wd) * p["diag"].unsqueeze(-2)
        else:
            sigma_diag = (p["tril"] ** 2).sum(-1)
            KT = self._Q @ p["tril"].transpose(-1, -2)
        Z = _SPDSolve.apply(self.S, KT, self.chol)
        return (sigma_diag - (KT * Z).sum(-2)).clamp_min(0).to(self.dtype)

    def _lowrank_group_variance(self) -> torch.Tensor:
        """Conditional variances for ``Sigma = W W^T + diag(d)`` and a diagonal ``A diag(d) A^T``.

        With ``G = A diag(d) A^T`` (diagonal), ``P = A W`` and the capacitance
        ``C = I + P^T G^{-1} P`` (Woodbury): ``S^{-1} P = G^{-1} P C^{-1}``,
        ``P^T S^{-1} P = I - C^{-1}`` and
        ``diag(S^{-1}) = 1/G - rowsum((G^{-1} P L_C^{-T})^2)``; row ``i`` of
        ``K = Sigma A^T`` is ``P w_i + d_i e_g(i)``. Cost ``O(n r^2 + m r^2)``,
        no ``m x n`` matrix.
        """
        p = self.params_wd
        W, d, A, P = p["factor"], p["diag"], self.A, self._P
        r = W.shape[-1]
        g_inv = A.weighted_gram(d).reciprocal()  # (..., m)
        U = P * g_inv.unsqueeze(-1)  # G^{-1} P
        eye = torch.eye(r, dtype=W.dtype, device=W.device)
        C = eye + P.transpose(-1, -2) @ U
        L_C = torch.linalg.cholesky(C)
        C_inv = torch.cholesky_inverse(L_C)
        V = torch.linalg.solve_triangular(L_C, U.transpose(-1, -2), upper=False)  # (..., r, m)
        diag_s_inv = g_inv - (V**2).sum(-2)
        Q = U @ C_inv  # S^{-1} P, (..., m, r)
        M = eye - C_inv  # P^T S^{-1} P
        quad_w = ((W @ M) * W).sum(-1)
        cross = (W * A.rmatmul(Q)).sum(-1)
        quad = quad_w + 2 * d * cross + d**2 * A.rmatvec(diag_s_inv)
        return ((W**2).sum(-1) + d - quad).clamp_min(0)

    def gram_logdet(self) -> torch.Tensor:
        """``log det(A Sigma A^T)`` over the kept rows."""
        if self.gram_diag is not None:
            logs = self.gram_diag.log()
            if self.mask is not None:
                logs = logs.where(self.mask, 0.0)
            return logs.sum(-1).to(self.dtype)
        return _SPDLogdet.apply(self.S, self.chol).to(self.dtype)

    def constraint_logdet(self) -> torch.Tensor:
        """``log det(A A^T)`` over the kept rows (0 once orthonormalized)."""
        if not hasattr(self, "_constraint_logdet"):
            if self.row_map is not None:
                self._constraint_logdet = torch.zeros((), dtype=self.dtype)
            else:
                self._constraint_logdet = self.A.gram_logdet().to(self.dtype)
        return self._constraint_logdet

    def log_normalizer(self, r_loc: torch.Tensor) -> torch.Tensor:
        """``log N(b; A loc, S) + 1/2 log det(A A^T)`` from ``r_loc = b - A loc``.

        This is what ``log_prob`` subtracts from the base log-density.
        """
        quad = r_loc * self._solve(r_loc)
        out = -0.5 * quad.sum(-1) - 0.5 * self.rank * _LOG_2PI
        return out.to(self.dtype) - 0.5 * self.gram_logdet() + 0.5 * self.constraint_logdet()

    def expand(self, batch_shape: torch.Size) -> Conditioning:
        new = Conditioning.__new__(Conditioning)
        new.__dict__.update(self.__dict__)

        def ex(t, k):
            return t.expand(batch_shape + t.shape[t.dim() - k :]) if t is not None else None

        new.b_orig = ex(self.b_orig, 1)
        new.b = ex(self.b, 1)
        return new


def _safe_cholesky(S: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Cholesky factor of ``S`` and whether it is trustworthy.

    Untrustworthy: the factorization failed, or a pivot ``L_ii^2`` fell below
    ``sqrt(eps) * S_ii`` (a numerically redundant row, or an ill-conditioned
    ``A`` that is better handled by orthonormalizing it in float64).
    """
    chol, info = torch.linalg.cholesky_ex(S.detach())
    if bool((info != 0).any()):
        return chol, False
    piv = chol.diagonal(dim1=-2, dim2=-1) ** 2
    ratio = piv / S.detach().diagonal(dim1=-2, dim2=-1)
    tol = math.sqrt(torch.finfo(S.dtype).eps)
    return chol, not bool((ratio < tol).any())
