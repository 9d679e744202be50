"""pyro_linconstr: Pyro distributions conditioned on hard linear laws ``A x = b``."""

import pyro_linconstr.constraint_registry  # noqa: F401  (registers biject_to / transform_to)
from pyro_linconstr import constraints, infer, transforms
from pyro_linconstr.distributions import ZeroSumNormal, constrain, register_constrain
from pyro_linconstr.handlers import LinearConstraint
from pyro_linconstr.ops import AxisSums, GroupSum
from pyro_linconstr.ops.project import project
from pyro_linconstr.reconcile import reconcile

__version__ = "0.1.0"

__all__ = [
    "AxisSums",
    "GroupSum",
    "LinearConstraint",
    "ZeroSumNormal",
    "constrain",
    "constraints",
    "infer",
    "project",
    "reconcile",
    "register_constrain",
    "transforms",
]
