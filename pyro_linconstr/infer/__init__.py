"""Objectives that learn through constrained distributions (pyro.infer.SVI accepts both).

* :class:`ConstrainedTrace_ELBO`: ``Trace_ELBO`` with a chosen gradient
  estimator at constrained latent sites.
* :class:`ExpectedLoss`: the expected loss ``E[l(x, y)]`` of constrained
  samples at observed sites.
* :mod:`~pyro_linconstr.infer.estimators`: the estimators ``"reparam"``,
  ``"marginal"``, ``"score"``, ``"closed_form"``.
"""

from pyro_linconstr.infer import estimators
from pyro_linconstr.infer.expected_loss import ExpectedLoss
from pyro_linconstr.infer.trace_elbo import ConstrainedTrace_ELBO

__all__ = ["ConstrainedTrace_ELBO", "ExpectedLoss", "estimators"]
