"""Disjoint group-sum constraints of the discrete families.

The discrete families condition on *sums*: row ``g`` of ``A`` is the 0/1
indicator of a group of entries, and the groups are disjoint. This module turns
an operator into that structure (:class:`GroupLayout`), whether it is a
:class:`~pyro_linconstr.GroupSum` or a dense ``A`` of that form; entries that
no row covers stay unconstrained (and independent). It also holds what the
Poisson and Bernoulli/Binomial families share: the padded ``(m, S)`` layout
that vectorises work over groups, the support constraint, checks of the totals,
and the exact product-of-multinomials sampler.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints as _constraints

from pyro_linconstr.ops.operators import DenseOperator, GroupSum, LinearOperator

SUPPORTED_FORMS = (
    "a plc.GroupSum(groups, num_groups), or an A (dense, sparse, or an operator such as "
    "plc.AxisSums over one axis) whose rows have disjoint 0/1 supports (each entry in at "
    "most one row; torch.ones(1, n) is a single sum)"
)


class GroupLayout:
    """Disjoint groups of entries: ``A x = b`` reads ``sum_{i: groups[i] = g} x_i = b_g``.

    :param torch.Tensor groups: long tensor ``(n,)``; ``groups[i]`` is the group
        of entry ``i`` in ``[0, num_groups)``, or ``-1`` for an entry no row
        covers (unconstrained).
    :param int num_groups: the number of rows ``m`` (groups may be empty).

    Besides the flat view, entries are laid out padded as ``(m, S)`` with ``S``
    the largest group size: :meth:`pad` gathers ``(..., n) -> (..., m, S)`` and
    :meth:`unpad` scatters back, so per-group work runs on all groups at once.

    Example::

        >>> import torch
        >>> from pyro_linconstr.ops.groups import GroupLayout
        >>> layout = GroupLayout(torch.tensor([1, 0, 1, -1]), num_groups=2)
        >>> layout.sizes
        tensor([1, 2])
        >>> layout.group_sum(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([2., 4.])
        >>> layout.pad(torch.tensor([1.0, 2.0, 3.0, 4.0]), pad_value=0.0)
        tensor([[2., 0.],
                [1., 3.]])
    """

    def __init__(self, groups: torch.Tensor, num_groups: int) -> None:
        self.groups = groups.long()
        self.n = groups.numel()
        self.num_groups = int(num_groups)
        self.covered = self.groups >= 0
        self.all_covered = bool(self.covered.all())
        cov_idx = self.covered.nonzero().squeeze(-1)
        cov_groups = self.groups[cov_idx]
        self.sizes = torch.bincount(cov_groups, minlength=self.num_groups)
        self.max_size = int(self.sizes.max()) if cov_idx.numel() else 0
        # Rank of each covered entry inside its group (stable: original order).
        order = torch.argsort(cov_groups, stable=True)
        starts = torch.cumsum(self.sizes, 0) - self.sizes
        sorted_groups = cov_groups[order]
        ranks = torch.arange(order.numel(), device=groups.device) - starts[sorted_groups]
        entry = cov_idx[order]
        S = max(self.max_size, 1)
        # index[g, r] = entry in slot (g, r); padding points at the extra slot n.
        index = torch.full((self.num_groups, S), self.n, dtype=torch.long, device=groups.device)
        index[sorted_groups, ranks] = entry
        self.index = index
        self.pad_mask = index == self.n
        # slot[i] = g * S + r of a covered entry i (flat position in the padded layout).
        slot = torch.zeros(self.n, dtype=torch.long, device=groups.device)
        slot[entry] = sorted_groups * S + ranks
        self.slot = slot
        self.S = S
        self._cov_idx = cov_idx
        self._cov_groups = cov_groups
        # per_entry: uncovered entries read an extra column m that holds the fill value
        self._fill_index = torch.where(self.covered, self.groups, self.num_groups)

    @classmethod
    def from_operator(cls, A: LinearOperator, family: str) -> GroupLayout:
        """Recognise a group-sum constraint, or raise :class:`NotImplementedError`.

        A :class:`~pyro_linconstr.GroupSum` gives its groups directly; any other
        operator (dense, sparse, :class:`~pyro_linconstr.AxisSums`, ...) is read
        through its dense matrix, which must have disjoint 0/1 rows.
        """
        if isinstance(A, GroupSum):
            return cls(A.groups, A.num_groups)
        if isinstance(A, DenseOperator):
            M = A.matrix
        else:
            try:
                M = A.to_dense()
            except NotImplementedError:
                raise NotImplementedError(
                    f"constrain: a {family} base supports only sum constraints; got the "
                    f"operator {type(A).__name__}, which has no dense form to read them from. "
                    f"Supported: {SUPPORTED_FORMS}."
                ) from None
        if M.layout != torch.strided:  # sparse COO / CSR: read its pattern densely
            M = M.to_dense()
        m, n = M.shape[-2:]
        if m == 0:  # no rows: every entry keeps its base law
            return cls(torch.full((n,), -1, dtype=torch.long, device=M.device), 0)
        flat = M.reshape(-1, m, n)
        if flat.shape[0] == 0:  # an empty batch of matrices: nothing is constrained
            return cls(torch.full((n,), -1, dtype=torch.long, device=M.device), m)
        M0 = flat[0]
        if flat.shape[0] > 1 and not bool((flat == M0).all()):
            raise NotImplementedError(
                f"constrain: a {family} base needs the same sum constraint for the whole "
                "batch; a batched dense A with differing rows is not supported. Supported: "
                f"{SUPPORTED_FORMS}."
            )
        if not bool(((M0 == 0) | (M0 == 1)).all()):
            raise NotImplementedError(
                f"constrain: a {family} base supports only sum constraints, and A has "
                f"entries other than 0 and 1. Supported: {SUPPORTED_FORMS}."
            )
        colsum = M0.sum(-2)
        if bool((colsum > 1).any()):
            raise NotImplementedError(
                f"constrain: a {family} base supports only sums over disjoint groups, and "
                "rows of A overlap (an entry appears in two rows). Supported: "
                f"{SUPPORTED_FORMS}."
            )
        groups = torch.where(colsum > 0, M0.argmax(-2), torch.full_like(colsum, -1).long())
        return cls(groups, m)

    # ----------------------------------------------------------------- views
    def group_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``(..., m)`` of ``x`` ``(..., n)`` over each group (uncovered entries ignored)."""
        out = x.new_zeros(x.shape[:-1] + (self.num_groups,))
        if self.all_covered:
            return out.index_add(-1, self.groups, x)
        return out.index_add(-1, self._cov_groups, x.index_select(-1, self._cov_idx))

    def per_entry(self, per_group: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Broadcast ``(..., m) -> (..., n)``: entry ``i`` gets its group's value, an
        uncovered entry gets ``fill`` (the adjoint of :meth:`group_sum` for ``fill = 0``)."""
        if self.all_covered:
            return per_group.index_select(-1, self.groups)
        extra = per_group.new_full(per_group.shape[:-1] + (1,), fill)
        return torch.cat([per_group, extra], -1).index_select(-1, self._fill_index)

    def pad(self, x: torch.Tensor, pad_value: float) -> torch.Tensor:
        """Gather ``(..., n) -> (..., m, S)``; empty slots hold ``pad_value``."""
        fill = x.new_full(x.shape[:-1] + (1,), pad_value)
        xp = torch.cat([x, fill], -1)
        return xp[..., self.index]

    def unpad(self, y: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Scatter ``(..., m, S) -> (..., n)``; uncovered entries take ``fill`` (default 0)."""
        if self.num_groups == 0:  # nothing covered: every entry takes fill
            out = y.new_zeros(y.shape[:-2] + (self.n,))
        else:
            flat = y.reshape(y.shape[:-2] + (self.num_groups * self.S,))
            out = flat[..., self.slot]
        if not self.all_covered:
            if fill is None:
                fill = torch.zeros((), dtype=out.dtype, device=out.device)
            out = torch.where(self.covered, out, fill)
        return out


# --------------------------------------------------------------------- checks
#: Largest integer up to which every integer is exact in each working dtype.
EXACT_INTEGER = {torch.float32: 2**24, torch.float64: 2**53}


def check_totals(b: torch.Tensor, family: str, dtype: torch.dtype) -> torch.Tensor:
    """Check that ``b`` holds non-negative integer totals; return them as a long tensor.

    :param dtype: the base's dtype: totals above :data:`EXACT_INTEGER` ``[dtype]``
        (``2^24`` in float32) are an error, since counts that large are not exact
        in that dtype (samples could not sum to them).
    """
    if b.is_complex() or b.dtype == torch.bool:
        raise ValueError(f"constrain: b must be a real tensor of totals, got dtype {b.dtype}.")
    limit = EXACT_INTEGER[dtype]
    if b.is_floating_point():
        nonint = b != b.round()
    else:
        nonint = torch.zeros((), dtype=torch.bool, device=b.device)
    flags = torch.stack([nonint.any(), (b < 0).any(), (b > limit).any()]).tolist()  # one sync
    if flags[0]:
        raise ValueError(
            f"constrain: b must hold integer totals for a {family} base (sums of counts), "
            f"got the non-integer value {b[nonint].flatten()[0].item()}; round it, e.g. "
            "b.round()."
        )
    if flags[1]:
        raise ValueError(
            f"constrain: b must hold non-negative totals for a {family} base, got "
            f"{b[b < 0].flatten()[0].item()}; sums of non-negative counts cannot be negative."
        )
    if flags[2]:
        raise ValueError(
            f"constrain: b holds the total {b[b > limit].flatten()[0].item():.0f}, above "
            f"{limit} (2^{limit.bit_length() - 1}), the largest count that is exact in the "
            f"base's dtype {dtype}: samples could not sum to it. Use a float64 base (e.g. "
            "rate.double()), which is exact up to 2^53."
        )
    return b.round().long() if b.is_floating_point() else b.long()


def log_factorial(x: torch.Tensor) -> torch.Tensor:
    """``log x!`` in float64 for a float64 tensor of non-negative integers.

    Small counts (the largest below the number of entries) read a table of
    ``lgamma(j + 1)``, ``j = 0..max(x)``, which costs a gather per entry instead
    of an ``lgamma``; larger ones call ``lgamma`` per entry. Both are exact to
    float64 rounding.
    """
    if x.numel() == 0:
        return torch.zeros_like(x)
    top = int(x.max())
    if top >= x.numel():
        return torch.lgamma(x + 1)
    table = torch.arange(top + 1, dtype=torch.float64, device=x.device).add_(1).lgamma_()
    return table.take(x.long())


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def stirling_remainder(x: torch.Tensor) -> torch.Tensor:
    r"""``s(x) = log x! - (x log x - x)`` in float64 for a float64 ``x >= 0`` (``s(0) = 0``).

    ``s(x) = 1/2 log(2 pi x) + 1/(12 x) - 1/(360 x^3) + ...`` stays small
    (``< 20`` for ``x < 2^53``), so sums of ``s`` do not cancel the way sums of
    ``log x!`` do. Below 20 it is ``lgamma(x + 1) - x log x + x``; from 20 the
    Stirling series to ``x^-9`` (truncation below ``1e-17``).
    """
    small = x < 20
    xs = torch.where(small, x, torch.zeros((), dtype=x.dtype, device=x.device))
    direct = torch.lgamma(xs + 1) - torch.xlogy(xs, xs) + xs
    xl = torch.where(small, torch.full((), 20.0, dtype=x.dtype, device=x.device), x)
    r = 1 / xl
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 * (1 / 1680 - r2 / 1188))))
    series = series + _HALF_LOG_2PI + 0.5 * torch.log(xl)
    return torch.where(small, direct, series)


