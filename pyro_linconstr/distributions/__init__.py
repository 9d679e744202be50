"""Constrained families and the :func:`constrain` registry (one family per module)."""

from pyro_linconstr.distributions import kl  # noqa: F401  (registers kl_divergence)
from pyro_linconstr.distributions.base import ConstrainedDistribution
from pyro_linconstr.distributions.bernoulli import ConstrainedBernoulli
from pyro_linconstr.distributions.gaussian import ConstrainedGaussian
from pyro_linconstr.distributions.poisson import ConstrainedPoisson
from pyro_linconstr.distributions.registry import constrain, register_constrain
from pyro_linconstr.distributions.zero_sum import ZeroSumNormal

__all__ = ["ConstrainedDistribution", "ConstrainedGaussian", "constrain", "register_constrain"]
__all__ += ["ConstrainedBernoulli", "ConstrainedPoisson", "ZeroSumNormal"]
