"""Linear operators and factorizations behind the constrained families."""

from pyro_linconstr.ops.operators import DenseOperator, GroupSum, LinearOperator, as_operator

__all__ = ["DenseOperator", "GroupSum", "LinearOperator", "as_operator"]