def multinomial_deviance(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    r"""``D(x, mu) = x log(x / mu) - x + mu >= 0`` in float64, elementwise.

    Evaluated as ``mu [(1 + t) log1p(t) - t]`` with ``t = (x - mu) / mu``, whose
    rounding error is ``O(eps |x - mu|)`` instead of the ``O(eps x)`` of the
    direct formula. ``D(0, mu) = mu``; ``D(x, 0) = inf`` for ``x > 0``.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    pos_x, pos_mu = x > 0, mu > 0
    mu_safe = torch.where(pos_mu, mu, torch.ones_like(mu))
    t = torch.where(pos_x & pos_mu, (x - mu_safe) / mu_safe, zero)
    dev = mu_safe * ((1 + t) * torch.log1p(t) - t)
    dev = torch.where(pos_x, dev, mu.expand_as(dev))
    return torch.where(pos_x & ~pos_mu, torch.full((), math.inf, dtype=x.dtype), dev)


def check_value(value, batch_shape: torch.Size, event_shape: torch.Size, family: str) -> None:
    """``value`` of ``log_prob`` must be a tensor ``sample_shape + batch_shape + event_shape``
    (batch dims broadcasting); checked even without validation, since it costs no sync."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{family}.log_prob: value must be a torch.Tensor, got {type(value).__name__}."
        )
    k = len(event_shape)
    if value.dim() < k or value.shape[value.dim() - k :] != event_shape:
        raise ValueError(
            f"{family}.log_prob: value must have shape (..., {', '.join(map(str, event_shape))})"
            f" ending in the event shape {tuple(event_shape)}, got shape {tuple(value.shape)}."
        )
    try:
        torch.broadcast_shapes(value.shape[: value.dim() - k], batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{family}.log_prob: value of shape {tuple(value.shape)} does not broadcast with "
            f"the batch shape {tuple(batch_shape)} (event shape {tuple(event_shape)})."
        ) from None


