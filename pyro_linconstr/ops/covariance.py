r"""Covariance structures of a Gaussian base: one small class per structure.

Each class owns the algebra that conditioning on ``A x = b`` needs from
``Sigma``, so that :class:`~pyro_linconstr.ops.conditioning.Conditioning` and
the Gaussian family never ask which structure they hold (the way
``torch.distributions`` keeps one class per covariance structure):

* :meth:`gram`: ``S = A Sigma A^T`` (its diagonal only where that is all there is);
* :meth:`cross`: ``Sigma A^T u``, and :meth:`cross_matrix`: ``A Sigma`` (for variances);
* :meth:`draw`: a reparametrized draw of ``N(loc, Sigma)``;
* :meth:`log_density`: ``log N(d; 0, Sigma)``; :meth:`logdet`: ``log det Sigma``;
* :meth:`diagonal`: ``diag(Sigma)``; :meth:`check`: the parameters are valid.

* :class:`DiagonalCovariance` ``diag(s)`` (``Normal(...).to_event(k)``): ``S``
  is diagonal when ``A`` has a diagonal gram (a :class:`~pyro_linconstr.GroupSum`).
* :class:`LowRankCovariance` ``W W^T + diag(d)`` (``LowRankMultivariateNormal``).
* :class:`DenseCovariance` ``L L^T`` (``MultivariateNormal``, via its Cholesky factor).

Parameters are kept unexpanded (a covariance shared by the batch is factored
once). A new structure is a new subclass with these seven methods.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from pyro_linconstr.ops.operators import LinearOperator

__all__ = ["Covariance", "DenseCovariance", "DiagonalCovariance", "LowRankCovariance"]

_LOG_2PI = math.log(2 * math.pi)


class Covariance:
    """Interface of a covariance structure ``Sigma`` over ``n`` entries (see the module)."""

    #: True when ``A Sigma A^T`` is diagonal for an operator with a diagonal gram.
    diagonal_gram_with = False

    n: int

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, dtype: torch.dtype) -> Covariance:
        raise NotImplementedError

    def gram(self, A: LinearOperator) -> torch.Tensor:
        """``A Sigma A^T``: ``(..., m)`` (its diagonal) when :meth:`has_diagonal_gram`,
        else ``(..., m, m)``."""
        raise NotImplementedError

    def has_diagonal_gram(self, A: LinearOperator) -> bool:
        """Whether :meth:`gram` returns the diagonal only."""
        return self.diagonal_gram_with and A.diagonal_gram

    def cross(self, A: LinearOperator, u: torch.Tensor) -> torch.Tensor:
        """``Sigma A^T u`` for ``u`` of shape ``(..., m)``; returns ``(..., n)``."""
        raise NotImplementedError

    def cross_matrix(self, A: LinearOperator) -> torch.Tensor:
        """``A Sigma``, shape ``(..., m, n)`` (the transpose of the Kalman numerator)."""
        raise NotImplementedError

    def draw(self, loc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A reparametrized draw of ``N(loc, Sigma)`` of shape ``shape + (n,)``."""
        raise NotImplementedError

    def log_density(self, d: torch.Tensor) -> torch.Tensor:
        """``log N(d; 0, Sigma)`` for ``d`` of shape ``(..., n)``."""
        raise NotImplementedError

    def logdet(self) -> torch.Tensor:
        """``log det Sigma``, shape: the parameters' batch shape."""
        raise NotImplementedError

    def diagonal(self) -> torch.Tensor:
        """``diag(Sigma)``, shape ``(..., n)``."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise a ``ValueError`` naming the parameter when it is non-finite or not positive."""
        raise NotImplementedError

    def conditional_log_density(
        self, cond, x: torch.Tensor, loc: torch.Tensor, mean
    ) -> torch.Tensor:
        """``log N(x - mean; 0, Sigma)``, the density of ``x`` on the subspace up to a constant.

        :param cond: the factored :class:`~pyro_linconstr.ops.conditioning.Conditioning`.
        :param x: values ``(..., n)`` on the subspace, in this covariance's dtype.
        :param loc: the base's mean.
        :param mean: a callable returning the conditional mean in ``x``'s dtype
            (a subclass may not need it).
        """
        return self.log_density(x - mean())

    def conditional_variance(self, cond) -> torch.Tensor:
        """``diag(Sigma - K S^{-1} K^T)`` with ``K = Sigma A^T``, for a factored
        :class:`~pyro_linconstr.ops.conditioning.Conditioning` ``cond`` of this
        covariance (generic: forms ``K``, ``m x n``). Subclasses override it where
        their structure allows less."""
        KT = self.cross_matrix(cond.A)
        Z = cond.solve_columns(KT)
        return (self.diagonal() - (KT * Z).sum(-2)).clamp_min(0)


