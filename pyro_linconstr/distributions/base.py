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

    Subclasses store their constructor's arguments as ``self._init_args``:
    pickling and ``copy.deepcopy`` rebuild the distribution from them (and
    re-expand it), so a distribution pickles in every state, before or after
    sampling, whatever caches it holds.
    """

    _init_args: tuple

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

    # ---------------------------------------------------- values known valid
    def mark_valid(self, value: torch.Tensor) -> None:
        """Record that ``value`` (this very tensor, unmodified) lies on the support.

        :meth:`log_prob` then skips re-validating it: our own samples, and an
        observation that :class:`~pyro_linconstr.LinearConstraint` already checked.
        """
        self._valid_value = (value, value._version)

    def is_marked_valid(self, value: torch.Tensor) -> bool:
        known = self.__dict__.get("_valid_value")
        return known is not None and known[0] is value and value._version == known[1]

    # ------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        return {"init_args": self._init_args, "batch_shape": self.batch_shape}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["init_args"])
        if self.batch_shape != state["batch_shape"]:
            self.__dict__.update(self.expand(state["batch_shape"]).__dict__)