def first_bad(mask: torch.Tensor) -> int:
    """Index (along the last dim) of the first ``True`` of ``mask``."""
    return int(mask.nonzero()[0, -1])


class _GroupSumSupport(_constraints.Constraint):
    """Non-negative integer vectors (optionally ``<= upper``) with given group sums."""

    is_discrete = True

    def __init__(
        self,
        layout: GroupLayout,
        totals: torch.Tensor,
        event_shape: torch.Size,
        upper: torch.Tensor | None = None,
    ) -> None:
        self.layout = layout
        self.totals = totals
        self.upper = upper
        self.event_shape = torch.Size(event_shape)
        super().__init__()

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def check(self, value: torch.Tensor) -> torch.Tensor:
        k = len(self.event_shape)
        x = value.reshape(value.shape[: value.dim() - k] + (self.layout.n,))
        if not x.is_floating_point():
            x = x.to(torch.float64)  # integer counts stay exact
        ok = (x >= 0) & (x == x.round())
        if self.upper is not None:
            ok = ok & (x <= self.upper)
        sums = self.layout.group_sum(torch.where(ok, x, torch.zeros_like(x)))
        return ok.all(-1) & (sums == self.totals.to(x.dtype)).all(-1)

    def __repr__(self) -> str:
        return (
            f"group_sum_support(n={self.layout.n}, num_groups={self.layout.num_groups}, "
            f"event_shape={tuple(self.event_shape)})"
        )


