"""Bijection between ``R^(n-m)`` and the affine subspace ``{x : A x = b}``."""

from __future__ import annotations

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_linconstr.constraints import affine_subspace
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
    Because ``N`` is orthonormal, ``log_abs_det_jacobian`` is 0: a density on
    ``z`` is the same density on the subspace w.r.t. its surface measure.
    The inverse ``z = N^T (x - x0)`` is the orthogonal projection's
    coordinates, so it is also a left inverse for points slightly off the
    subspace.

    :param A: tensor ``(..., m, n)`` or operator (e.g. :class:`~pyro_linconstr.GroupSum`).
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

    def _prefix(self, v: torch.Tensor) -> torch.Tensor:
        """Inclusive prefix sums of sorted ``v`` within each group (float64)."""
        P = torch.cumsum(v, -1)
        before = torch.where(self.start > 0, P.index_select(-1, (self.start - 1).clamp_min(0)), 0.0)
        return P - before

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
