"""Gaussian distributions conditioned on ``A x = b``."""

from __future__ import annotations

import math

import torch
from torch.distributions import (
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    constraints,
)
from torch.distributions.utils import lazy_property

from pyro_linconstr.constraints import affine_subspace
from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.parsing import (
    ParsedBase,
    check_constraint,
    parse_base,
    should_validate,
)
from pyro_linconstr.distributions.registry import register_constrain
from pyro_linconstr.ops.conditioning import Conditioning
from pyro_linconstr.ops.covariance import (
    Covariance,
    DenseCovariance,
    DiagonalCovariance,
    LowRankCovariance,
)
from pyro_linconstr.ops.operators import LinearOperator, as_operator

_LOG_2PI = math.log(2 * math.pi)


class ConstrainedGaussian(ConstrainedDistribution):
    r"""A Gaussian ``N(loc, Sigma)`` conditioned on the linear law ``A x = b``.

    With ``K = Sigma A^T`` and ``S = A Sigma A^T``:

    * mean ``loc + K S^{-1} (b - A loc)``, covariance ``Sigma - K S^{-1} K^T``
      (rank ``n - m``); :attr:`mean` and :attr:`variance` are its marginals;
    * exact sample (Matheron's rule): ``y ~ N(loc, Sigma)``,
      ``x = y + K S^{-1} (b - A y)``, followed by iterative refinement with
      the residual computed in float64;
    * density on the subspace w.r.t. its ``(n - m)``-dimensional surface
      measure: ``log N(x; loc, Sigma) - log N(b; A loc, S) - 1/2 log det(A A^T)``,
      evaluated as ``log N(x - mean; 0, Sigma) + 1/2 log det S + (m/2) log 2 pi
      - 1/2 log det(A A^T)`` (equal on the subspace, and free of the
      cancellation between two large quadratic forms when ``b`` is far from
      ``A loc``).

    ``Sigma`` is diagonal (``Normal(...).to_event(k)``), low-rank plus diagonal
    (``LowRankMultivariateNormal``) or full (``MultivariateNormal``), each a
    :class:`~pyro_linconstr.ops.covariance.Covariance`; ``to_event`` of a
    vector family gives a block-diagonal ``Sigma`` over the flattened event.
    The first two never form an ``n x n`` matrix, and a
    :class:`~pyro_linconstr.GroupSum` with a diagonal ``Sigma`` costs ``O(n)``.
    Redundant rows of a consistent ``A`` are dropped (the distribution does not
    change); zero rows leave the base law unchanged.

    **Accuracy** (``eps`` the machine epsilon of the dtype, ``c = 8 sqrt(n)``),
    checked by the tests in float32 and float64 for condition numbers of
    ``A`` up to ``1e5`` and variances spanning ``1e-6`` to ``1e6``:

    * samples: ``|A x - b| <= c * eps * (|A| |x| + |b|)`` row by row;
    * :attr:`variance` ``v_i``: with a :class:`~pyro_linconstr.GroupSum` and a
      diagonal ``Sigma``, relative error ``<= c * eps`` whatever the spread of
      the variances; otherwise absolute error
      ``<= c * (eps * v_i + kappa * eps_64 * Sigma_ii)``, computed in float64,
      with ``kappa = trusted_condition(float64)`` (about 1.6e5, see
      :mod:`~pyro_linconstr.ops.conditioning`);
    * :meth:`log_prob`: absolute error ``<= c * eps * (n + delta^2)`` in
      float32 and ``<= c * kappa * eps * (n + delta^2)`` in float64, where
      ``delta = ||mean - loc||_Sigma`` says how far ``b`` is from ``A loc``
      in standard deviations (the mean itself is rounded to ``dtype``).

    These bounds do not depend on the scale of the rows of ``A``: a dense or
    sparse ``A`` is equilibrated first (each row, and its entry of ``b``,
    multiplied by the power of two that brings its largest entry into
    ``[1, 2)``; the subspace and every quantity above are unchanged, and
    powers of two scale without rounding). Rows with entries of ``1e19`` in
    float32 (or ``1e160`` in float64) made ``A Sigma A^T`` overflow, and the
    mean ignored ``b``.

    Construct it with :func:`~pyro_linconstr.constrain`.

    :param base: the unconstrained Gaussian.
    :param A: a :class:`~pyro_linconstr.ops.LinearOperator`.
    :param torch.Tensor b: right-hand side ``(..., m)``.
    :param validate_args: check the parameters and the values passed to
        :meth:`log_prob` (default: Pyro's global setting).

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> base = dist.MultivariateNormal(torch.zeros(3), torch.eye(3))
        >>> d = plc.constrain(base, torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([3.0]))
        >>> torch.allclose(d.mean, torch.ones(3))
        True
        >>> torch.allclose(d.variance, torch.full((3,), 2 / 3))
        True
        >>> d.sample((2,)).shape
        torch.Size([2, 3])
    """

    arg_constraints = {"loc": constraints.real, "b": constraints.real}
    has_rsample = True

    def __init__(self, base, A: LinearOperator, b: torch.Tensor, validate_args=None) -> None:
        parsed = parse_base(base)
        loc, cov = _gaussian_parts(parsed)
        A = as_operator(A).to(parsed.dtype)
        batch_shape = check_constraint(parsed, A, b)
        if should_validate(validate_args):
            # what arg_constraints declare, with messages that name the fix (one reduction
            # per tensor in the common case)
            if not bool(torch.isfinite(loc.sum())) and not bool(torch.isfinite(loc).all()):
                raise ValueError("constrain: the base's loc has non-finite entries (nan or inf).")
            cov.check()
        self._init_args = (base, A, b, validate_args)
        self._n = parsed.n
        self._loc = loc.expand(batch_shape + (parsed.n,))
        self._cov = cov
        self._A = A
        self._b = b.to(parsed.dtype).expand(batch_shape + b.shape[-1:])
        super().__init__(batch_shape, parsed.event_shape, validate_args=False)
        self._validate_args = should_validate(validate_args)
        # Factorize eagerly so that inconsistent or degenerate constraints fail here. The
        # conditioning works on equilibrated rows (the same subspace): A Sigma A^T of rows
        # with large entries would overflow, and give a mean that ignores b
        A_eq, row_scale = A.equilibrated()
        b_eq = self._b if row_scale is None else self._b * row_scale
        if self._validate_args and row_scale is not None and not bool(torch.isfinite(b_eq).all()):
            raise ValueError(
                f"constrain: b is too large for rows of A this small in {b_eq.dtype}: the "
                "solutions of A x = b lie beyond its range. Rescale x (its units), or "
                "work in float64."
            )
        self._cond = Conditioning(cov, A_eq, b_eq)

    # ------------------------------------------------------------------ shapes
    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ConstrainedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new._init_args = self._init_args
        new._n = self._n
        new._loc = self._loc.expand(batch_shape + (self._n,))
        new._cov = self._cov
        new._A = self._A
        new._b = self._b.expand(batch_shape + self._b.shape[-1:])
        new._cond = self._cond.expand(batch_shape)
        super(ConstrainedGaussian, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # ------------------------------------------------------------- properties
    @property
    def loc(self) -> torch.Tensor:
        """The base's mean, flattened to ``batch_shape + (n,)``."""
        return self._loc

    @property
    def covariance(self) -> Covariance:
        """The base's covariance, a :class:`~pyro_linconstr.ops.covariance.Covariance`."""
        return self._cov

    @lazy_property
    def support(self):
        return affine_subspace(self._A, self._b, self.event_shape)

    @lazy_property
    def _mean_w(self) -> torch.Tensor:
        """``E[x | A x = b]`` flattened, in the working dtype of the conditioning."""
        cond = self._cond
        return cond.plus_gain(self._loc.to(cond.wd), cond.residual(self._loc))

    @lazy_property
    def mean(self) -> torch.Tensor:
        return self._unflat(self._mean_w.to(self._loc.dtype))

    @lazy_property
    def variance(self) -> torch.Tensor:
        return self._unflat(self._cond.variance().expand(self.batch_shape + (self._n,)))

    @property
    def stddev(self) -> torch.Tensor:
        return self.variance.sqrt()

    # ---------------------------------------------------------------- sampling
    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        y = self._cov.draw(self._loc, shape)
        x = self._unflat(self._cond.condition(y))
        if self._validate_args:
            # our own, unmodified sample is on the support by construction: log_prob
            # skips re-validating it (the common case of a Pyro site scored after sampling)
            self.mark_valid(x)
        return x

    # ----------------------------------------------------------------- density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args and not self.is_marked_valid(value):
            self._validate_sample(value)
        x = self._flat(value).to(self._loc.dtype)
        dtype = self._loc.dtype

        def mean():  # in dtype, the difference x - mean taken in the working dtype
            return x - (x.to(self._mean_w.dtype) - self._mean_w).to(dtype)

        lp = self._cov.conditional_log_density(self._cond, x, self._loc, mean)
        return lp + self._cond.log_normalizer().to(dtype)

    def entropy(self) -> torch.Tensor:
        cond = self._cond
        dim = self._n - cond.rank
        out = (
            0.5 * dim * (1 + _LOG_2PI)
            + 0.5 * self._cov.logdet()
            + (-0.5 * cond.gram_logdet() + 0.5 * cond.constraint_logdet()).to(self._loc.dtype)
        )
        return out.expand(self.batch_shape)


# ---------------------------------------------------------------------------
def _block_diagonal(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Blocks ``(..., B_1, ..., B_k, p, q)`` -> block-diagonal ``(..., B p, B q)``.

    ``B = B_1 ... B_k`` blocks on the diagonal, in row-major order.
    """
    lead = blocks.shape[: blocks.dim() - 2 - k]
    p, q = blocks.shape[-2:]
    B = math.prod(blocks.shape[blocks.dim() - 2 - k : -2])
    flat = blocks.reshape(lead + (B, p, q))
    eye = torch.eye(B, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("...bij,bc->...bicj", flat, eye).reshape(lead + (B * p, B * q))


def _gaussian_parts(parsed: ParsedBase) -> tuple[torch.Tensor, Covariance]:
    """``(loc, covariance)`` of a Gaussian base, ``loc`` flattened to ``batch + (n,)``."""
    inner, k = parsed.inner, parsed.reinterpreted
    if isinstance(inner, Normal):
        return parsed.flat(inner.loc), DiagonalCovariance(parsed.flat(inner.scale))
    if not isinstance(inner, (MultivariateNormal, LowRankMultivariateNormal)):
        raise NotImplementedError(
            f"ConstrainedGaussian: the base must be Normal(...).to_event(k), "
            f"MultivariateNormal or LowRankMultivariateNormal, got {type(inner).__name__}."
        )
    loc = inner.loc.expand(inner.batch_shape + inner.event_shape)
    loc = loc.reshape(parsed.batch_shape + (parsed.n,))
    full = inner.batch_shape
    if isinstance(inner, LowRankMultivariateNormal):
        factor, diag = inner.cov_factor, inner.cov_diag
        if k:  # independent blocks: block-diagonal factor, flattened diagonal
            factor = _block_diagonal(factor.expand(full + factor.shape[-2:]), k)
            diag = diag.expand(full + diag.shape[-1:]).reshape(parsed.batch_shape + (parsed.n,))
        return loc, LowRankCovariance(factor, diag)
    tril = inner._unbroadcasted_scale_tril
    if k:
        tril = _block_diagonal(tril.expand(full + tril.shape[-2:]), k)
    return loc, DenseCovariance(tril)


@register_constrain(Normal)
@register_constrain(MultivariateNormal)
@register_constrain(LowRankMultivariateNormal)
def _constrain_gaussian(base, A, b):
    return ConstrainedGaussian(base, A, b)
