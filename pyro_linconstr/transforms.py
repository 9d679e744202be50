"""Bijection between ``R^(n-m)`` and the affine subspace ``{x : A x = b}``."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_linconstr.constraints import affine_subspace
from pyro_linconstr.ops.axis_sums import AxisSums
from pyro_linconstr.ops.numerics import check_empty_groups, svd_solve
from pyro_linconstr.ops.operators import GroupSum, as_operator

__all__ = ["AffineSubspaceTransform"]


class AffineSubspaceTransform(Transform):
    r"""``z -> x0 + N z``: coordinates ``z`` in ``R^(n - m)`` onto ``{x : A x = b}``.

    ``N`` is an orthonormal basis of the null space of ``A`` and
    ``x0 = A^+ b`` is the minimum-norm solution. For a dense ``A``, ``N``
    comes from its SVD in float64 (rank-deficient, consistent ``A`` allowed).
    For a :class:`~pyro_linconstr.GroupSum`, ``N`` is the Helmert basis of
    each group, applied in ``O(n)`` with prefix sums and never stored: the
    coordinates of group ``g`` with entries ``i_1, ..., i_k`` are
    ``z_l = (x_{i_1} + ... + x_{i_l} - l x_{i_{l+1}}) / sqrt(l (l + 1))``.
    For an :class:`~pyro_linconstr.AxisSums`, ``N`` is the Kronecker product
    of the Helmert bases of the summed axes (identity along the others),
    applied axis by axis to the fibres along each summed axis, also ``O(n)``
    (``O(n k)`` for ``k`` axes) and never stored. Because ``N`` is
    orthonormal, ``log_abs_det_jacobian`` is 0: a density on ``z`` is the
    same density on the subspace w.r.t. its surface measure.
    The inverse ``z = N^T (x - x0)`` is the orthogonal projection's
    coordinates, so it is also a left inverse for points slightly off the
    subspace.

    :param A: tensor ``(..., m, n)`` or operator (e.g. :class:`~pyro_linconstr.GroupSum`,
        :class:`~pyro_linconstr.AxisSums`).
    :param torch.Tensor b: ``(..., m)``.
    :param event_shape: shape of ``x`` (default ``(n,)``).

    Example::

        >>> import torch, pyro_linconstr as plc
        >>> t = plc.transforms.AffineSubspaceTransform(torch.ones(1, 3), torch.tensor([3.0]))
        >>> x = t(torch.zeros(2))
        >>> x
        tensor([1., 1., 1.])
        >>> t.inv(x)
        tensor([0., 0.])
    """

    bijective = True

    def __init__(self, A, b: torch.Tensor, event_shape=None, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.A = as_operator(A)
        self.b = b
        n = self.A.num_cols
        self.event_shape = torch.Size((n,) if event_shape is None else event_shape)
        dtype = b.dtype if b.is_floating_point() else torch.get_default_dtype()
        if isinstance(self.A, GroupSum):
            self._helmert = _Helmert(self.A, b.to(dtype))
            self._x0, self.dim = self._helmert.x0, self._helmert.dim
            return
        if isinstance(self.A, AxisSums):  # a Helmert chart per summed axis
            self._helmert = _AxisHelmert(self.A, b.to(dtype))
            self._x0, self.dim = self._helmert.x0, self._helmert.dim
            return
        self._helmert = None
        dense = self.A.to_dense().to(dtype)
        self._x0, self._basis = _null_space(dense, b.to(dense.dtype))
        self.dim = self._basis.shape[-1]

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def domain(self):
        return constraints.real_vector

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return affine_subspace(self.A, self.b, self.event_shape)

    def __eq__(self, other) -> bool:
        return self is other

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return AffineSubspaceTransform(self.A, self.b, self.event_shape, cache_size=cache_size)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        if self._helmert is not None:
            x = self._x0 + self._helmert.forward(z)
        else:
            x = self._x0 + (self._basis @ z.unsqueeze(-1)).squeeze(-1)
        return x.reshape(x.shape[:-1] + self.event_shape)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.event_shape)
        flat = x.reshape(x.shape[: x.dim() - k] + (self.A.num_cols,))
        if self._helmert is not None:
            return self._helmert.inverse(flat - self._x0)
        return ((flat - self._x0).unsqueeze(-2) @ self._basis).squeeze(-2)

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(z.shape[:-1])

    def forward_shape(self, shape):
        return torch.Size(shape[:-1]) + self.event_shape

    def inverse_shape(self, shape):
        k = len(self.event_shape)
        return torch.Size(shape[: len(shape) - k]) + (self.dim,)

    @property
    def event_dim(self) -> int:  # for older torch APIs
        return 1


def _null_space(A: torch.Tensor, b: torch.Tensor):
    """``(x0, N)``: minimum-norm solution of ``A x = b`` and an orthonormal null-space basis."""
    what = "AffineSubspaceTransform"
    n = A.shape[-1]
    sol = svd_solve(A, b, torch.finfo(A.dtype).eps, what, full_matrices=True)
    r = sol.uniform_rank(what)
    if r >= n:
        raise ValueError(f"{what}: A has rank {r} >= n = {n}: the subspace is a point.")
    basis = sol.Vh[..., r:, :].transpose(-1, -2)
    return sol.x0.to(A.dtype), basis.to(A.dtype)


class _Helmert:
    """Orthonormal null-space coordinates of a :class:`GroupSum`, in ``O(n)``.

    Entries are visited group by group (stable order). The entry at
    (1-based) position ``j >= 2`` of its group owns coordinate ``l = j - 1``
    with Helmert row ``(1, ..., 1, -l, 0, ...) / sqrt(l (l + 1))``.

    The prefix sums within each group are scanned group by group (a
    ``num_groups x max_size`` table; a plain reshape when every group has the
    same size, as for the fibres of an :class:`~pyro_linconstr.AxisSums`), so
    their rounding is relative to the group's own entries and each group's
    sum is zero to ``eps`` of *its* magnitude, which the support check asks
    for. Only when that table would exceed ``4 n`` entries (very unequal
    groups) are they differences of one global cumulative sum, whose rounding
    is relative to the running total.
    """

    def __init__(self, A: GroupSum, b: torch.Tensor) -> None:
        groups, sizes = A.groups, A.group_sizes()
        check_empty_groups(sizes, b, "AffineSubspaceTransform")
        self.order = torch.argsort(groups, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        g_sorted = groups[self.order]
        pos = torch.arange(groups.numel(), device=groups.device) - starts[g_sorted] + 1
        self.owner = (pos >= 2).nonzero().squeeze(-1)  # sorted slots that own a coordinate
        l = (pos[self.owner] - 1).to(torch.float64)
        self.coef = (l * (l + 1)).rsqrt()  # 1 / sqrt(l (l + 1))
        self.l = l
        self.start = starts[g_sorted]  # first sorted slot of each entry's group
        self.end = (starts + sizes - 1)[g_sorted]  # last sorted slot of each entry's group
        self.n = groups.numel()
        self.dim = self.owner.numel()
        if self.dim == 0:
            raise ValueError(
                "AffineSubspaceTransform: every group has one entry: the subspace is a point."
            )
        safe = sizes.clamp_min(1).to(b.dtype)
        self.x0 = (b / safe).index_select(-1, groups)  # minimum-norm solution
        # the table of the group-wise scan: width, and each sorted slot's place in it
        self.num_groups, width = sizes.numel(), int(sizes.max())
        self.width = width if self.num_groups * width <= 4 * self.n else None
        self.slot = None
        if self.width is not None and not bool((sizes == width).all()):
            self.slot = g_sorted * width + pos - 1

    def _prefix(self, v: torch.Tensor) -> torch.Tensor:
        """Inclusive prefix sums of sorted ``v`` within each group (float64)."""
        lead = v.shape[:-1]
        if self.width is None:
            P = torch.cumsum(v, -1)
            start = self.start
            before = torch.where(start > 0, P.index_select(-1, (start - 1).clamp_min(0)), 0.0)
            return P - before
        if self.slot is None:  # equal sizes: the sorted entries are the table
            return v.reshape(lead + (-1, self.width)).cumsum(-1).reshape(lead + (self.n,))
        table = v.new_zeros(lead + (self.num_groups * self.width,)).index_copy(-1, self.slot, v)
        table = table.reshape(lead + (self.num_groups, self.width)).cumsum(-1)
        return table.reshape(lead + (-1,)).index_select(-1, self.slot)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = z.dtype
        c = z.to(torch.float64) * self.coef
        C = c.new_zeros(z.shape[:-1] + (self.n,)).index_copy(-1, self.owner, c)
        P = self._prefix(C)
        after = P.index_select(-1, self.end) - P  # sum of C strictly after each slot
        pos_minus_1 = torch.zeros(self.n, dtype=torch.float64, device=z.device)
        pos_minus_1 = pos_minus_1.index_copy(-1, self.owner, self.l)
        x_sorted = after - pos_minus_1 * C
        x = torch.empty_like(x_sorted).index_copy(-1, self.order, x_sorted)
        return x.to(dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xs = x.to(torch.float64).index_select(-1, self.order)
        P = self._prefix(xs)
        before = (P - xs).index_select(-1, self.owner)  # sum of the group's earlier entries
        z = (before - self.l * xs.index_select(-1, self.owner)) * self.coef
        return z.to(dtype)


class _AxisHelmert:
    """Orthonormal null-space coordinates of an :class:`~pyro_linconstr.AxisSums`, ``O(n k)``.

    The null space of the margins over axes ``a_1 < ... < a_k`` is the
    Kronecker product of the sum-zero spaces ``{v in R^{s_a} : sum v = 0}``
    of the summed axes and the whole space along the others, so
    ``N = kron(H_{a}, I_{b})`` (``H`` the ``s x (s - 1)`` Helmert basis) is
    orthonormal. ``z`` has the event's shape with each summed axis one
    shorter (flattened row-major); :meth:`forward` applies ``H`` along
    ``a_1``, then ``a_2``, ..., each a :class:`_Helmert` of the fibres along
    that axis (contiguous groups once the axis is moved last), and
    :meth:`inverse` applies ``H^T`` in the reverse order (the intermediate
    shapes match). ``x0 = A^T (A A^T)^{-1} b`` is the minimum-norm solution
    (0 for ``b = 0``; otherwise one ``m x m`` Cholesky in float64).
    """

    def __init__(self, A: AxisSums, b: torch.Tensor) -> None:
        self.A = A
        shape, D = list(A.event_shape), len(A.event_shape)
        for a in A.axes:
            shape[a] -= 1
        self.z_shape = torch.Size(shape)
        self.dim = math.prod(shape)
        self.stages = []  # per axis: (axis, shape of the other axes at that stage, chart)
        for a in A.axes:
            size = A.event_shape[a]
            others = torch.Size(shape[:a] + shape[a + 1 :])
            fibres = math.prod(others)
            groups = torch.arange(fibres, device=b.device).repeat_interleave(size)  # b's device
            zeros = torch.zeros(fibres, dtype=b.dtype, device=b.device)
            chart = _Helmert(GroupSum(groups, fibres), zeros)
            self.stages.append((a - D, others, size, chart))
            shape[a] = size  # later axes see this one at full size
        self.x0 = _axis_sums_x0(A, b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead, dtype = z.shape[:-1], z.dtype
        T = z.to(torch.float64).reshape(lead + self.z_shape)
        for dim, others, size, chart in self.stages:
            flat = T.movedim(dim, -1).reshape(lead + (-1,))
            T = chart.forward(flat).reshape(lead + others + (size,)).movedim(-1, dim)
        return T.reshape(lead + (self.A.num_cols,)).to(dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        T = x.to(torch.float64).reshape(lead + self.A.event_shape)
        for dim, others, size, chart in reversed(self.stages):
            flat = T.movedim(dim, -1).reshape(lead + (-1,))
            T = chart.inverse(flat).reshape(lead + others + (size - 1,)).movedim(-1, dim)
        return T.reshape(lead + (self.dim,)).to(dtype)


def _axis_sums_x0(A: AxisSums, b: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solution ``A^T (A A^T)^{-1} b`` of the kept rows (independent: no check)."""
    if not bool((b != 0).any()):
        return b.new_zeros(b.shape[:-1] + (A.num_cols,))
    ones = torch.ones(A.num_cols, dtype=torch.float64, device=b.device)
    G = A.weighted_gram(ones)
    b64 = b.to(torch.float64)
    if A.diagonal_gram:
        u = b64 / G
    else:
        u = torch.cholesky_solve(b64.unsqueeze(-1), torch.linalg.cholesky(G)).squeeze(-1)
    return A.rmatvec(u).to(b.dtype)
