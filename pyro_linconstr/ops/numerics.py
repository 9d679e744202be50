r"""Shared numerics: named tolerances, the rank / null-space routine, the empty-group check.

Every caller that needs the numerical rank of ``A``, the minimum-norm solution
of ``A x = b``, a consistency check of ``b`` or an exactness tolerance gets it
here, so that one fix reaches all of them (the Gaussian conditioning, the
orthogonal projection :func:`~pyro_linconstr.project`, the chart
:class:`~pyro_linconstr.transforms.AffineSubspaceTransform`, the support check).

**Tolerances** (``eps`` is the machine epsilon of the caller's dtype):

* :func:`exactness_constant` ``c(n) = 8 sqrt(n)``: the documented bound
  ``|A x - b| <= c eps (|A||x| + |b|)`` that every sample meets, row by row;
* :data:`OBSERVED_SLACK`: a value that went through a round trip (a
  transform, a guide, a file) passes the support check up to
  ``OBSERVED_SLACK * c``;
* :data:`RANK_RTOL`: a singular value below ``RANK_RTOL * eps * s_max`` is
  zero (the rows it belongs to are redundant);
* :data:`CONSISTENCY_RTOL`: ``b`` is consistent with a rank-deficient ``A``
  when its component outside the range of ``A`` is below
  ``CONSISTENCY_RTOL * sqrt(m) * eps`` of its scale (:func:`check_consistency`);
* :func:`redundant_pivot_tolerance`: in the pivoted Cholesky of the
  unit-diagonal gram ``D^{-1/2} A A^T D^{-1/2}`` (float64), a pivot at or below
  it marks a *candidate* redundant row. The gram squares the singular values,
  so this is ``max(RANK_RTOL * eps_64, (RANK_RTOL * eps)^2)`` per row of the
  elimination (the float64 rounding floor of an exactly redundant row, and the
  square of the SVD's rank tolerance); a candidate is dropped only after its
  reconstruction from the kept rows, computed from ``A`` itself, passes the
  SVD's ``RANK_RTOL * eps`` test (see :mod:`~pyro_linconstr.ops.conditioning`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "CONSISTENCY_RTOL",
    "OBSERVED_SLACK",
    "RANK_RTOL",
    "SVDSolution",
    "check_consistency",
    "check_empty_groups",
    "exactness_constant",
    "redundant_pivot_tolerance",
    "svd_solve",
]

RANK_RTOL = 10.0
CONSISTENCY_RTOL = 100.0
OBSERVED_SLACK = 4.0


def exactness_constant(n: int) -> float:
    """``c = 8 sqrt(n)``: samples satisfy ``|A x - b| <= c eps (|A||x| + |b|)`` row by row."""
    return 8.0 * math.sqrt(n)


def redundant_pivot_tolerance(m: int, eps: float) -> float:
    """Pivot (of a unit-diagonal float64 gram of ``m`` rows) at or below which a row is a
    candidate for redundancy: ``m * max(RANK_RTOL * eps_64, (RANK_RTOL * eps)^2)``."""
    eps64 = torch.finfo(torch.float64).eps
    return max(m, 1) * max(RANK_RTOL * eps64, (RANK_RTOL * eps) ** 2)


def check_consistency(
    resid: torch.Tensor, scale: torch.Tensor, m: int, eps: float, what: str
) -> None:
    """Raise when ``b`` leaves the range of ``A``: ``resid > CONSISTENCY_RTOL sqrt(m) eps scale``.

    :param resid: ``(...)`` norm of the component of ``b`` that no ``x`` reaches.
    :param scale: ``(...)`` the scale it is measured against (``b`` and what the
        solution makes of it).
    :param int m: rows of ``A``; :param float eps: the caller's machine epsilon.
    :param str what: the caller's name, for the message.
    """
    bad = resid > CONSISTENCY_RTOL * math.sqrt(max(m, 1)) * eps * scale
    if bool(bad.any()):
        worst = float((resid / scale.clamp_min(1e-300)).max())
        raise ValueError(
            f"{what}: inconsistent b: A x = b has no solution (b leaves the range of A, "
            f"relative residual {worst:.3g}). Fix b, or drop the contradictory rows of A."
        )


def check_empty_groups(sizes: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """Raise when a group with no entries has a nonzero target; return the mask of empty groups.

    :param sizes: ``(m,)`` entries per group.
    :param b: ``(..., m)`` targets.
    :param str what: the caller's name, for the message.
    """
    empty = sizes == 0
    if bool(empty.any()) and bool(((b != 0) & empty).any()):
        raise ValueError(
            f"{what}: inconsistent b: a group with no entries has a nonzero target sum; "
            "remove the empty group or set its b to 0."
        )
    return empty


@dataclass
class SVDSolution:
    """The SVD ``A = U diag(sv) Vh`` (float64) and the minimum-norm solution of ``A x = b``.

    :ivar keep: ``(..., k)`` bool, the singular values above the rank tolerance.
    :ivar ranks: ``(...)`` the numerical rank of each batch element.
    :ivar x0: ``(..., n)`` the minimum-norm solution ``A^+ b``.
    :ivar coef: ``(..., k)`` ``U^T b / sv`` on the kept values (0 elsewhere).
    """

    U: torch.Tensor
    sv: torch.Tensor
    Vh: torch.Tensor
    keep: torch.Tensor
    ranks: torch.Tensor
    x0: torch.Tensor
    coef: torch.Tensor

    def uniform_rank(self, what: str) -> int:
        """The rank shared by every batch element, or a ``ValueError``."""
        m, n = self.U.shape[-2], self.Vh.shape[-1]
        if self.ranks.numel() == 0:
            return min(m, n)
        lo, hi = int(self.ranks.min()), int(self.ranks.max())
        if lo != hi:
            raise ValueError(
                f"{what}: the rank of A differs across the batch ({lo} to {hi}); redundant "
                "rows can only be dropped when every batch element has the same rank."
            )
        return hi

    def pinv_apply(self, r: torch.Tensor) -> torch.Tensor:
        """``A^+ r`` for ``r`` of shape ``(..., m)`` (float64)."""
        inv = torch.where(self.keep, 1.0 / self.sv.clamp_min(torch.finfo(self.sv.dtype).tiny), 0.0)
        u = (self.U.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1) * inv
        k = u.shape[-1]
        return (self.Vh[..., :k, :].transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)


def svd_solve(
    A: torch.Tensor, b: torch.Tensor, eps: float, what: str, full_matrices: bool = False
) -> SVDSolution:
    """Rank, minimum-norm solution and consistency check of ``A x = b``, in float64.

    :param A: ``(..., m, n)``.
    :param b: ``(..., m)``.
    :param float eps: machine epsilon of the caller's dtype (sets the rank and
        consistency tolerances, see the module docstring).
    :param str what: the caller's name, for the messages.
    :param bool full_matrices: also return the null-space rows of ``Vh``.
    :raises ValueError: ``b`` leaves the range of ``A`` (no solution).
    """
    A64, b64 = A.to(torch.float64), b.to(torch.float64)
    m = A64.shape[-2]
    U, sv, Vh = torch.linalg.svd(A64, full_matrices=full_matrices)
    k = sv.shape[-1]
    U = U[..., :k]
    smax = sv[..., :1] if k else sv.new_zeros(sv.shape[:-1] + (1,))
    keep = sv > RANK_RTOL * eps * smax
    inv = torch.where(keep, 1.0 / sv.clamp_min(torch.finfo(sv.dtype).tiny), 0.0)
    proj = (U.transpose(-1, -2) @ b64.unsqueeze(-1)).squeeze(-1) * keep
    coef = proj * inv
    resid = b64 - (U @ proj.unsqueeze(-1)).squeeze(-1)
    scale = b64.norm(dim=-1) + smax.squeeze(-1) * coef.norm(dim=-1)
    check_consistency(resid.norm(dim=-1), scale, m, eps, what)
    x0 = (Vh[..., :k, :].transpose(-1, -2) @ coef.unsqueeze(-1)).squeeze(-1)
    return SVDSolution(U, sv, Vh, keep, keep.sum(-1), x0, coef)