# --------------------------------------------------------------------- sampler
def sample_grouped_multinomial(
    layout: GroupLayout,
    weights: torch.Tensor,
    totals: torch.Tensor,
    sample_shape: torch.Size = torch.Size(),
) -> torch.Tensor:
    r"""Exact draw of ``x_g ~ Multinomial(totals_g, weights_g / sum(weights_g))`` for every group.

    Vectorised over groups, batch and ``sample_shape``, with totals that differ
    per batch element (which :class:`torch.distributions.Multinomial` cannot
    batch). Each group's padded row of ``2^L >= S`` slots is split recursively
    in halves: a node holding ``c`` counts gives its left child
    ``Binomial(c, w_left / (w_left + w_right))`` and the rest to its right
    child, which is exactly the multinomial (conditional binomial chain on a
    balanced tree). ``L = ceil(log2 S)`` sequential steps, ``O(n)`` binomial
    draws; the cost does not grow with the totals.

    :param weights: non-negative ``(..., n)``; every group with a positive total
        must have a positive weight sum. Uncovered entries are returned as 0.
    :param totals: ``(..., m)`` integer-valued totals.
    :returns: counts ``sample_shape + (..., n)`` in the dtype of ``weights``.
    """
    sample_shape = torch.Size(sample_shape)
    batch = torch.broadcast_shapes(weights.shape[:-1], totals.shape[:-1])
    if layout.num_groups == 0 or math.prod(sample_shape + batch) == 0:
        return weights.new_zeros(sample_shape + batch + (layout.n,))
    levels = max(math.ceil(math.log2(layout.S)), 0) if layout.S > 1 else 0
    width = 1 << levels
    w = layout.pad(weights.detach(), 0.0).expand(batch + (layout.num_groups, layout.S))
    if width > layout.S:
        w = torch.nn.functional.pad(w, (0, width - layout.S))
    # Bottom-up pyramid of node weights; pyramid[l] has 2^l nodes per group.
    pyramid = [w]
    for _ in range(levels):
        top = pyramid[-1]
        pyramid.append(top.reshape(top.shape[:-1] + (top.shape[-1] // 2, 2)).sum(-1))
    pyramid.reverse()
    counts = totals.to(w.dtype).expand(sample_shape + batch + (layout.num_groups,)).unsqueeze(-1)
    for level in range(levels):
        child = pyramid[level + 1]
        left_w, parent_w = child[..., 0::2], pyramid[level]
        p = torch.where(parent_w > 0, left_w / parent_w.clamp_min(torch.finfo(w.dtype).tiny), 0)
        p = p.clamp(0, 1).expand(counts.shape)
        left = torch.binomial(counts.contiguous(), p.contiguous())
        left = torch.minimum(left, counts)
        counts = torch.stack([left, counts - left], -1)
        counts = counts.reshape(counts.shape[:-2] + (2 * counts.shape[-2],))
    return layout.unpad(counts[..., : layout.S])
