"""The support of a constrained distribution: an affine subspace ``{x : A x = b}``.

``biject_to(affine_subspace(A, b))`` and ``transform_to(...)`` give
:class:`~pyro_linconstr.transforms.AffineSubspaceTransform` (registered in
:mod:`pyro_linconstr.constraint_registry`), so AutoGuides,
``pyro.param(..., constraint=...)`` and HMC/NUTS work on constrained latents.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints as _constraints

from pyro_linconstr.ops.numerics import OBSERVED_SLACK, exactness_constant
from pyro_linconstr.ops.operators import LinearOperator, as_operator

__all__ = ["affine_subspace", "residual_tolerance"]


def residual_tolerance(
    A: LinearOperator,
    x: torch.Tensor,
    b: torch.Tensor,
    eps: float | None = None,
    factor: float = OBSERVED_SLACK,
) -> torch.Tensor:
    """Row-wise tolerance ``factor * c * eps * (|A||x| + |b|)`` for ``|A x - b|``.

    ``c = 8 sqrt(n)`` is the documented exactness constant of samples
    (:func:`~pyro_linconstr.ops.numerics.exactness_constant`); the default
    ``factor = 4`` leaves room for values that went through a round trip (a
    transform, a guide) in the same dtype.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return factor * exactness_constant(A.num_cols) * eps * (A.abs_matvec(x) + b.abs())


class _AffineSubspace(_constraints.Constraint):
    """Constrain to ``{x : A x = b}`` (``x`` flattened over ``event_shape``).

    :param A: tensor ``(..., m, n)`` or operator.
    :param torch.Tensor b: ``(..., m)``.
    :param event_shape: the event shape of ``x`` (default ``(n,)``).
    """

    is_discrete = False

    def __init__(self, A, b: torch.Tensor, event_shape=None) -> None:
        self.A = as_operator(A)
        self.b = b
        n = self.A.num_cols
        self.event_shape = torch.Size((n,) if event_shape is None else event_shape)
        if math.prod(self.event_shape) != n:
            raise ValueError(
                f"affine_subspace: event_shape {tuple(self.event_shape)} has "
                f"{math.prod(self.event_shape)} entries but A has n = {n} columns."
            )
        super().__init__()

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def _flat(self, value: torch.Tensor) -> torch.Tensor:
        k = self.event_dim
        return value.reshape(value.shape[: value.dim() - k] + (self.A.num_cols,))

    def residual(self, value: torch.Tensor) -> torch.Tensor:
        """``A x - b``, evaluated in float64."""
        x = self._flat(value).to(torch.float64)
        return self.A.to(torch.float64).matvec(x) - self.b.to(torch.float64)

    def check(self, value: torch.Tensor) -> torch.Tensor:
        x = self._flat(value)
        eps = torch.finfo(x.dtype if x.is_floating_point() else torch.get_default_dtype()).eps
        x64, b64 = x.to(torch.float64), self.b.to(torch.float64)
        A64 = self.A.to(torch.float64)
        resid = (A64.matvec(x64) - b64).abs()
        tol = residual_tolerance(A64, x64, b64, eps)
        # a non-finite x makes tol non-finite (inf) or resid nan: both fail
        return ((resid <= tol) & torch.isfinite(tol)).all(-1)

    def __repr__(self) -> str:
        m, n = self.A.num_rows, self.A.num_cols
        return f"affine_subspace(A: {m}x{n}, event_shape={tuple(self.event_shape)})"


affine_subspace = _AffineSubspace
