r"""Closed-form KL divergences between constrained distributions on the same support.

``torch.distributions.kl_divergence(p, q)`` (and with it
:class:`pyro.infer.TraceMeanField_ELBO`) works for two constrained
distributions of the same family whose supports are equal; the registrations
here happen on ``import pyro_linconstr``:

* :class:`~pyro_linconstr.distributions.ConstrainedGaussian` against
  :class:`~pyro_linconstr.distributions.ConstrainedGaussian` (any pair of
  covariance structures);
* :class:`~pyro_linconstr.distributions.ConstrainedPoisson` against
  :class:`~pyro_linconstr.distributions.ConstrainedPoisson`;
* :class:`~pyro_linconstr.distributions.ConstrainedBernoulli` against
  :class:`~pyro_linconstr.distributions.ConstrainedBernoulli` (Bernoulli and
  Binomial bases; a Bernoulli is a Binomial with ``total_count = 1``).

**Different supports.** When the supports differ (two Gaussians on different
affine subspaces, discrete laws with different groups, totals or
``total_count``), ``p`` puts its mass where ``q`` has none and the divergence
is infinite: a ``ValueError`` says so and shows what differs. Other pairs (a
constrained law against an unconstrained one, two different families) are not
registered: ``kl_divergence`` raises ``NotImplementedError``, and
``TraceMeanField_ELBO`` falls back to sampling, as for any pair without a
closed form.

**Gaussian.** Both laws live on ``{x : A x = b}`` of dimension
``d = n - r`` (``r`` the rank of ``A``); write ``m``, ``C`` for a conditional
mean and covariance, ``Sigma``, ``S = A Sigma A^T`` for the base covariance
and its gram, and ``c = 1/2 log det S + (r/2) log 2 pi - 1/2 log det(A A^T)``
for the normaliser of the density identity
``log p(x | A x = b) = log N(x - m; 0, Sigma) + c`` on the subspace (see
:class:`~pyro_linconstr.distributions.ConstrainedGaussian`). Taking
``E_p[log p - log q]`` of that identity, with
``E_p[(x - m_p)^T Sigma_p^{-1} (x - m_p)] = tr(Sigma_p^{-1} C_p) = d``:

.. math::

    \mathrm{KL}(p \,\|\, q) = \tfrac12 \big[\operatorname{tr}(\Sigma_q^{-1} C_p) - d
    + \delta^\top \Sigma_q^{-1} \delta + \log\det\Sigma_q - \log\det\Sigma_p\big]
    + c_p - c_q, \qquad \delta = m_p - m_q,

which equals the textbook
``1/2 [tr(C_q^+ C_p) - d + delta^T C_q^+ delta + log pdet C_q - log pdet C_p]``
in the subspace's coordinates, and is invariant when ``(A, b)`` of either law
is replaced by ``(T A, T b)``. It never forms ``C`` or a null-space basis:

* diagonal ``Sigma_p``, ``Sigma_q`` (any ``A``):
  ``tr(Sigma_q^{-1} C_p) - d = sum_i (s_p,i / s_q,i - 1) v_i / s_p,i`` with
  ``v = p.variance``, so the cost is that of the conditional variances:
  ``O(n)`` with a :class:`~pyro_linconstr.GroupSum`, ``O(n m^2)`` with a dense
  ``A``; summed in float64, exactly 0 for ``p = q``;
* otherwise ``tr(Sigma_q^{-1} C_p) = tr(Sigma_q^{-1} Sigma_p) -
  tr(Sigma_q^{-1} K_p S_p^{-1} K_p^T)`` (``K = Sigma A^T``) with solves by each
  structure (elementwise, Woodbury, Cholesky): ``O(n m (m + r))`` for low
  rank ``r``, ``O(n^3)`` with a full covariance.

It is differentiable in every parameter of both laws.

**Same subspace.** ``A`` of both laws is compared first as rows (the same
operator, equal :class:`~pyro_linconstr.GroupSum` groups, equal
:class:`~pyro_linconstr.AxisSums`, or equal dense matrices): then ``b`` must
agree row by row up to the support tolerance
:func:`~pyro_linconstr.constraints.residual_tolerance` evaluated at ``p``'s
mean (``4 c eps (|A| |m_p| + |b|)``, ``c = 8 sqrt(n)``, ``eps`` of the
coarser dtype). Otherwise both are orthonormalised in float64
(:func:`~pyro_linconstr.ops.numerics.svd_solve`, ``O(m^2 n)``): the ranks
must agree, the largest sine of the principal angles between the row spaces
must stay below ``CONSISTENCY_RTOL sqrt(n) eps kappa`` and the least-norm
points of the two subspaces must agree up to ``2 OBSERVED_SLACK c eps kappa
|x0|`` (``kappa`` the larger condition number of the two ``A``). So
``(T A, T b)`` for an invertible ``T`` is the same support.

**Poisson.** Each group is a multinomial, and for two multinomials with the
same total ``sum_i E_p[x_i] log(p_i / q_i) = sum_i D(E_p x_i, E_q x_i)``
with ``D(x, mu) = x log(x / mu) - x + mu >= 0`` (the terms ``mu - x`` sum to 0
per group); an entry in no group keeps its Poisson law, whose KL is the same
``D(rate_p, rate_q)``. So ``KL = sum_i D(E_p x_i, E_q x_i)`` in float64:
termwise non-negative, ``O(n)``, infinite where ``q`` gives probability 0 to
an entry ``p`` can reach.

**Bernoulli / Binomial.** With logits ``l``, trials ``N`` and per-group
normalisers ``log Z`` (the dynamic program of the family), the binomial
coefficients cancel:

.. math::

    \mathrm{KL} = \sum_i E_p[x_i] (l_{p,i} - l_{q,i})
    + \sum_i N_i \big(\log\sigma(-l_{p,i}) - \log\sigma(-l_{q,i})\big)
    - \log Z_p + \log Z_q,

with ``E_p[x]`` = ``p.mean``, exact from the dynamic program. Since
``log p(x) - log q(x) = x . (l_p - l_q) + const`` on the support, the
constant ``- log Z_p + log Z_q + sum_i N_i (...)`` is read off one support
point ``x0`` near ``E_p[x]`` (largest remainders of ``p.mean`` per group)
through the families' own ``log_prob``:
``KL = (E_p[x] - x0) . (l_p - l_q) + log p(x0) - log q(x0)``, ``O(n k)``.

Example::

    >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
    >>> from torch.distributions import kl_divergence
    >>> A, b = torch.ones(1, 3), torch.zeros(1)
    >>> p = plc.constrain(dist.Normal(torch.zeros(3), 1.0).to_event(1), A, b)
    >>> q = plc.constrain(dist.Normal(torch.zeros(3), 2.0).to_event(1), A, b)
    >>> round(float(kl_divergence(p, q)), 4)  # d = 2 dimensions, each 1/2 (1/4 - 1 + log 4)
    0.6363
    >>> r = plc.constrain(dist.Normal(torch.zeros(3), 1.0).to_event(1), A, b + 1)
    >>> kl_divergence(p, r)
    Traceback (most recent call last):
    ...
    ValueError: kl_divergence(ConstrainedGaussian, ConstrainedGaussian): the supports differ, ...

**References:** R. Li, D. R. Sahu, G. Van den Broeck, Z. Zeng, "Learning Deep
Generative Models under Hard Linear Equality Constraints", NeSy 2026
(arXiv:2502.05416).
"""