def _fail(what: str, fix: str) -> None:
    raise ValueError(f"constrain: the base's {what}; {fix}")


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class _GroupQuad(torch.autograd.Function):
    """``sum_i s_i (t_i / s_i - ubar_g(i))^2`` with ``ubar = A t / S`` (``A`` a group sum).

    Backward (``sum_i s_i (u_i - ubar_g) = 0`` per group): ``d/dt_i = 2 (u_i - ubar_g)``
    and ``d/ds_i = -(u_i - ubar_g)(u_i + ubar_g)``.
    """

    @staticmethod
    def forward(ctx, t, s, A, S):
        u = t / s
        ubar = A.rmatvec(A.matvec(t) / S)
        diff = u - ubar
        ctx.save_for_backward(diff, u, ubar)
        ctx.shapes = t.shape, s.shape
        return (s * diff * diff).sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        diff, u, ubar = ctx.saved_tensors
        t_shape, s_shape = ctx.shapes
        g = g.unsqueeze(-1)
        grad_t = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_t = ((2 * g) * diff).sum_to_size(t_shape)
        if ctx.needs_input_grad[1]:
            grad_s = (-(g * diff) * (u + ubar)).sum_to_size(s_shape)
        return grad_t, grad_s, None, None


class DiagonalCovariance(Covariance):
    """``Sigma = diag(scale^2)``, from ``Normal(loc, scale).to_event(k)``.

    :param torch.Tensor scale: ``(..., n)`` standard deviations.
    """

    diagonal_gram_with = True

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale
        self.var = scale.square()
        self.n = scale.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def to(self, dtype: torch.dtype) -> DiagonalCovariance:
        return self if dtype == self.dtype else DiagonalCovariance(self.scale.to(dtype))

    def gram(self, A: LinearOperator) -> torch.Tensor:
        return A.weighted_gram(self.var)

    def cross(self, A: LinearOperator, u: torch.Tensor) -> torch.Tensor:
        return self.var * A.rmatvec(u)

    def cross_matrix(self, A: LinearOperator) -> torch.Tensor:
        return A.to_dense().to(self.dtype) * self.var.unsqueeze(-2)

    def draw(self, loc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        eps = torch.randn(shape + (self.n,), dtype=self.dtype, device=self.device)
        return torch.addcmul(loc, self.scale, eps)

    def log_density(self, d: torch.Tensor) -> torch.Tensor:
        z = d / self.scale
        return -0.5 * z.square().sum(-1) - self.scale.log().sum(-1) - 0.5 * self.n * _LOG_2PI

    def logdet(self) -> torch.Tensor:
        return 2 * self.scale.log().sum(-1)

    def diagonal(self) -> torch.Tensor:
        return self.var

    def conditional_log_density(
        self, cond, x: torch.Tensor, loc: torch.Tensor, mean
    ) -> torch.Tensor:
        r"""With a diagonal ``S`` (a :class:`~pyro_linconstr.GroupSum`), in one fused step.

        Per group, with ``t = x - loc``, ``u_i = t_i / s_i`` and
        ``ubar_g = sum_g t / S_g``, the quadratic form is the weighted variance
        ``(x - mean)^T Sigma^{-1} (x - mean) = sum_i s_i (u_i - ubar_g)^2`` (no
        cancellation), with the analytic gradients of :class:`_GroupQuad`.
        """
        if cond.gram_diag is None or cond.wd != self.dtype:
            return super().conditional_log_density(cond, x, loc, mean)
        quad = _GroupQuad.apply(x - loc, self.var, cond.A, cond.safe_gram_diag())
        return -0.5 * quad - self.scale.log().sum(-1) - 0.5 * self.n * _LOG_2PI

    def conditional_variance(self, cond) -> torch.Tensor:
        r"""With a diagonal ``S`` (a :class:`~pyro_linconstr.GroupSum`), ``O(n)``.

        With ``w_i = s_i / S_g`` the variance is ``s_i (1 - w_i)``; the entry
        (at most one per group) with ``w_i > 1/2`` gets
        ``s_i * (sum of the others) / S_g`` instead, which has no cancellation:
        relative error ``O(k eps)`` for a group of ``k`` entries, whatever the
        spread of the variances.

        With a full ``S`` and an operator whose ``diag(A^T M A)`` is cheap
        (:attr:`~pyro_linconstr.ops.LinearOperator.structured_quad_diag`, e.g.
        an :class:`~pyro_linconstr.AxisSums` over several axes):
        ``s - s^2 diag(A^T S^{-1} A)``, with ``S^{-1}`` (``m x m``) from the
        conditioning's Cholesky factor, differentiable through ``S``; no
        ``m x n`` matrix ``K`` is formed. The accuracy is that of the generic
        version (both subtract ``(K S^{-1} K^T)_ii <= s_i`` from ``s_i`` in
        the working dtype, float64 for a float32 problem).
        """
        if cond.gram_diag is None:
            A = cond.A
            if not A.structured_quad_diag:
                return super().conditional_variance(cond)
            s = self.var
            eye = torch.eye(A.num_rows, dtype=cond.S.dtype, device=cond.S.device)
            q = A.quad_diag(cond.solve_columns(eye))
            return (s - s * s * q).clamp_min(0)
        s, A = self.var, cond.A
        dominant = s > 0.5 * A.rmatvec(cond.gram_diag)
        others = A.matvec(torch.where(dominant, torch.zeros_like(s), s))
        w_others = A.rmatvec(others / cond.safe_gram_diag())
        return torch.where(dominant, s * w_others, s * (1 - cond.gain_weights))

    def check(self) -> None:
        if self.scale.numel() == 0:
            return
        # fast path: one reduction and one synchronization; the exact test only on failure
        with torch.no_grad():
            ok = bool((self.scale.min() > 0) & torch.isfinite(self.var.sum()))
        if ok or (bool((self.scale > 0).all()) and _finite(self.var)):
            return
        _fail(
            "scale must be finite and > 0 (non-positive or non-finite variances)",
            "use a positive parametrisation, e.g. a log-variance head exp(raw) or "
            "softplus(raw) + 1e-6.",
        )


class LowRankCovariance(Covariance):
    """``Sigma = W W^T + diag(d)``, from ``LowRankMultivariateNormal(loc, W, d)``.

    :param torch.Tensor factor: ``W``, ``(..., n, r)``.
    :param torch.Tensor diag: ``d``, ``(..., n)``, positive.
    """

    def __init__(self, factor: torch.Tensor, diag: torch.Tensor) -> None:
        self.factor, self.diag = factor, diag
        self.n = diag.shape[-1]
        self._products = None  # (A, A W) of the last operator seen

    @property
    def dtype(self) -> torch.dtype:
        return self.diag.dtype

    @property
    def device(self) -> torch.device:
        return self.diag.device

    def to(self, dtype: torch.dtype) -> LowRankCovariance:
        if dtype == self.dtype:
            return self
        return LowRankCovariance(self.factor.to(dtype), self.diag.to(dtype))

    def _AW(self, A: LinearOperator) -> torch.Tensor:
        if self._products is None or self._products[0] is not A:
            self._products = (A, A.matmul(self.factor))
        return self._products[1]

    def gram(self, A: LinearOperator) -> torch.Tensor:
        G0 = A.weighted_gram(self.diag)
        if A.diagonal_gram:
            G0 = torch.diag_embed(G0)
        P = self._AW(A)
        return G0 + P @ P.transpose(-1, -2)

    def cross(self, A: LinearOperator, u: torch.Tensor) -> torch.Tensor:
        Ptu = self._AW(A).transpose(-1, -2) @ u.unsqueeze(-1)
        return (self.factor @ Ptu).squeeze(-1) + self.diag * A.rmatvec(u)

    def cross_matrix(self, A: LinearOperator) -> torch.Tensor:
        KT = self._AW(A) @ self.factor.transpose(-1, -2)
        return KT + A.to_dense().to(self.dtype) * self.diag.unsqueeze(-2)

    def draw(self, loc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        r = self.factor.shape[-1]
        e1 = torch.randn(shape + (r, 1), dtype=self.dtype, device=self.device)
        e2 = torch.randn(shape + (self.n,), dtype=self.dtype, device=self.device)
        return loc + (self.factor @ e1).squeeze(-1) + self.diag.sqrt() * e2

    def _torch(self):
        zero = torch.zeros((), dtype=self.dtype, device=self.device).expand(self.diag.shape)
        return torch.distributions.LowRankMultivariateNormal(
            zero, self.factor, self.diag, validate_args=False
        )

    def log_density(self, d: torch.Tensor) -> torch.Tensor:
        return self._torch().log_prob(d)

    def logdet(self) -> torch.Tensor:
        return 2 * self._torch().entropy() - self.n * (1 + _LOG_2PI)

    def diagonal(self) -> torch.Tensor:
        return self.factor.square().sum(-1) + self.diag

    def conditional_variance(self, cond) -> torch.Tensor:
        """With a diagonal ``A diag(d) A^T`` (a :class:`~pyro_linconstr.GroupSum`), by Woodbury.

        With ``G = A diag(d) A^T`` (diagonal), ``P = A W`` and the capacitance
        ``C = I + P^T G^{-1} P``: ``S^{-1} P = G^{-1} P C^{-1}``,
        ``P^T S^{-1} P = I - C^{-1}`` and
        ``diag(S^{-1}) = 1/G - rowsum((G^{-1} P L_C^{-T})^2)``; row ``i`` of
        ``K = Sigma A^T`` is ``P w_i + d_i e_g(i)``. Cost ``O(n r^2 + m r^2)``,
        no ``m x n`` matrix.
        """
        A = cond.A
        if not A.diagonal_gram:
            return super().conditional_variance(cond)
        W, d, P = self.factor, self.diag, self._AW(A)
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

    def check(self) -> None:
        if not _finite(self.factor):
            _fail("cov_factor has non-finite entries (nan or inf)", "check the factor.")
        if not (_finite(self.diag) and bool((self.diag > 0).all())):
            _fail(
                "cov_diag must be finite and > 0 (non-positive or non-finite variances)",
                "use a positive parametrisation, e.g. exp(raw) or softplus(raw) + 1e-6.",
            )


class DenseCovariance(Covariance):
    """``Sigma = L L^T``, from ``MultivariateNormal`` (any parametrisation) via its Cholesky factor.

    :param torch.Tensor scale_tril: ``L``, ``(..., n, n)`` lower triangular with a
        positive diagonal.
    """

    def __init__(self, scale_tril: torch.Tensor) -> None:
        self.scale_tril = scale_tril
        self.n = scale_tril.shape[-1]
        self._products = None  # (A, A L) of the last operator seen

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_tril.dtype

    @property
    def device(self) -> torch.device:
        return self.scale_tril.device

    def to(self, dtype: torch.dtype) -> DenseCovariance:
        return self if dtype == self.dtype else DenseCovariance(self.scale_tril.to(dtype))

    def _AL(self, A: LinearOperator) -> torch.Tensor:
        if self._products is None or self._products[0] is not A:
            self._products = (A, A.matmul(self.scale_tril))
        return self._products[1]

    def gram(self, A: LinearOperator) -> torch.Tensor:
        Q = self._AL(A)
        return Q @ Q.transpose(-1, -2)

    def cross(self, A: LinearOperator, u: torch.Tensor) -> torch.Tensor:
        Qtu = self._AL(A).transpose(-1, -2) @ u.unsqueeze(-1)
        return (self.scale_tril @ Qtu).squeeze(-1)

    def cross_matrix(self, A: LinearOperator) -> torch.Tensor:
        return self._AL(A) @ self.scale_tril.transpose(-1, -2)

    def draw(self, loc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        eps = torch.randn(shape + (self.n, 1), dtype=self.dtype, device=self.device)
        return loc + (self.scale_tril @ eps).squeeze(-1)

    def log_density(self, d: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        mvn = torch.distributions.MultivariateNormal(
            zero.expand(self.scale_tril.shape[:-1]), scale_tril=self.scale_tril, validate_args=False
        )
        return mvn.log_prob(d)

    def logdet(self) -> torch.Tensor:
        return 2 * self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def diagonal(self) -> torch.Tensor:
        return self.scale_tril.square().sum(-1)

    def check(self) -> None:
        L = self.scale_tril
        if not _finite(L):
            _fail(
                "covariance (its Cholesky factor scale_tril) has non-finite entries (nan or inf)",
                "check covariance_matrix / scale_tril / precision_matrix.",
            )
        if not bool((L.diagonal(dim1=-2, dim2=-1) > 0).all()):
            _fail(
                "scale_tril has non-positive diagonal entries (not a positive-definite covariance)",
                "parametrise the diagonal positively, e.g. exp(raw).",
            )
