"""Bernoulli / Binomial entries conditioned on group sums: the conditional Bernoulli law."""

from __future__ import annotations

import itertools
import math

import torch
from torch.distributions import Bernoulli, Binomial, constraints
from torch.distributions.utils import lazy_property

from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.parsing import check_constraint, parse_base, should_validate
from pyro_linconstr.distributions.registry import register_constrain
from pyro_linconstr.ops import dp
from pyro_linconstr.ops.groups import (
    GroupLayout,
    _GroupSumSupport,
    check_totals,
    check_value,
    first_bad,
    log_factorial,
)
from pyro_linconstr.ops.operators import LinearOperator, as_operator

#: A DP step over at most this many cells (batch x groups x (max total + 1) x values)
#: runs in float64 whatever the base's dtype: it costs its per-op overhead either way.
SMALL_DP_STEP = 2048


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
    Entries in no row of ``A`` keep their unconstrained law; an ``A`` with no
    rows (shape ``(0, n)``) leaves the base law unchanged, and an empty batch
    gives empty results. Results are in the base's dtype (``A`` and ``b``
    follow it; ``b`` may be an integer tensor).

    The DP runs on *tilted* logits ``l_i + theta_g`` (a shift per group that
    leaves the conditional law unchanged, chosen so that the base mean of each
    group sum is close to ``k_g``): its tables then hold log-probabilities of
    typical partial sums, also when ``k_g`` lies in the far tail of the base law.

    **Accuracy** (``eps`` the machine epsilon of the dtype, ``n`` entries,
    ``N_max`` the largest ``total_count``, 1 for Bernoulli; checked by the
    tests against convolutions in float64 and ``scipy.stats.binom``):

    * :meth:`log_prob`: absolute error ``<= 2 eps (|log p| + n log(1 + N_max))
      + 4 eps_64 sum_i N_i log(1 + N_i)``, also for totals far in the tail.
      The per-entry log-pmfs are computed in float64 for a Binomial base
      (``log C(N, x)`` cancels against the log-sigmoid terms: torch's float32
      ``Binomial.log_prob`` is off by up to ``eps N log N``, ``1e-3`` at
      ``N = 2000``), in the base's dtype for a Bernoulli one (no cancellation),
      and summed in float64. The DP runs in the base's dtype, or in float64
      when one step touches at most ``SMALL_DP_STEP = 2048`` cells (batch x groups
      x (max total + 1) x values), where its cost is per-op overhead anyway;
    * :attr:`mean`: absolute error ``<= 16 eps N_max``.

    The cost, ``O(N_max |g| k_g)`` time and ``O(N_max k_g)`` memory per group
    and step, limits the totals, not the accuracy: a Binomial base with a large
    ``total_count`` (thousands) conditions slowly.

    Construct it with :func:`~pyro_linconstr.constrain` from
    ``Bernoulli(probs=... | logits=...).to_event(k)`` or
    ``Binomial(total_count, ...).to_event(k)``.

    :param base: the unconstrained Bernoulli or Binomial, with an event dim.
    :param A: a :class:`~pyro_linconstr.ops.LinearOperator` of the group-sum
        form (or a dense tensor).
    :param torch.Tensor b: non-negative integer totals ``(..., m)``.
    :param validate_args: check the logits (finite) and ``total_count``
        (non-negative integers), and the values passed to :meth:`log_prob`
        (default: Pyro's global setting). Without validation, :meth:`log_prob`
        of a value off the support is ``-inf``.
    :raises ValueError: for non-integer or negative totals, totals above what a
        group can reach (its size for Bernoulli, its summed ``total_count``
        for Binomial), non-finite logits or a bad ``total_count`` (when
        validating), or bad shapes.
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

    arg_constraints = {
        "logits": constraints.real,
        "total_count": constraints.nonnegative_integer,
        "b": constraints.nonnegative_integer,
    }
    has_rsample = False
    has_enumerate_support = True
    #: The largest support :meth:`enumerate_support` builds.
    max_enumeration = 2**16

    def __init__(self, base, A: LinearOperator, b: torch.Tensor, validate_args=None) -> None:
        parsed = parse_base(base)
        family, logits, count = _parse_base(parsed)
        n, event_shape = parsed.n, parsed.event_shape
        A = as_operator(A).to(parsed.dtype)
        batch_shape = check_constraint(parsed, A, b)
        layout = GroupLayout.from_operator(A, family)
        totals = check_totals(b, family, parsed.dtype)
        self._init_args = (base, A, b, validate_args)
        if should_validate(validate_args):
            bad = torch.stack(
                [
                    (~torch.isfinite(logits)).any(),
                    ((count < 0) | (count != count.round()) | ~torch.isfinite(count)).any(),
                ]
            ).tolist()  # one sync
            if bad[0]:
                raise ValueError(
                    "constrain: the base's logits (or probs) have non-finite entries (nan or "
                    "inf); probs must lie in [0, 1]."
                )
            if bad[1]:
                raise ValueError(
                    "constrain: the base's total_count must hold finite non-negative integers."
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
        cap = layout.group_sum(self._count.detach().to(torch.float64))
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
        new._init_args = self._init_args
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
        if "_tilt" in self.__dict__:
            new._tilt = self._tilt.expand(batch_shape + (self._n,))
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

    @lazy_property
    def _X(self) -> int:
        """Values per entry in the DP table: ``0..max(total_count)``."""
        X = int(self._count.max()) + 1 if self._count.numel() else 2
        return max(X, 2) if self._family == "Bernoulli" else X

    @lazy_property
    def _dp_dtype(self) -> torch.dtype:
        """The DP's working dtype: the base's, or float64 where one DP step touches at
        most :data:`SMALL_DP_STEP` cells (the step costs its per-op overhead then,
        whatever the dtype)."""
        dtype = self._logits.dtype
        K = int(self._totals.max()) if self._totals.numel() else 0
        cells = self.batch_shape.numel() * self._layout.num_groups * (K + 1) * self._X
        return torch.float64 if cells <= SMALL_DP_STEP else dtype

    def _padded_logw(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-slot log-pmf table ``batch + (m, S, X)`` of the padded layout, of the
        tilted logits (:attr:`_tilt`), in :attr:`_dp_dtype` (see :func:`_binomial_logpmf`)."""
        dtype = self._dp_dtype
        lp = self._layout.pad(logits.to(dtype) + self._tilt.to(dtype), 0.0)
        N = self._layout.pad(self._count.to(dtype), 0.0)
        xs = torch.arange(self._X, dtype=dtype, device=lp.device)
        return _binomial_logpmf(lp.unsqueeze(-1), N.unsqueeze(-1), xs, self._family)

    @lazy_property
    def _tilt(self) -> torch.Tensor:
        """Per-entry shift ``theta_g`` of the logits of group ``g`` (0 on uncovered
        entries), ``batch_shape + (n,)``, float64, detached.

        ``Bin(x; N, sigmoid(l + theta)) = Bin(x; N, sigmoid(l)) e^{theta x} / M(theta)``:
        shifting a group's logits by a constant leaves its conditional law given
        the group sum unchanged. The DP runs on logits shifted so that the base
        mean of each group sum is close to its total ``k_g`` (exponential tilting,
        three Newton steps from a closed-form start): its tables then hold
        log-probabilities of typical partial sums, of modest size, instead of
        ``log P(sum = k_g)``, which is huge in magnitude when ``k_g`` lies in the
        far tail of the base law (and which float32 would round coarsely).
        The conditional law being invariant, a detached shift gives exact
        gradients.
        """
        layout = self._layout
        f64 = torch.float64
        with torch.no_grad():
            logits = self._logits.detach().to(f64)
            N = self._count.to(f64)
            k = self._totals.to(f64)
            cap = layout.group_sum(N)
            mean = layout.group_sum(N * torch.sigmoid(logits))
            theta = torch.logit((k + 0.5) / (cap + 1)) - torch.logit((mean + 0.5) / (cap + 1))
            for _ in range(3):  # Newton on sum_i N_i sigmoid(l_i + theta_g) = k_g
                p = torch.sigmoid(logits + layout.per_entry(theta))
                f = layout.group_sum(N * p) - k
                slope = layout.group_sum(N * p * (1 - p)).clamp_min(1e-3)
                theta = theta - (f / slope).clamp(-4.0, 4.0)
            theta = torch.where(cap > 0, theta.clamp(-60.0, 60.0), 0.0)
            return layout.per_entry(theta)

    def _log_normalizer(self, logits: torch.Tensor) -> torch.Tensor:
        """``sum_g log Z_g`` of the tilted logits (see :attr:`_tilt`), shape
        ``batch_shape``, differentiable in ``logits``."""
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
        # N sigmoid(l + theta) of the DP's table, in its dtype
        dtype = self._dp_dtype
        mean = self._count.to(dtype) * torch.sigmoid(logits.to(dtype) + self._tilt.to(dtype))
        if grad is not None:
            mean = mean + grad.to(dtype)
        return self._unflat(mean.to(logits.dtype))

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
                self._family,
            ).exp()
            pmf = torch.where(self._layout.covered.unsqueeze(-1), pmf, free)
        return pmf.to(self._logits.dtype)

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
        x = self._unflat(x)
        # our own, unmodified sample is on the support: log_prob skips re-validating it
        self.mark_valid(x)
        return x

    # ------------------------------------------------------------ enumeration
    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """Every value of the support, ``(K,) + batch_shape + event_shape``.

        For :class:`pyro.infer.TraceEnum_ELBO` with ``config_enumerate``: a latent
        selection of exactly ``k`` items (or counts with fixed group totals) is
        summed out exactly instead of sampled. The values are every vector with
        ``0 <= x_i <= total_count_i`` and the group sums ``b``, in lexicographic
        order per group; entries in no group take all their values.

        Pyro's parallel enumeration shares one set of values across the batch,
        so ``b`` and ``total_count`` must be the same for every batch element
        (``logits`` may differ), and the support must hold at most
        :attr:`max_enumeration` points (``C(n, k)`` for one group of ``n``
        Bernoulli entries summing to ``k``).

        :param bool expand: expand the values over the batch (``(K,) + batch +
            event``) or leave size-1 batch dims (``(K,) + (1,) * len(batch) + event``).
        :raises ValueError: when the support differs across the batch or is larger
            than :attr:`max_enumeration`.

        Example::

            >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
            >>> d = plc.constrain(dist.Bernoulli(probs=torch.full((4,), 0.3)).to_event(1),
            ...                   torch.ones(1, 4), torch.tensor([2.0]))
            >>> d.enumerate_support().shape  # C(4, 2) selections
            torch.Size([6, 4])
        """
        n, layout = self._n, self._layout
        totals = self._totals.reshape(-1, self._totals.shape[-1])
        counts = self._count.reshape(-1, n)
        if totals.shape[0] > 1 and not (
            bool((totals == totals[:1]).all()) and bool((counts == counts[:1]).all())
        ):
            raise ValueError(
                "ConstrainedBernoulli.enumerate_support: the group totals b (or total_count) "
                "differ across the batch, so the batch has no common support to enumerate; "
                "Pyro's parallel enumeration needs one. Enumerate per batch element (a loop "
                "over sites), or use a sampling estimator."
            )
        if totals.shape[0] == 0:
            values = torch.zeros((0, n), dtype=self._logits.dtype, device=self._logits.device)
        else:
            values = _enumerate_values(
                layout,
                totals[0].tolist(),
                [int(c) for c in counts[0].tolist()],
                self.max_enumeration,
            ).to(dtype=self._logits.dtype, device=self._logits.device)
        values = self._unflat(values)
        K = values.shape[0]
        values = values.reshape((K,) + (1,) * len(self.batch_shape) + self.event_shape)
        if expand:
            values = values.expand((K,) + self.batch_shape + self.event_shape)
        return values

    # ------------------------------------------------------------ density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        check_value(value, self.batch_shape, self.event_shape, "ConstrainedBernoulli")
        checked = self.is_marked_valid(value)
        if self._validate_args and not checked:
            self._validate_sample(value)
            checked = True
        f64 = torch.float64
        x = self._flat(value).to(f64)
        count = self._count.to(f64)
        if not checked:  # unvalidated values: off the support -> -inf, never an error
            ok = (x >= 0) & (x <= count) & (x == x.round())
            x = torch.where(ok, x, torch.zeros((), dtype=f64, device=x.device))
        # the DP's own numbers: tilted logits (the conditional law is invariant to the
        # tilt), in the DP's dtype; summed in float64
        logits = self._logits.to(self._dp_dtype) + self._tilt.to(self._dp_dtype)
        lp = _binomial_logpmf(logits, count, x, self._family).to(f64).sum(-1)
        lp = lp - self._log_normalizer(self._logits).to(f64)
        if not checked:
            k = self._totals.to(f64)
            ok = ok.all(-1) & (self._layout.group_sum(x) == k).all(-1)
            lp = torch.where(ok, lp, torch.full_like(lp, -math.inf))
        return lp.to(self._logits.dtype)


def _bounded_compositions(total: int, caps: list[int]):
    """Every tuple ``v`` with ``0 <= v_i <= caps[i]`` and ``sum(v) == total`` (lexicographic)."""
    if not caps:
        if total == 0:
            yield ()
        return
    rest = sum(caps[1:])
    for v in range(max(0, total - rest), min(caps[0], total) + 1):
        for tail in _bounded_compositions(total - v, caps[1:]):
            yield (v,) + tail


def _count_compositions(total: int, caps: list[int]) -> int:
    ways = [1] + [0] * total  # ways[j]: tuples of the entries so far summing to j
    for c in caps:
        ways = [sum(ways[j - v] for v in range(0, min(c, j) + 1)) for j in range(total + 1)]
    return ways[total]


def _enumerate_values(layout, totals: list, counts: list[int], limit: int) -> torch.Tensor:
    """All support points ``(K, n)`` of disjoint group sums (see ``enumerate_support``)."""
    parts = []  # (entries, list of value tuples) per group, then per uncovered entry
    size = 1
    for g in range(layout.num_groups):
        entries = layout.index[g][~layout.pad_mask[g]].tolist()
        caps = [counts[i] for i in entries]
        k = int(totals[g])
        size *= _count_compositions(k, caps)
        parts.append((entries, k, caps))
    free = (~layout.covered).nonzero().flatten().tolist()
    for i in free:
        size *= counts[i] + 1
    if size > limit:
        raise ValueError(
            f"ConstrainedBernoulli.enumerate_support: the support has {size} points, more than "
            f"max_enumeration = {limit}; enumerate a smaller site or use a sampling estimator "
            "(plc.infer.ConstrainedTrace_ELBO with estimator='score' or 'marginal')."
        )
    options = [(entries, list(_bounded_compositions(k, caps))) for entries, k, caps in parts] + [
        ([i], [(v,) for v in range(counts[i] + 1)]) for i in free
    ]
    values = torch.zeros(size, layout.n, dtype=torch.float64)
    for row, combo in enumerate(itertools.product(*(vals for _, vals in options))):
        for (entries, _), vals in zip(options, combo):
            if entries:
                values[row, entries] = torch.tensor(vals, dtype=torch.float64)
    return values


def _log_binom(N: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log C(N, x)`` in float64 for non-negative integer float64 ``N, x`` (``x > N``:
    a finite value, masked by the caller)."""
    N, x = torch.broadcast_tensors(N, x)
    lf = log_factorial(torch.stack([N, x, (N - x).clamp_min(0)]))
    return lf[0] - lf[1] - lf[2]


def _uncovered(d: ConstrainedBernoulli, free: torch.Tensor) -> torch.Tensor:
    if d._layout.all_covered:
        return torch.zeros_like(free)
    return torch.where(d._layout.covered, torch.zeros_like(free), free)


def _binomial_logpmf(
    logits: torch.Tensor, N: torch.Tensor, x: torch.Tensor, family: str
) -> torch.Tensor:
    """``log Bin(x; N, sigmoid(l)) = log C(N, x) + x log sigmoid(l) + (N - x) log sigmoid(-l)``
    in the dtype of ``logits``; ``NEG`` where ``x > N``.

    Neither log-sigmoid term cancels against the other (both are <= 0), so a
    ``Bernoulli`` family (``N`` in ``{0, 1}``, ``log C = 0``) is computed in the
    base's dtype. A ``Binomial`` one adds ``log C(N, x)``, which cancels against
    them for large ``N``: it is computed in float64 and rounded once.
    """
    dtype = logits.dtype
    if family == "Binomial":
        logits, N, x = logits.to(torch.float64), N.to(torch.float64), x.to(torch.float64)
    else:
        N, x = N.to(dtype), x.to(dtype)
    out = x * logits + N * torch.nn.functional.logsigmoid(-logits)
    if family == "Binomial":
        out = out + _log_binom(N, x)
    out = torch.where(x <= N, out, torch.full_like(out, dp.NEG))
    return out.to(dtype)


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
