"""Objectives that learn through constrained distributions (pyro.infer.SVI accepts both).

* :class:`ConstrainedTrace_ELBO`: ``Trace_ELBO`` with a chosen gradient
  estimator at constrained latent sites.
* :class:`ExpectedLoss`: the expected loss ``E[l(x, y)]`` of constrained
  samples at observed sites.
* :mod:`~pyro_linconstr.infer.estimators`: the estimators ``"reparam"``,
  ``"marginal"``, ``"score"``, ``"closed_form"``.
* :class:`DistributedGroupSampler`, :func:`check_whole_groups`: data-parallel
  training with ``torch.distributed`` (:mod:`~pyro_linconstr.infer.distributed`).
"""

from pyro_linconstr.infer import estimators
from pyro_linconstr.infer.distributed import DistributedGroupSampler, check_whole_groups
from pyro_linconstr.infer.expected_loss import ExpectedLoss
from pyro_linconstr.infer.trace_elbo import ConstrainedTrace_ELBO

__all__ = [
    "ConstrainedTrace_ELBO",
    "DistributedGroupSampler",
    "ExpectedLoss",
    "check_whole_groups",
    "estimators",
]
