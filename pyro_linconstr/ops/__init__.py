"""Linear operators and factorizations behind the constrained families."""

from pyro_linconstr.ops.axis_sums import AxisSums
from pyro_linconstr.ops.operators import DenseOperator, GroupSum, LinearOperator, as_operator
from pyro_linconstr.ops.sparse import SparseOperator

__all__ = [
    "AxisSums",
    "DenseOperator",
    "GroupSum",
    "LinearOperator",
    "SparseOperator",
    "as_operator",
]
