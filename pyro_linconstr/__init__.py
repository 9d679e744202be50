"""pyro_linconstr: Pyro distributions conditioned on hard linear laws ``A x = b``."""

from pyro_linconstr import constraints, transforms
from pyro_linconstr.distributions import constrain, register_constrain
from pyro_linconstr.ops import GroupSum

__version__ = "0.1.0"

__all__ = [
    "GroupSum",
    "constrain",
    "constraints",
    "register_constrain",
    "transforms",
]
