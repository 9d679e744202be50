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
