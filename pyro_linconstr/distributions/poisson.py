"""Independent Poisson counts conditioned on group sums: a product of multinomials."""

from __future__ import annotations

import math

import torch
from torch.distributions import Poisson
from torch.distributions.utils import lazy_property

from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.parsing import check_constraint, parse_base, should_validate
from pyro_linconstr.distributions.registry import register_constrain
from pyro_linconstr.ops.groups import (
    GroupLayout,
    _GroupSumSupport,
    check_totals,
    first_bad,
    sample_grouped_multinomial,
)
from pyro_linconstr.ops.operators import LinearOperator


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

    Construct it with :func:`~pyro_linconstr.constrain` from
    ``Poisson(rate).to_event(k)`` and a :class:`~pyro_linconstr.GroupSum` or a
    dense ``A`` with disjoint 0/1 rows; any other ``A`` raises
    :class:`NotImplementedError`.

    :param base: ``Poisson(rate).to_event(k)``.
    :param A: a :class:`~pyro_linconstr.ops.LinearOperator` of the group-sum form.
    :param torch.Tensor b: non-negative integer totals ``(..., m)``.
    :raises ValueError: for non-integer or negative totals, a positive total on
        a group whose rates are all zero (or that is empty), or bad shapes.

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

    arg_constraints = {}
    has_rsample = False

    def __init__(self, base, A: LinearOperator, b: torch.Tensor, validate_args=None) -> None:
        parsed = parse_base(base)
        if not isinstance(parsed.inner, Poisson):
            raise NotImplementedError(
                f"ConstrainedPoisson: the base must be Poisson(rate).to_event(k), got "
                f"{type(parsed.inner).__name__}."
            )
        rate, n, event_shape = parsed.flat(parsed.inner.rate), parsed.n, parsed.event_shape
        A = A.to(parsed.dtype)
        batch_shape = check_constraint(parsed, A, b)
        layout = GroupLayout.from_operator(A, "Poisson")
        totals = check_totals(b, "Poisson")
        self._init_args = (base, A, b, validate_args)
        if should_validate(validate_args):
            if not bool(torch.isfinite(rate).all()) or bool((rate < 0).any()):
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
        if bool(empty.any()):
            g = first_bad(empty)
            raise ValueError(
                f"constrain: group {g} has total rate 0 (all its rates are 0, or it has no "
                f"entries) but b[..., {g}] = {int(self._totals[empty][0])} > 0: the total "
                "cannot be reached. Give the group a positive rate or set its total to 0."
            )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ConstrainedPoisson, _instance)
        batch_shape = torch.Size(batch_shape)
        new._n = self._n
        new._rate = self._rate.expand(batch_shape + (self._n,))
        new._totals = self._totals.expand(batch_shape + self._totals.shape[-1:])
        new._layout = self._layout
        new._A = self._A
        new._b = self._b.expand(batch_shape + self._b.shape[-1:])
        super(ConstrainedPoisson, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def rate(self) -> torch.Tensor:
        """The base's rates, flattened to ``batch_shape + (n,)``."""
        return self._rate

    @lazy_property
    def _group_rate(self) -> torch.Tensor:
        return self._layout.group_sum(self._rate)

    @property
    def support(self):
        return _GroupSumSupport(self._layout, self._totals, self.event_shape)

    @lazy_property
    def mean(self) -> torch.Tensor:
        k = self._totals.to(self._rate.dtype)
        lam = self._group_rate
        scale = torch.where(lam > 0, k / torch.where(lam > 0, lam, torch.ones_like(lam)), 0.0)
        mean = self._rate * _per_entry(self._layout, scale, fill=1.0)
        return self._unflat(mean)

    @lazy_property
    def variance(self) -> torch.Tensor:
        k = self._totals.to(self._rate.dtype)
        lam = self._group_rate
        inv = torch.where(lam > 0, 1 / torch.where(lam > 0, lam, torch.ones_like(lam)), 0.0)
        p = self._rate * _per_entry(self._layout, inv)
        var = _per_entry(self._layout, k) * p * (1 - p)
        if not self._layout.all_covered:
            var = torch.where(self._layout.covered, var, self._rate)
        return self._unflat(var)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            x = sample_grouped_multinomial(self._layout, self._rate, self._totals, sample_shape)
            x = x.expand(sample_shape + self.batch_shape + (self._n,))
            if not self._layout.all_covered:
                free = torch.poisson(self._rate.expand(x.shape).contiguous())
                x = torch.where(self._layout.covered, x, free)
        return self._unflat(x)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x = self._flat(value).to(self._rate.dtype)
        layout = self._layout
        per_entry = torch.xlogy(x, self._rate) - torch.lgamma(x + 1)
        lp = per_entry.sum(-1)
        if not layout.all_covered:
            lp = lp - torch.where(layout.covered, 0.0, self._rate).sum(-1)
        k = self._totals.to(self._rate.dtype)
        lp = lp + (torch.lgamma(k + 1) - torch.xlogy(k, self._group_rate)).sum(-1)
        if not self._validate_args:
            ok = (layout.group_sum(x) == k).all(-1)
            lp = torch.where(ok, lp, torch.full_like(lp, -math.inf))
        return lp


def _per_entry(layout: GroupLayout, per_group: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Broadcast ``(..., m)`` to ``(..., n)``: entry ``i`` gets its group's value."""
    idx = layout.groups.clamp_min(0)
    out = per_group.index_select(-1, idx)
    if not layout.all_covered:
        out = torch.where(layout.covered, out, torch.full_like(out, fill))
    return out


@register_constrain(Poisson)
def _constrain_poisson(base, A, b):
    return ConstrainedPoisson(base, A, b)