from __future__ import annotations

import math

import torch
from torch.distributions.kl import register_kl

from pyro_linconstr.constraints import residual_tolerance
from pyro_linconstr.distributions.bernoulli import ConstrainedBernoulli
from pyro_linconstr.distributions.gaussian import ConstrainedGaussian
from pyro_linconstr.distributions.poisson import ConstrainedPoisson
from pyro_linconstr.ops.axis_sums import AxisSums
from pyro_linconstr.ops.conditioning import Conditioning
from pyro_linconstr.ops.covariance import (
    Covariance,
    DenseCovariance,
    DiagonalCovariance,
    LowRankCovariance,
)
from pyro_linconstr.ops.numerics import (
    CONSISTENCY_RTOL,
    OBSERVED_SLACK,
    exactness_constant,
    svd_solve,
)
from pyro_linconstr.ops.operators import DenseOperator, GroupSum, LinearOperator

__all__ = ["check_same_subspace"]

_F64 = torch.float64


def _infinite(p, q, detail: str) -> ValueError:
    return ValueError(
        f"kl_divergence({type(p).__name__}, {type(q).__name__}): the supports differ, so "
        f"KL(p || q) is infinite (p puts its mass where q has none): {detail}. Condition "
        "both on the same law A x = b."
    )


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first ``True`` of ``mask``."""
    return tuple(int(i) for i in mask.nonzero()[0])


def _at(batch_index: tuple[int, ...]) -> str:
    """``' at batch index (i, j)'`` (``''`` for an empty index)."""
    return f" at batch index {batch_index}" if batch_index else ""


def _where(mask: torch.Tensor) -> str:
    """``' at batch index (i, j)'`` of the first ``True`` of a batch mask (``''`` if 0-d)."""
    return _at(_first(mask)) if mask.dim() else ""


# --------------------------------------------------------------------------- Gaussian
def check_same_subspace(p: ConstrainedGaussian, q: ConstrainedGaussian) -> None:
    """Raise a ``ValueError`` unless ``p`` and ``q`` live on the same affine subspace.

    See the module docstring for the tolerances. Batch shapes broadcast; the
    first batch element that differs is named.
    """
    _check_event_and_batch(p, q)
    eps = max(torch.finfo(p.loc.dtype).eps, torch.finfo(q.loc.dtype).eps)
    if _same_rows(p.A, q.A):
        _check_same_b(p, q, eps)
    else:
        _check_same_affine(p, q, eps)


def _same_rows(Ap: LinearOperator, Aq: LinearOperator) -> bool:
    """Whether the two operators are the same matrix (row by row)."""
    if Ap is Aq:
        return True
    if Ap.num_rows != Aq.num_rows or Ap.num_cols != Aq.num_cols:
        return False
    if isinstance(Ap, GroupSum) and isinstance(Aq, GroupSum):
        return Ap.groups is Aq.groups or torch.equal(Ap.groups, Aq.groups)
    if isinstance(Ap, AxisSums) and isinstance(Aq, AxisSums):
        return Ap.event_shape == Aq.event_shape and tuple(Ap.axes) == tuple(Aq.axes)
    if isinstance(Ap, DenseOperator) and isinstance(Aq, DenseOperator):
        Mp, Mq = Ap.matrix, Aq.matrix
        if Mp is Mq:
            return True
        if Mp.layout != torch.strided or Mq.layout != torch.strided:
            Mp, Mq = Mp.to_dense(), Mq.to_dense()
        try:
            return bool((Mp.to(_F64) == Mq.to(_F64)).all())
        except RuntimeError:  # batch shapes that do not broadcast
            return False
    return False


def _check_same_b(p: ConstrainedGaussian, q: ConstrainedGaussian, eps: float) -> None:
    """Same rows of ``A``: ``b`` must agree row by row up to the support tolerance."""
    A64 = p.A.to(_F64)
    bp, bq = p.b.to(_F64), q.b.to(_F64)
    x = p._mean_w.detach().to(_F64)
    diff = (bp - bq).abs()
    tol = residual_tolerance(A64, x, torch.maximum(bp.abs(), bq.abs()), eps)
    bad = diff > tol
    if bool(bad.any()):
        idx = _first(bad)
        raise _infinite(
            p,
            q,
            f"A is the same, but b differs: row {idx[-1]} has b_p = "
            f"{float(bp.broadcast_to(bad.shape)[idx]):.6g} and b_q = "
            f"{float(bq.broadcast_to(bad.shape)[idx]):.6g}{_at(idx[:-1])} (difference "
            f"{float(diff[idx]):.3g}, beyond the support tolerance "
            f"{float(tol.broadcast_to(bad.shape)[idx]):.3g})",
        )


def _check_same_affine(p: ConstrainedGaussian, q: ConstrainedGaussian, eps: float) -> None:
    """Different matrices: compare row spaces and least-norm points in float64."""
    n = p._n
    sols, ranks, kappas = [], [], []
    for d in (p, q):
        sol = svd_solve(d.A.to_dense().to(_F64), d.b.to(_F64), eps, "kl_divergence")
        r = sol.uniform_rank("kl_divergence")
        sols.append(sol)
        ranks.append(r)
        if r:
            kappas.append(float((sol.sv[..., 0] / sol.sv[..., r - 1]).max()))
    if ranks[0] != ranks[1]:
        raise _infinite(
            p,
            q,
            f"A has different row spaces: the rank of A is {ranks[0]} for p and {ranks[1]} "
            f"for q (subspaces of dimension {n - ranks[0]} and {n - ranks[1]})",
        )
    r = ranks[0]
    kappa = max(kappas, default=1.0)
    Vp, Vq = sols[0].Vh[..., :r, :], sols[1].Vh[..., :r, :]
    outside = Vq - (Vq @ Vp.transpose(-1, -2)) @ Vp
    sine = torch.linalg.matrix_norm(outside, ord=2) if r else outside.new_zeros(())
    tol_angle = CONSISTENCY_RTOL * math.sqrt(n) * eps * kappa
    if bool((sine > tol_angle).any()):
        raise _infinite(
            p,
            q,
            f"A has different row spaces: the largest principal angle between them has sine "
            f"{float(sine.max()):.3g}{_where(sine > tol_angle)} (tolerance {tol_angle:.3g})",
        )
    x0p, x0q = sols[0].x0, sols[1].x0
    dist = (x0p - x0q).norm(dim=-1)
    scale = torch.maximum(x0p.norm(dim=-1), x0q.norm(dim=-1))
    tol_x = 2 * OBSERVED_SLACK * exactness_constant(n) * eps * kappa * scale
    bad = dist > tol_x
    if bool(bad.any()):
        raise _infinite(
            p,
            q,
            "A has the same row space, but b differs: the points of least norm of the two "
            f"subspaces are {float(dist.max()):.3g} apart{_where(bad)} (tolerance "
            f"{float(tol_x.broadcast_to(dist.shape)[bad].flatten()[0]):.3g})",
        )


@register_kl(ConstrainedGaussian, ConstrainedGaussian)
def _kl_constrained_gaussian(p: ConstrainedGaussian, q: ConstrainedGaussian) -> torch.Tensor:
    check_same_subspace(p, q)
    batch_shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    dtype = torch.promote_types(p.loc.dtype, q.loc.dtype)
    if isinstance(p.covariance, DiagonalCovariance) and isinstance(
        q.covariance, DiagonalCovariance
    ):
        kl = _kl_diagonal(p, q)
    else:
        kl = _kl_general(p, q)
    return kl.to(dtype).expand(batch_shape)


def _normalizer_difference(cp: Conditioning, cq: Conditioning) -> torch.Tensor:
    """``c_p - c_q`` in float64 (group by group for two diagonal grams)."""
    if cp.gram_diag is not None and cq.gram_diag is not None and _same_rows(cp.A, cq.A):
        logs = cp.gram_diag.to(_F64).log() - cq.gram_diag.to(_F64).log()
        if cp.mask is not None:
            logs = logs.where(cp.mask, 0.0)
        return 0.5 * logs.sum(-1)
    out = cp.log_normalizer().to(_F64) - cq.log_normalizer().to(_F64)
    return out


def _kl_diagonal(p: ConstrainedGaussian, q: ConstrainedGaussian) -> torch.Tensor:
    """Two diagonal covariances: ``O(n)`` terms from the conditional variances, in float64."""
    sp, sq = p.covariance.scale.to(_F64), q.covariance.scale.to(_F64)
    log_ratio = 2 * (sp.log() - sq.log())  # log(s_p / s_q), s the variances
    retained = p._cond.variance().to(_F64) / sp.square()  # v_i / s_p,i in [0, 1]
    delta = p._mean_w.to(_F64) - q._mean_w.to(_F64)
    terms = torch.expm1(log_ratio) * retained - log_ratio + (delta / sq).square()
    return 0.5 * terms.sum(-1) + _normalizer_difference(p._cond, q._cond)


# solves with a covariance structure ---------------------------------------------------
def _as_known(cov: Covariance) -> Covariance:
    """A structure this module knows; any other subclass is densified through ``A Sigma``."""
    if isinstance(cov, (DiagonalCovariance, LowRankCovariance, DenseCovariance)):
        return cov
    eye = torch.eye(cov.n, dtype=cov.dtype, device=cov.device)
    dense = cov.cross_matrix(DenseOperator(eye))
    return DenseCovariance(torch.linalg.cholesky(0.5 * (dense + dense.transpose(-1, -2))))


def _woodbury_parts(cov: LowRankCovariance):
    """``D^{-1} W`` and the Cholesky factor of the capacitance ``I + W^T D^{-1} W``."""
    W, d = cov.factor, cov.diag
    DinvW = W / d.unsqueeze(-1)
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    L_C = torch.linalg.cholesky(eye + W.transpose(-1, -2) @ DinvW)
    return DinvW, L_C


def _solve(cov: Covariance, M: torch.Tensor) -> torch.Tensor:
    """``Sigma^{-1} M`` for ``M`` of shape ``(..., n, k)`` (differentiable in both)."""
    if isinstance(cov, DiagonalCovariance):
        return M / cov.var.unsqueeze(-1)
    if isinstance(cov, LowRankCovariance):
        DinvW, L_C = _woodbury_parts(cov)
        DinvM = M / cov.diag.unsqueeze(-1)
        inner = torch.cholesky_solve(cov.factor.transpose(-1, -2) @ DinvM, L_C)
        return DinvM - DinvW @ inner
    L = cov.scale_tril
    batch = torch.broadcast_shapes(L.shape[:-2], M.shape[:-2])
    return torch.cholesky_solve(M.expand(batch + M.shape[-2:]), L.expand(batch + L.shape[-2:]))


def _diag_inverse(cov: Covariance) -> torch.Tensor:
    """``diag(Sigma^{-1})``, shape ``(..., n)``."""
    if isinstance(cov, DiagonalCovariance):
        return cov.var.reciprocal()
    if isinstance(cov, LowRankCovariance):
        DinvW, L_C = _woodbury_parts(cov)
        V = torch.linalg.solve_triangular(L_C, DinvW.transpose(-1, -2), upper=False)
        return cov.diag.reciprocal() - V.square().sum(-2)
    L = cov.scale_tril
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False).square().sum(-2)


def _trace_inverse(cq: Covariance, cp: Covariance) -> torch.Tensor:
    """``tr(Sigma_q^{-1} Sigma_p)``."""
    if isinstance(cq, DiagonalCovariance):
        return (cp.diagonal() / cq.var).sum(-1)
    if isinstance(cp, DiagonalCovariance):
        return (_diag_inverse(cq) * cp.var).sum(-1)
    if isinstance(cp, LowRankCovariance):
        W = cp.factor
        return (_diag_inverse(cq) * cp.diag).sum(-1) + (_solve(cq, W) * W).sum((-2, -1))
    L = cp.scale_tril
    return (_solve(cq, L) * L).sum((-2, -1))


def _solve_gram(cond: Conditioning, R: torch.Tensor) -> torch.Tensor:
    """``S^{-1} R`` for ``R`` of shape ``(..., r, k)`` over the kept rows (0 on dropped ones)."""
    if cond.gram_diag is None:
        S = cond.S
        batch = torch.broadcast_shapes(S.shape[:-2], R.shape[:-2])
        return cond.solve_columns(R.expand(batch + R.shape[-2:]))
    out = R / cond.safe_gram_diag().unsqueeze(-1)
    return out if cond.mask is None else torch.where(cond.mask.unsqueeze(-1), out, 0.0)


def _kl_general(p: ConstrainedGaussian, q: ConstrainedGaussian) -> torch.Tensor:
    """Any pair of structures, in the working dtype of ``p``'s conditioning."""
    cp = p._cond
    w = torch.promote_types(torch.promote_types(p.loc.dtype, q.loc.dtype), cp.wd)
    if cp.wd != w:  # a float32 p against a float64 q: factor p again in float64
        cp = Conditioning(p.covariance.to(w), cp.A_orig.to(w), cp.b_orig.to(w))
    cov_p = _as_known(cp.cov)
    cov_q = _as_known(q.covariance.to(w))
    KT = cov_p.cross_matrix(cp.A.to(w))  # (..., r, n) = (Sigma_p A^T)^T
    Z = _solve_gram(cp, KT)  # S_p^{-1} K_p^T
    gain_trace = (_solve(cov_q, KT.transpose(-1, -2)) * Z.transpose(-1, -2)).sum((-2, -1))
    trace = _trace_inverse(cov_q, cov_p) - gain_trace  # tr(Sigma_q^{-1} C_p)
    dim = p._n - cp.rank
    delta = p._mean_w.to(w) - q._mean_w.to(w)
    quad = (delta * _solve(cov_q, delta.unsqueeze(-1)).squeeze(-1)).sum(-1)
    logdet = cov_q.logdet() - cov_p.logdet()
    kl = 0.5 * (trace - dim + quad + logdet)
    return kl.to(_F64) + _normalizer_difference(cp, q._cond)


