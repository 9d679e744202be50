"""Bernoulli / Binomial entries conditioned on group sums: the conditional Bernoulli law."""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Binomial
from torch.distributions.utils import lazy_property

from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.parsing import check_constraint, parse_base, should_validate
from pyro_linconstr.distributions.registry import register_constrain
from pyro_linconstr.ops import dp
from pyro_linconstr.ops.groups import GroupLayout, _GroupSumSupport, check_totals, first_bad
from pyro_linconstr.ops.operators import LinearOperator


class ConstrainedBernoulli(ConstrainedDistribution):
    r"""Independent ``x_i ~ Binomial(N_i, sigmoid(l_i))`` conditioned on disjoint group sums.

    ``Bernoulli(...)`` is the case ``N_i = 1``: the *conditional Bernoulli*
    (conditional Poisson-binomial) law, e.g. a selection of exactly ``k``
    items. For groups ``g`` (rows of ``A`` with disjoint 0/1 supports) with
    totals ``k_g = b_g``, the groups are independent and

    .. math::

        p(x \mid A x = b) = \prod_i \operatorname{Bin}(x_i; N_i, \sigma(l_i))
        \Big/ \prod_g Z_g, \qquad
        Z_g = P\big(\textstyle\sum_{i \in g} x_i = k_g\big),

    with ``log Z_g`` from a log-space dynamic program over partial sums
    (:mod:`pyro_linconstr.ops.dp`), ``O(N |g| k_g)`` per group (``O(|g| k_g)``
    for Bernoulli), all groups and batch elements in lock-step (groups are
    padded to the largest one). Sampling is exact (backward sampling through
    the table). The conditional marginals, :attr:`mean`, come from the
    identity

    .. math::

        E[x_i \mid A x = b] = N_i \sigma(l_i) + \partial \log Z_g / \partial l_i,

    evaluated by autograd through the DP, so :attr:`mean` is differentiable
    in the logits (it is the marginal-expectation proxy of the ``"marginal"``
    estimator; SIMPLE, Ahmed et al. 2023, is the ``k``-subset analogue).
    :attr:`variance` comes from forward-backward tables (not differentiable).
    Entries in no row of ``A`` keep their unconstrained law.

    Construct it with :func:`~pyro_linconstr.constrain` from
    ``Bernoulli(probs=... | logits=...).to_event(k)`` or
    ``Binomial(total_count, ...).to_event(k)``.

    :param base: the unconstrained Bernoulli or Binomial, with an event dim.
    :param A: a :class:`~pyro_linconstr.ops.LinearOperator` of the group-sum form.
    :param torch.Tensor b: non-negative integer totals ``(..., m)``.
    :raises ValueError: for non-integer or negative totals, totals above what a
        group can reach (its size for Bernoulli, its summed ``total_count``
        for Binomial), or bad shapes.
    :raises NotImplementedError: for an ``A`` that is not a disjoint group sum.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> base = dist.Bernoulli(probs=torch.tensor([0.5, 0.5, 0.5, 0.5])).to_event(1)
        >>> d = plc.constrain(base, torch.ones(1, 4), torch.tensor([2.0]))
        >>> d.mean
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
        >>> d.log_prob(torch.tensor([1.0, 0.0, 1.0, 0.0])).exp()  # 1 / C(4, 2)
        tensor(0.1667)
        >>> d.sample((3,)).sum(-1)
        tensor([2., 2., 2.])

    **References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning
    Deep Generative Models under Hard Linear Equality Constraints", NeSy 2026
    (arXiv:2502.05416); K. Ahmed, Z. Zeng, M. Niepert, G. Van den Broeck,
    "SIMPLE: A Gradient Estimator for k-Subset Sampling", ICLR 2023.
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(self, base, A: LinearOperator, b: torch.Tensor, validate_args=None) -> None:
        parsed = parse_base(base)
        family, logits, count = _parse_base(parsed)
        n, event_shape = parsed.n, parsed.event_shape
        A = A.to(parsed.dtype)
        batch_shape = check_constraint(parsed, A, b)
        layout = GroupLayout.from_operator(A, family)
        totals = check_totals(b, family)
        self._init_args = (base, A, b, validate_args)
        if should_validate(validate_args):
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("constrain: the base's logits have non-finite entries.")
            if bool((count < 0).any()) or bool((count != count.round()).any()):
                raise ValueError(
                    "constrain: the base's total_count must hold non-negative integers."
                )
        self._family = family
        self._n = n
        self._logits = logits.expand(batch_shape + (n,))
        self._count = count.expand(batch_shape + (n,))
        self._totals = totals.expand(batch_shape + totals.shape[-1:])
        self._layout = layout
        self._A = A
        self._b = b.to(logits.dtype).expand(batch_shape + b.shape[-1:])
        super().__init__(batch_shape, event_shape, validate_args=validate_args)
        cap = layout.group_sum(self._count.detach())
        over = self._totals > cap
        if bool(over.any()):
            g = first_bad(over)
            k, c = int(self._totals[over][0]), int(cap[over][0])
            what = (
                f"has {c} entries" if family == "Bernoulli" else f"has total_count summing to {c}"
            )
            raise ValueError(
                f"constrain: group {g} {what} but b[..., {g}] = {k} asks for a larger sum, "
                f"which the {family} support cannot reach; b_g must lie in [0, {c}]."
            )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ConstrainedBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new._family = self._family
        new._n = self._n
        new._logits = self._logits.expand(batch_shape + (self._n,))
        new._count = self._count.expand(batch_shape + (self._n,))
        new._totals = self._totals.expand(batch_shape + self._totals.shape[-1:])
        new._layout = self._layout
        new._A = self._A
        new._b = self._b.expand(batch_shape + self._b.shape[-1:])
        super(ConstrainedBernoulli, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    # ------------------------------------------------------------ parameters
    @property
    def logits(self) -> torch.Tensor:
        """The base's logits, flattened to ``batch_shape + (n,)``."""
        return self._logits

    @property
    def total_count(self) -> torch.Tensor:
        """Trials per entry, ``batch_shape + (n,)`` (ones for a Bernoulli base)."""
        return self._count

    @property
    def support(self):
        return _GroupSumSupport(self._layout, self._totals, self.event_shape, upper=self._count)

    def _padded_logw(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-slot log-pmf table ``batch + (m, S, X)`` of the padded layout."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lp = self._layout.pad(logits.to(dtype), 0.0)
        N = self._layout.pad(self._count.to(dtype), 0.0)
        X = int(self._count.max()) + 1 if self._count.numel() else 2
        X = max(X, 2) if self._family == "Bernoulli" else X
        xs = torch.arange(X, dtype=dtype, device=lp.device)
        return _binomial_logpmf(lp.unsqueeze(-1), N.unsqueeze(-1), xs)

    def _log_normalizer(self, logits: torch.Tensor) -> torch.Tensor:
        """``sum_g log Z_g``, shape ``batch_shape``, differentiable in ``logits``."""
        logZ = dp.log_normalizer(self._padded_logw(logits), self._totals)
        return logZ.sum(-1)

    # ------------------------------------------------------------ moments
    @lazy_property
    def mean(self) -> torch.Tensor:
        logits = self._logits
        create_graph = torch.is_grad_enabled() and logits.requires_grad
        with torch.enable_grad():
            leaf = logits if create_graph else logits.detach().requires_grad_()
            logZ = self._log_normalizer(leaf).sum()
            (grad,) = torch.autograd.grad(logZ, leaf, create_graph=create_graph, allow_unused=True)
        base_mean = self._count * torch.sigmoid(logits)
        if grad is None:
            return self._unflat(base_mean)
        return self._unflat(base_mean + grad.to(base_mean.dtype))

    @lazy_property
    def variance(self) -> torch.Tensor:
        logw = self._padded_logw(self._logits.detach())
        pmf = dp.marginal_pmfs(logw, self._totals)
        xs = torch.arange(pmf.shape[-1], dtype=pmf.dtype, device=pmf.device)
        m1 = (pmf * xs).sum(-1)
        var = ((pmf * xs**2).sum(-1) - m1**2).clamp_min(0)
        p = torch.sigmoid(self._logits.detach())
        free = self._count * p * (1 - p)
        var = self._layout.unpad(var, fill=0.0).to(free.dtype)
        return self._unflat(var + _uncovered(self, free))

    def marginal_pmf(self) -> torch.Tensor:
        """Exact ``P(x_i = x | A x = b)``, shape ``batch_shape + (n, X)`` (forward-backward;
        uncovered entries get their unconstrained pmf)."""
        logw = self._padded_logw(self._logits.detach())
        pmf = dp.marginal_pmfs(logw, self._totals)
        X = pmf.shape[-1]
        cols = [self._layout.unpad(pmf[..., x]) for x in range(X)]
        pmf = torch.stack(cols, -1)
        if not self._layout.all_covered:
            xs = torch.arange(X, dtype=pmf.dtype, device=pmf.device)
            free = _binomial_logpmf(
                self._logits.detach().to(pmf.dtype).unsqueeze(-1),
                self._count.to(pmf.dtype).unsqueeze(-1),
                xs,
            ).exp()
            pmf = torch.where(self._layout.covered.unsqueeze(-1), pmf, free)
        return pmf

    # ------------------------------------------------------------ sampling
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            logw = self._padded_logw(self._logits.detach())
            xp = dp.backward_sample(logw, self._totals, sample_shape)
            x = self._layout.unpad(xp).to(self._logits.dtype)
            x = x.expand(sample_shape + self.batch_shape + (self._n,))
            if not self._layout.all_covered:
                shape = x.shape
                count, logits = self._count.expand(shape), self._logits.expand(shape)
                free = Binomial(count, logits=logits, validate_args=False).sample()
                x = torch.where(self._layout.covered, x, free)
        return self._unflat(x)

    # ------------------------------------------------------------ density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x = self._flat(value).to(self._logits.dtype)
        lp = _binomial_logpmf(self._logits, self._count, x).sum(-1)
        lp = lp - self._log_normalizer(self._logits).to(lp.dtype)
        if not self._validate_args:
            k = self._totals.to(x.dtype)
            ok = (self._layout.group_sum(x) == k).all(-1)
            ok = ok & ((x >= 0) & (x <= self._count) & (x == x.round())).all(-1)
            lp = torch.where(ok, lp, torch.full_like(lp, -math.inf))
        return lp


def _uncovered(d: ConstrainedBernoulli, free: torch.Tensor) -> torch.Tensor:
    if d._layout.all_covered:
        return torch.zeros_like(free)
    return torch.where(d._layout.covered, torch.zeros_like(free), free)


def _binomial_logpmf(logits: torch.Tensor, N: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log Bin(x; N, sigmoid(logits))``; ``NEG`` where ``x > N``."""
    log_binom = torch.lgamma(N + 1) - torch.lgamma(x + 1) - torch.lgamma((N - x).clamp_min(0) + 1)
    out = log_binom + x * logits + N * torch.nn.functional.logsigmoid(-logits)
    return torch.where(x <= N, out, torch.full_like(out, dp.NEG))


def _parse_base(parsed):
    """``(family, logits, total_count)`` of the parsed base, flattened to ``(..., n)``."""
    inner = parsed.inner
    if not isinstance(inner, (Bernoulli, Binomial)):
        raise NotImplementedError(
            f"ConstrainedBernoulli: the base must be Bernoulli(...).to_event(k) or "
            f"Binomial(...).to_event(k), got {type(inner).__name__}."
        )
    family = "Binomial" if isinstance(inner, Binomial) else "Bernoulli"
    logits = parsed.flat(inner.logits)
    if family == "Binomial":
        count = parsed.flat(inner.total_count.to(logits.dtype))
    else:
        count = torch.ones_like(logits)
    return family, logits, count


@register_constrain(Bernoulli)
@register_constrain(Binomial)
def _constrain_bernoulli(base, A, b):
    return ConstrainedBernoulli(base, A, b)
