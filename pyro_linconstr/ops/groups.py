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
    "a plc.GroupSum(groups, num_groups), or a dense A whose rows have disjoint 0/1 "
    "supports (each entry in at most one row; torch.ones(1, n) is a single sum)"
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

    @classmethod
    def from_operator(cls, A: LinearOperator, family: str) -> GroupLayout:
        """Recognise a group-sum constraint, or raise :class:`NotImplementedError`."""
        if isinstance(A, GroupSum):
            return cls(A.groups, A.num_groups)
        if isinstance(A, DenseOperator):
            M = A.matrix
            m, n = M.shape[-2:]
            flat = M.reshape(-1, m, n)
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
        raise NotImplementedError(
            f"constrain: a {family} base supports only sum constraints; got the operator "
            f"{type(A).__name__}. Supported: {SUPPORTED_FORMS}."
        )

    # ----------------------------------------------------------------- views
    def group_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``(..., m)`` of ``x`` ``(..., n)`` over each group (uncovered entries ignored)."""
        out = x.new_zeros(x.shape[:-1] + (self.num_groups,))
        if self.all_covered:
            return out.index_add(-1, self.groups, x)
        idx = self.covered.nonzero().squeeze(-1)
        return out.index_add(-1, self.groups[idx], x.index_select(-1, idx))

    def pad(self, x: torch.Tensor, pad_value: float) -> torch.Tensor:
        """Gather ``(..., n) -> (..., m, S)``; empty slots hold ``pad_value``."""
        fill = x.new_full(x.shape[:-1] + (1,), pad_value)
        xp = torch.cat([x, fill], -1)
        return xp[..., self.index]

    def unpad(self, y: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Scatter ``(..., m, S) -> (..., n)``; uncovered entries take ``fill`` (default 0)."""
        flat = y.reshape(y.shape[:-2] + (self.num_groups * self.S,))
        out = flat[..., self.slot]
        if not self.all_covered:
            if fill is None:
                fill = torch.zeros((), dtype=out.dtype, device=out.device)
            out = torch.where(self.covered, out, fill)
        return out


# --------------------------------------------------------------------- checks
def check_totals(b: torch.Tensor, family: str) -> torch.Tensor:
    """Check that ``b`` holds non-negative integer totals; return them as a long tensor."""
    if b.is_complex() or b.dtype == torch.bool:
        raise ValueError(f"constrain: b must be a real tensor of totals, got dtype {b.dtype}.")
    if b.is_floating_point():
        bad = b != b.round()
        if bool(bad.any()):
            raise ValueError(
                f"constrain: b must hold integer totals for a {family} base (sums of counts), "
                f"got the non-integer value {b[bad].flatten()[0].item()}; round it, e.g. "
                "b.round()."
            )
    if bool((b < 0).any()):
        raise ValueError(
            f"constrain: b must hold non-negative totals for a {family} base, got "
            f"{b[b < 0].flatten()[0].item()}; sums of non-negative counts cannot be negative."
        )
    return b.round().long() if b.is_floating_point() else b.long()


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
            x = x.to(torch.get_default_dtype())
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
    levels = max(math.ceil(math.log2(layout.S)), 0) if layout.S > 1 else 0
    width = 1 << levels
    w = layout.pad(weights.detach(), 0.0).expand(batch + (layout.num_groups, layout.S))
    if width > layout.S:
        w = torch.nn.functional.pad(w, (0, width - layout.S))
    # Bottom-up pyramid of node weights; pyramid[l] has 2^l nodes per group.
    pyramid = [w]
    for _ in range(levels):
        pyramid.append(pyramid[-1].reshape(pyramid[-1].shape[:-1] + (-1, 2)).sum(-1))
    pyramid.reverse()
    counts = totals.to(w.dtype).expand(sample_shape + batch + (layout.num_groups,)).unsqueeze(-1)
    for level in range(levels):
        child = pyramid[level + 1]
        left_w, parent_w = child[..., 0::2], pyramid[level]
        p = torch.where(parent_w > 0, left_w / parent_w.clamp_min(torch.finfo(w.dtype).tiny), 0)
        p = p.clamp(0, 1).expand(counts.shape)
        left = torch.binomial(counts.contiguous(), p.contiguous())
        left = torch.minimum(left, counts)
        counts = torch.stack([left, counts - left], -1).reshape(counts.shape[:-1] + (-1,))
    return layout.unpad(counts[..., : layout.S])