def _check_event_and_batch(p, q) -> None:
    """The same event shape (else the divergence is infinite) and broadcastable batch shapes."""
    if p.event_shape != q.event_shape:
        raise _infinite(
            p, q, f"the event shapes differ ({tuple(p.event_shape)} vs {tuple(q.event_shape)})"
        )
    try:
        torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"kl_divergence: the batch shapes {tuple(p.batch_shape)} and "
            f"{tuple(q.batch_shape)} do not broadcast."
        ) from None


# --------------------------------------------------------------------------- discrete
def _check_same_groups(p, q) -> None:
    """Same event, same partition into groups (and uncovered entries), same totals."""
    _check_event_and_batch(p, q)
    lp, lq = p._layout, q._layout
    gp, gq = lp.groups, lq.groups
    if lp is lq or (lp.num_groups == lq.num_groups and torch.equal(gp, gq)):
        tp, tq = torch.broadcast_tensors(p._totals, q._totals)
        bad = tp != tq
        if bool(bad.any()):
            idx = _first(bad)
            raise _infinite(
                p,
                q,
                f"the group totals differ: group {idx[-1]} sums to {int(tp[idx])} under p "
                f"and {int(tq[idx])} under q{_at(idx[:-1])}",
            )
        return
    # different group ids: the same partition when g_p(i) <-> g_q(i) is a bijection
    cov_p, cov_q = gp >= 0, gq >= 0
    if not torch.equal(cov_p, cov_q):
        i = int((cov_p != cov_q).nonzero()[0])
        who = "p" if bool(cov_p[i]) else "q"
        raise _infinite(p, q, f"the groups differ: entry {i} is in a group under {who} only")
    pairs = torch.stack([gp[cov_p], gq[cov_q]], -1)
    n_pairs = torch.unique(pairs, dim=0).shape[0]
    if n_pairs != torch.unique(pairs[:, 0]).numel() or n_pairs != torch.unique(pairs[:, 1]).numel():
        raise _infinite(p, q, "the groups differ: the rows of A partition the entries differently")
    tp, tq = torch.broadcast_tensors(_per_entry(lp, p._totals), _per_entry(lq, q._totals))
    bad = (tp != tq) & cov_p
    if bool(bad.any()):
        idx = _first(bad)
        raise _infinite(
            p,
            q,
            f"the group totals differ: the group of entry {idx[-1]} sums to {int(tp[idx])} "
            f"under p and {int(tq[idx])} under q{_at(idx[:-1])}",
        )


