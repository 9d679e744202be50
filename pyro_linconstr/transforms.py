"""Bijection between ``R^(n-m)`` and the affine subspace ``{x : A x = b}``."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_linconstr.ops.operators import as_operator

__all__ = ["AffineSubspaceTransform"]


class AffineSubspaceTransform(Transform):
    r"""``z -> x0 + N z``: coordinates ``z`` in ``R^(n - m)`` onto ``{x : A x = b}``.

    ``N`` is an orthonormal basis of the null space of ``A`` (from a QR
    factorization of ``A^T``, or of its orthonormalized row space when ``A``
    is rank deficient) and ``x0 = A^+ b`` is the minimum-norm solution.
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
        dense = self.A.to_dense().to(
            b.dtype if b.is_floating_point() else torch.get_default_dtype()
        )
        self._x0, self._basis = _null_space(dense, b.to(dense.dtype))
        self.dim = self._basis.shape[-1]

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def domain(self):
        return constraints.real_vector

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        from pyro_linconstr.constraints import affine_subspace

        return affine_subspace(self.A, self.b, self.event_shape)

    def __eq__(self, other) -> bool:
        return self is other

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return AffineSubspaceTransform(self.A, self.b, self.event_shape, cache_size=cache_size)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        x = self._x0 + (self._basis @ z.unsqueeze(-1)).squeeze(-1)
        return x.reshape(x.shape[:-1] + self.event_shape)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.event_shape)
        flat = x.reshape(x.shape[: x.dim() - k] + (self.A.num_cols,))
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

    m, n = A.shape[-2:]
    eps = torch.finfo(A.dtype).eps
    A64 = A.to(torch.float64)
    U, sv, Vh = torch.linalg.svd(A64, full_matrices=True)
    ranks = (sv > 10 * eps * sv[..., :1]).sum(-1)
    r = int(ranks.max())
    if int(ranks.min()) != r or r >= n:
        raise ValueError(
            f"AffineSubspaceTransform: A must have the same rank < n across the batch "
            f"(ranks {int(ranks.min())}..{r}, n = {n})."
        )
    coef = (U[..., :r].transpose(-1, -2) @ b.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    resid = b.to(torch.float64) - (U[..., :r] @ coef.unsqueeze(-1)).squeeze(-1)
    scale = b.to(torch.float64).norm(dim=-1) + sv[..., 0] * (coef / sv[..., :r]).norm(dim=-1)
    if bool((resid.norm(dim=-1) > 100 * math.sqrt(m) * eps * scale).any()):
        raise ValueError("AffineSubspaceTransform: inconsistent b: A x = b has no solution.")
    x0 = ((coef / sv[..., :r]).unsqueeze(-2) @ Vh[..., :r, :]).squeeze(-2)
    basis = Vh[..., r:, :].transpose(-1, -2)
    return x0.to(A.dtype), basis.to(A.dtype)
