"""Common base class of every constrained family."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution


class ConstrainedDistribution(TorchDistribution):
    """A base distribution conditioned on ``A x = b``.

    Subclasses expose the constraint as :attr:`A` (a
    :class:`~pyro_linconstr.ops.LinearOperator`) and :attr:`b`, and their
    :attr:`mean` is the exact conditional marginal expectation
    ``E[x | A x = b]``, differentiable in the base's parameters: the
    ``"marginal"`` gradient estimator back-propagates through it. Objectives
    in :mod:`pyro_linconstr.infer` recognise constrained sites by this class.
    """

    @property
    def A(self):
        return self._A

    @property
    def b(self) -> torch.Tensor:
        return self._b

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., *event_shape) -> (..., n)``; subclasses set ``self._n``."""
        k = len(self.event_shape)
        return x.reshape(x.shape[: x.dim() - k] + (self._n,))

    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n) -> (..., *event_shape)``."""
        return x.reshape(x.shape[:-1] + self.event_shape)