def _per_entry(layout, per_group: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(..., m) -> (..., n)``: entry ``i`` gets its group's value, uncovered ones ``fill``."""
    extra = per_group.new_full(per_group.shape[:-1] + (1,), fill)
    index = torch.where(layout.groups >= 0, layout.groups, layout.num_groups)
    return torch.cat([per_group, extra], -1).index_select(-1, index)


def _poisson_means64(d: ConstrainedPoisson) -> torch.Tensor:
    """``E[x_i]`` in float64: ``k_g rate_i / Lambda_g``, or ``rate_i`` for an uncovered entry."""
    layout = d._layout
    rate = d.rate.to(_F64)
    lam = layout.group_sum(rate)
    k = d._totals.to(_F64)
    scale = torch.where(lam > 0, k / torch.where(lam > 0, lam, torch.ones_like(lam)), 0.0)
    return rate * _per_entry(layout, scale, fill=1.0)


def _deviance(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``D(x, mu) = x log(x / mu) - x + mu >= 0`` elementwise, as ``mu [(1 + t) log1p(t) - t]``
    with ``t = x / mu - 1`` (no cancellation near ``x = mu``); ``D(0, mu) = mu``,
    ``D(x > 0, 0) = inf``."""
    pos_x, pos_mu = x > 0, mu > 0
    both = pos_x & pos_mu
    mu_safe = torch.where(pos_mu, mu, torch.ones_like(mu))
    t = torch.where(both, (x - mu_safe) / mu_safe, torch.zeros_like(x))
    dev = mu_safe * ((1 + t) * torch.log1p(t) - t)
    dev = torch.where(pos_x, dev, torch.where(pos_mu, mu, torch.zeros_like(mu)))
    return torch.where(pos_x & ~pos_mu, torch.full_like(dev, math.inf), dev)


@register_kl(ConstrainedPoisson, ConstrainedPoisson)
def _kl_constrained_poisson(p: ConstrainedPoisson, q: ConstrainedPoisson) -> torch.Tensor:
    _check_same_groups(p, q)
    batch_shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    mp = _poisson_means64(p)
    mq = _poisson_means64(q)
    # an entry of a q-group is read through q's layout; the same partition makes them line up
    kl = _deviance(*torch.broadcast_tensors(mp, mq)).sum(-1)
    dtype = torch.promote_types(p.rate.dtype, q.rate.dtype)
    return kl.to(dtype).expand(batch_shape)


@register_kl(ConstrainedBernoulli, ConstrainedBernoulli)
def _kl_constrained_bernoulli(p: ConstrainedBernoulli, q: ConstrainedBernoulli) -> torch.Tensor:
    _check_same_groups(p, q)
    Np, Nq = p.total_count, q.total_count
    Np, Nq = torch.broadcast_tensors(Np, Nq)
    bad = Np != Nq
    if bool(bad.any()):
        idx = _first(bad)
        raise _infinite(
            p,
            q,
            f"total_count differs: entry {idx[-1]} has {int(Np[idx])} trials under p and "
            f"{int(Nq[idx])} under q{_at(idx[:-1])}",
        )
    batch_shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    # log p(x) - log q(x) = x . (l_p - l_q) + C on the support (the binomial coefficients
    # cancel): C from one support point x0 near E_p[x], through the families' log_prob
    mean = p._flat(p.mean).to(_F64)
    x0 = _support_point(p, mean.detach())
    value = p._unflat(x0.to(p.logits.dtype))
    log_ratio = p.log_prob(value).to(_F64) - q.log_prob(value).to(_F64)
    dl = p.logits.to(_F64) - q.logits.to(_F64)
    kl = ((mean - x0) * dl).sum(-1) + log_ratio
    dtype = torch.promote_types(p.logits.dtype, q.logits.dtype)
    return kl.to(dtype).expand(batch_shape)


def _support_point(d: ConstrainedBernoulli, mean: torch.Tensor) -> torch.Tensor:
    """An integer point of the support near ``mean`` (float64, ``batch + (n,)``).

    Largest remainders: ``floor(mean)`` plus one on the entries of each group
    with the largest fractional parts until the group reaches its total; if
    rounding of ``mean`` defeats that, the greedy fill of each group in order.
    Uncovered entries take ``round(mean)``.
    """
    layout = d._layout
    N = d.total_count.to(_F64).expand(mean.shape)
    k = d._totals.to(_F64).expand(mean.shape[:-1] + d._totals.shape[-1:])
    base = torch.minimum(mean.clamp_min(0), N).floor()
    room = layout.pad(torch.where(base < N, mean - base, -math.inf), -math.inf)  # (..., m, S)
    need = k - layout.group_sum(base)  # (..., m)
    rank = room.argsort(-1, descending=True).argsort(-1)
    add = (rank < need.unsqueeze(-1)) & (room > -math.inf)
    x0 = base + layout.unpad(add.to(_F64))
    if not bool((layout.group_sum(x0) == k).all()):  # greedy fill, in entry order
        Np = layout.pad(N, 0.0)
        before = Np.cumsum(-1) - Np
        x0 = layout.unpad(torch.minimum((k.unsqueeze(-1) - before).clamp_min(0), Np))
    if not layout.all_covered:
        free = torch.minimum(mean.clamp_min(0), N).round()
        x0 = torch.where(layout.covered, x0, free)
    return x0
