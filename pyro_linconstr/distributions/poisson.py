"""Independent Poisson counts conditioned on group sums: a product of multinomials."""

from __future__ import annotations

import math

import torch
from torch.distributions import Poisson, constraints
from torch.distributions.utils import lazy_property

from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.parsing import check_constraint, parse_base, should_validate
from pyro_linconstr.distributions.registry import register_constrain
from pyro_linconstr.ops.groups import (
    GroupLayout,
    _GroupSumSupport,
    check_totals,
    check_value,
    first_bad,
    log_factorial,
    multinomial_deviance,
    sample_grouped_multinomial,
    stirling_remainder,
)
from pyro_linconstr.ops.operators import LinearOperator, as_operator


class ConstrainedPoisson(ConstrainedDistribution):
    r"""Independent ``x_i ~ Poisson(rate_i)`` conditioned on disjoint group sums.

    For groups ``g`` (rows of ``A`` with disjoint 0/1 supports) with totals
    ``k_g = b_g`` and ``Lambda_g = sum_{i in g} rate_i``, the groups are
    independent and

    .. math::

        x_g \mid (\textstyle\sum_{i \in g} x_i = k_g)
        \sim \operatorname{Multinomial}(k_g, \lambda_g / \Lambda_g),

    so ``log p(x | A x = b) = sum_g [log k_g! - k_g log Lambda_g] +
    sum_i [x_i log rate_i - log x_i!]`` (entries in no row keep their Poisson
    law), :attr:`mean` is ``k_g rate_i / Lambda_g`` (differentiable in
    ``rate``) and :attr:`variance` is ``k_g p_i (1 - p_i)`` with
    ``p_i = rate_i / Lambda_g``. Sampling is exact and vectorised over groups,
    batch and sample shape with totals that differ per batch element (see
    :func:`~pyro_linconstr.ops.groups.sample_grouped_multinomial`).

    An ``A`` with no rows (shape ``(0, n)``) leaves the Poisson law unchanged,
    and an empty batch gives empty results. Results are in the base's dtype
    (``A`` and ``b`` follow it; ``b`` may be an integer tensor).

    **Accuracy** of :meth:`log_prob` (``eps`` the machine epsilon of the
    dtype; checked by the tests against mpmath and
    ``scipy.stats.multinomial``):

    * float32: totals up to ``2^24 = 16,777,216``, the largest up to which
      every count is exact (a larger total is a ``ValueError``: use a float64
      base). ``log k_g!``, ``log x_i!``, ``x_i log rate_i`` and
      ``k_g log Lambda_g`` are summed in float64 and the result is rounded
      once: absolute error ``<= eps * |log p| + 1e-6`` (the float64 sums add
      about ``eps_64 * sum_g 4 k_g log k_g``, ``< 3e-7`` at ``2^24``), e.g.
      ``1e-6`` at a total of ``1e7``, where summing in float32 (as torch's
      float32 ``Multinomial.log_prob`` does) is off by 10 or more;
    * float64: totals up to ``2^53``. Evaluated as
      ``sum_g s(k_g) - sum_i [s(x_i) + D(x_i, mu_i)]``, with the Stirling
      remainders ``s(x) = log x! - x log x + x`` and the deviances
      ``D(x, mu) = x log(x / mu) - x + mu`` of ``mu_i = k_g p_i``, terms that
      do not cancel: absolute error ``<= 8 eps (|log p| + sum_i |x_i - mu_i|
      + 20 n)``, about ``1e-10`` at totals of ``1e12`` (where summing
      ``lgamma`` terms, as ``scipy.stats.multinomial`` does, is off by ``1e-3``).

    :attr:`mean` (relative error ``<= 2 eps``) and :attr:`variance` (relative
    error ``<= 2 eps + eps_64 / (1 - p_i)``) are computed in float64 and rounded.

    Construct it with :func:`~pyro_linconstr.constrain` from
    ``Poisson(rate).to_event(k)`` and a :class:`~pyro_linconstr.GroupSum` or a
    dense ``A`` with disjoint 0/1 rows; any other ``A`` raises
    :class:`NotImplementedError`.

    :param base: ``Poisson(rate).to_event(k)``.
    :param A: a :class:`~pyro_linconstr.ops.LinearOperator` of the group-sum
        form (or a dense tensor).
    :param torch.Tensor b: non-negative integer totals ``(..., m)``.
    :param validate_args: check the rates (finite, ``>= 0``) and the values
        passed to :meth:`log_prob` (default: Pyro's global setting). Without
        validation, :meth:`log_prob` of a value off the support is ``-inf``.
    :raises ValueError: for non-integer, negative or (in float32) inexact
        totals, a positive total on a group whose rates are all zero (or that
        is empty), non-finite or negative rates (when validating), or bad shapes.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> base = dist.Poisson(torch.tensor([1.0, 2.0, 3.0, 4.0])).to_event(1)
        >>> A = plc.GroupSum(torch.tensor([0, 0, 1, 1]), num_groups=2)
        >>> d = plc.constrain(base, A, torch.tensor([3.0, 7.0]))
        >>> d.mean
        tensor([1., 2., 3., 4.])
        >>> x = d.sample((5,))
        >>> A.matvec(x)[0]
        tensor([3., 7.])

    **References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning
    Deep Generative Models under Hard Linear Equality Constraints", NeSy 2026
    (arXiv:2502.05416).
    """

    arg_constraints = {"rate": constraints.nonnegative, "b": constraints.nonnegative_integer}
    has_rsample = False

    def __init__(self, base, A: LinearOperator, b: torch.Tensor, validate_args=None) -> None:
        parsed = parse_base(base)
        if not isinstance(parsed.inner, Poisson):
            raise NotImplementedError(
                f"ConstrainedPoisson: the base must be Poisson(rate).to_event(k), got "
                f"{type(parsed.inner).__name__}."
            )
        rate, n, event_shape = parsed.flat(parsed.inner.rate), parsed.n, parsed.event_shape
        A = as_operator(A).to(parsed.dtype)
        batch_shape = check_constraint(parsed, A, b)
        layout = GroupLayout.from_operator(A, "Poisson")
        totals = check_totals(b, "Poisson", parsed.dtype)
        self._init_args = (base, A, b, validate_args)
        if should_validate(validate_args):
            if not bool((torch.isfinite(rate) & (rate >= 0)).all()):
                raise ValueError(
                    "constrain: the base's rate must be finite and >= 0; add a floor, e.g. "
                    "softplus(raw) + 1e-6."
                )
        self._n = n
        self._rate = rate.expand(batch_shape + (n,))
        self._totals = totals.expand(batch_shape + totals.shape[-1:])
        self._layout = layout
        self._A = A
        self._b = b.to(rate.dtype).expand(batch_shape + b.shape[-1:])
        super().__init__(batch_shape, event_shape, validate_args=validate_args)
        empty = (self._group_rate == 0) & (self._totals > 0)
        flags = torch.stack([empty.any(), (rate == 0).any()]).tolist()  # one sync
        self._has_zero_rate = flags[1]
        if flags[0]:
            g = first_bad(empty)
            raise ValueError(
                f"constrain: group {g} has total rate 0 (all its rates are 0, or it has no "
                f"entries) but b[..., {g}] = {int(self._totals[empty][0])} > 0: the total "
                "cannot be reached. Give the group a positive rate or set its total to 0."
            )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ConstrainedPoisson, _instance)
        batch_shape = torch.Size(batch_shape)
        new._init_args = self._init_args
        new._n = self._n
        new._rate = self._rate.expand(batch_shape + (self._n,))
        new._totals = self._totals.expand(batch_shape + self._totals.shape[-1:])
        new._layout = self._layout
        new._A = self._A
        new._b = self._b.expand(batch_shape + self._b.shape[-1:])
        new._has_zero_rate = self._has_zero_rate
        super(ConstrainedPoisson, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def rate(self) -> torch.Tensor:
        """The base's rates, flattened to ``batch_shape + (n,)``."""
        return self._rate

    @lazy_property
    def _group_rate(self) -> torch.Tensor:
        """``Lambda_g``, ``batch_shape + (m,)``, summed in float64."""
        return self._layout.group_sum(self._rate.to(torch.float64))

    @property
    def support(self):
        return _GroupSumSupport(self._layout, self._totals, self.event_shape)

    def _probs64(self) -> torch.Tensor:
        """``p_i = rate_i / Lambda_g`` in float64 (0 in a group of total rate 0)."""
        lam = self._group_rate
        inv = torch.where(lam > 0, 1 / torch.where(lam > 0, lam, torch.ones_like(lam)), 0.0)
        return self._rate.to(torch.float64) * self._layout.per_entry(inv)

    @lazy_property
    def mean(self) -> torch.Tensor:
        k = self._layout.per_entry(self._totals.to(torch.float64))
        mean = k * self._probs64()
        if not self._layout.all_covered:
            mean = torch.where(self._layout.covered, mean, self._rate.to(torch.float64))
        return self._unflat(mean.to(self._rate.dtype))

    @lazy_property
    def variance(self) -> torch.Tensor:
        k = self._layout.per_entry(self._totals.to(torch.float64))
        p = self._probs64()
        var = k * p * (1 - p)
        if not self._layout.all_covered:
            var = torch.where(self._layout.covered, var, self._rate.to(torch.float64))
        return self._unflat(var.to(self._rate.dtype))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            x = sample_grouped_multinomial(self._layout, self._rate, self._totals, sample_shape)
            x = x.expand(sample_shape + self.batch_shape + (self._n,))
            if not self._layout.all_covered:
                free = torch.poisson(self._rate.expand(x.shape).contiguous())
                x = torch.where(self._layout.covered, x, free)
        x = self._unflat(x)
        # our own, unmodified sample is on the support: log_prob skips re-validating it
        self.mark_valid(x)
        return x

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        check_value(value, self.batch_shape, self.event_shape, "ConstrainedPoisson")
        checked = self.is_marked_valid(value)
        if self._validate_args and not checked:
            self._validate_sample(value)
            checked = True
        f64 = torch.float64
        x = self._flat(value).to(f64)
        layout = self._layout
        if not checked:  # unvalidated values: off the support -> -inf, never an error
            ok = (x >= 0) & (x == x.round())
            x = torch.where(ok, x, torch.zeros((), dtype=f64, device=x.device))
        # every term in float64 (see "Accuracy" in the class docstring)
        rate = self._rate.to(f64)
        k = self._totals.to(f64)
        if self._rate.dtype == f64:
            lp = self._log_prob_deviance(x, rate, k)
        else:
            if self._has_zero_rate:
                lp = _xlogy(x, rate).sum(-1)
            else:
                lp = (x * rate.log()).sum(-1)
            lp = lp - log_factorial(x).sum(-1)
            const = (torch.lgamma(k + 1) - _xlogy(k, self._group_rate)).sum(-1)
            if not layout.all_covered:
                const = const - torch.where(layout.covered, 0.0, rate).sum(-1)
            lp = lp + const
        if not checked:
            ok = ok.all(-1) & (layout.group_sum(x) == k).all(-1)
            lp = torch.where(ok, lp, torch.full_like(lp, -math.inf))
        return lp.to(self._rate.dtype)

    def _log_prob_deviance(self, x: torch.Tensor, rate: torch.Tensor, k: torch.Tensor):
        """Float64 ``log_prob`` of values on the support as ``sum_g s(k_g) - sum_i [s(x_i)
        + D(x_i, mu_i)]`` (Stirling remainders and multinomial deviances, both small):
        free of the cancellation between ``log k_g!`` and ``sum_i log x_i!``."""
        layout = self._layout
        mu = self._layout.per_entry(k) * self._probs64()
        per_entry = stirling_remainder(x) + multinomial_deviance(x, mu)
        if not layout.all_covered:  # entries in no row: their Poisson log-pmf
            free_rate = torch.where(layout.covered, 1.0, rate)
            free = _xlogy(x, free_rate) - free_rate - log_factorial(x)
            per_entry = torch.where(layout.covered, per_entry, -free)
        return stirling_remainder(k).sum(-1) - per_entry.sum(-1)


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x log y`` (``0`` at ``x = 0``, ``-inf`` at ``x > 0 = y``) whose gradient in ``y``
    is ``0`` rather than ``torch.xlogy``'s ``nan`` where ``x = y = 0`` (there ``x log y``
    is ``0`` for every ``y``)."""
    pos = y > 0
    out = x * torch.where(pos, y, torch.ones_like(y)).log()
    return torch.where(pos | (x == 0), out, torch.full_like(out, -math.inf))


@register_constrain(Poisson)
def _constrain_poisson(base, A, b):
    return ConstrainedPoisson(base, A, b)
