"""Constrained families and the :func:`constrain` registry (one family per module)."""

from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.bernoulli import ConstrainedBernoulli
from pyro_linconstr.distributions.gaussian import ConstrainedGaussian
from pyro_linconstr.distributions.poisson import ConstrainedPoisson
from pyro_linconstr.distributions.registry import constrain, register_constrain

__all__ = ["ConstrainedDistribution", "ConstrainedGaussian", "constrain", "register_constrain"]
__all__ += ["ConstrainedBernoulli", "ConstrainedPoisson"]
