"""Orthogonal projection onto an affine subspace ``{x : A x = b}``."""

from __future__ import annotations

import torch

from pyro_linconstr.ops.numerics import check_empty_groups, svd_solve
from pyro_linconstr.ops.operators import GroupSum, LinearOperator, as_operator

__all__ = ["project"]


def project(x: torch.Tensor, A: torch.Tensor | LinearOperator, b: torch.Tensor) -> torch.Tensor:
    r"""Orthogonal (Euclidean) projection of ``x`` onto ``{y : A y = b}``.

    .. math::

        \operatorname{proj}(x) = \arg\min_{A y = b} \|y - x\|_2
            = x - A^{+} (A x - b),

    with :math:`A^{+}` the Moore-Penrose pseudo-inverse
    (:math:`A^T (A A^T)^{-1}` when ``A`` has full row rank). For a sum
    constraint it subtracts each group's mean excess,
    ``x_i - (sum_{j in g} x_j - b_g) / |g|``.

    Use it to clean observed data that satisfies ``A x = b`` only up to
    rounding before passing it to a constrained site (an observation that
    violates the constraint beyond the tolerance of
    :func:`~pyro_linconstr.constraints.residual_tolerance` is an error), or as
    the "orthogonal projection" baseline (KKT-hPINN) of the paper. It is
    differentiable in ``x`` and ``b``.

    * :class:`~pyro_linconstr.GroupSum`: ``O(n)``, no matrix is formed; an
      empty group must have ``b_g = 0``.
    * dense ``A`` ``(..., m, n)``, batched: an SVD of ``A`` in float64;
      redundant rows of a rank-deficient ``A`` are allowed when ``b`` is
      consistent with them.

    The correction is computed in float64 with one step of iterative
    refinement, and the result is returned in the dtype of ``x`` (the default
    dtype for an integer ``x``), so it satisfies the constraint to the
    exactness tolerance of the constrained families.

    :param torch.Tensor x: points ``(..., n)``.
    :param A: tensor ``(..., m, n)`` or an operator such as
        :class:`~pyro_linconstr.GroupSum`.
    :param torch.Tensor b: right-hand side ``(..., m)``; leading dims of ``x``,
        ``A`` and ``b`` broadcast.
    :returns: the projected points, shape ``broadcast(x, A, b)`` batch ``+ (n,)``.
    :raises ValueError: for ill-shaped inputs, non-finite values, or an
        inconsistent ``b`` (``A y = b`` has no solution).

    Example::

        >>> import torch, pyro_linconstr as plc
        >>> x = torch.tensor([0.31, 0.52, 0.18])  # shares rounded to 2 digits
        >>> y = plc.project(x, torch.ones(1, 3), torch.tensor([1.0]))
        >>> y
        tensor([0.3067, 0.5167, 0.1767])
        >>> float(y.sum())
        1.0
        >>> groups = torch.tensor([0, 0, 1, 1])
        >>> plc.project(torch.tensor([1.0, 3.0, 2.0, 2.0]), plc.GroupSum(groups, 2), torch.zeros(2))
        tensor([-1.,  1.,  0.,  0.])
    """
    A = as_operator(A)
    if not isinstance(x, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("project: x and b must be torch.Tensors.")
    n, m = A.num_cols, A.num_rows
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(
            f"project: x must have shape (..., n) with n = {n} (the columns of A), "
            f"got shape {tuple(x.shape)}; flatten multi-dimensional events first."
        )
    if b.dim() < 1 or b.shape[-1] != m:
        raise ValueError(
            f"project: b must have shape (..., m) with m = {m} (the rows of A), "
            f"got shape {tuple(b.shape)}."
        )
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(b).all()):
        raise ValueError("project: x or b has non-finite entries (nan or inf).")
    x64, b64 = x.to(torch.float64), b.to(torch.float64)
    A64 = A.to(torch.float64)
    if isinstance(A64, GroupSum):
        correct = _groupsum_solver(A64, b64)
    else:
        correct = _dense_solver(A64.to_dense(), b64, orig_eps=torch.finfo(dtype).eps)
    y = x64 - correct(A64.matvec(x64) - b64)
    y = y - correct(A64.matvec(y) - b64)  # iterative refinement
    return y.to(dtype)


def _groupsum_solver(A: GroupSum, b: torch.Tensor):
    sizes = A.group_sizes().to(torch.float64)
    empty = check_empty_groups(sizes, b, "project")
    inv = torch.where(empty, torch.zeros_like(sizes), 1.0 / sizes.clamp_min(1.0))
    return lambda r: A.rmatvec(r * inv)


def _dense_solver(A: torch.Tensor, b: torch.Tensor, orig_eps: float):
    if not bool(torch.isfinite(A).all()):
        raise ValueError("project: A has non-finite entries (nan or inf).")
    return svd_solve(A, b, orig_eps, "project").pinv_apply
