r"""Coherent forecasts of a hierarchy: :func:`reconcile`.

A hierarchy of time series (national employment = private + government, private
= goods-producing + private services, ...) is written with Hyndman's *summing
matrix* ``S`` (``n_total x n_bottom``): every series is ``y = S b`` for the
vector ``b`` of bottom-level series, with the aggregate series first and the
bottom series last, so the last ``n_bottom`` rows of ``S`` are the identity.
Forecasts made series by series do not add up. The aggregation identities read
``A y = 0`` with ``A = [I_agg, -S_agg]`` (one row per aggregate), and
:func:`reconcile` returns the forecast *conditioned* on them with
:func:`~pyro_linconstr.constrain`.

**Why conditioning is MinT.** For a Gaussian forecast ``N(y_hat, W)`` the
conditional mean is ``y_hat - W A^T (A W A^T)^{-1} A y_hat``, which equals the
MinT reconciliation ``S (S^T W^{-1} S)^{-1} S^T W^{-1} y_hat`` (Wickramasuriya,
Athanasopoulos and Hyndman 2019): both are the projection onto the coherent
subspace ``{S b}`` that is orthogonal in the ``W^{-1}`` metric. ``W = I`` gives
OLS reconciliation, a diagonal ``W`` gives WLS. The conditional covariance
``W - W A^T (A W A^T)^{-1} A W`` equals ``S (S^T W^{-1} S)^{-1} S^T``, which is
MinT's reconciled covariance ``S G W G^T S^T`` (``G = (S^T W^{-1} S)^{-1} S^T
W^{-1}``) when MinT's ``W`` is the forecast's own covariance. When MinT is run
with another matrix ``W'`` (for instance estimated from in-sample residuals,
while the forecast's spread grows with the horizon), its reconciled covariance
is ``P W P^T`` with ``P = S G'`` built from ``W'``, and differs from the
conditional; the conditional is what :func:`reconcile` returns. Matheron's rule makes the link
exact for samples too: the exact conditional sample ``x = y - W A^T (A W A^T)^{-1}
A y`` of a draw ``y ~ N(y_hat, W)`` is the MinT projection of that draw.

**Cost.** ``A`` is passed to :func:`~pyro_linconstr.constrain` as a sparse COO
tensor (a :class:`~pyro_linconstr.ops.SparseOperator`) with ``n_agg + nnz(S_agg)``
non-zeros: a tree or a grouped hierarchy costs ``O(nnz)`` per product, and the
conditioning factors the ``n_agg x n_agg`` matrix ``A W A^T``; no ``n x n``
matrix is formed for a diagonal or low-rank ``W`` (a full ``W`` is ``n x n``
by itself). A :class:`~pyro_linconstr.GroupSum` does not fit: the rows of ``A``
hold ``-1`` entries, and in a hierarchy of more than two levels a bottom series
appears in several rows (its industry group, its sector, the total).
"""

from __future__ import annotations

import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from pyro_linconstr.distributions.registry import constrain

__all__ = ["reconcile", "shrinkage_gaussian"]

_GAUSSIANS = "Normal(loc, scale).to_event(1), MultivariateNormal, LowRankMultivariateNormal"


def reconcile(
    forecast: Distribution | torch.Tensor, S: torch.Tensor
) -> Distribution | torch.Tensor:
    r"""A hierarchy's forecast conditioned on its aggregation identities.

    ``S`` is the summing matrix ``(n_total, n_bottom)`` in Hyndman's notation:
    aggregate series first, bottom series last, its last ``n_bottom`` rows the
    identity. The identities are ``A y = 0`` with ``A = [I_agg, -S_agg]``
    (``S_agg`` the first ``n_agg = n_total - n_bottom`` rows of ``S``).

    **A Gaussian forecast** ``N(y_hat, W)`` (``Normal(loc, scale).to_event(1)``,
    ``MultivariateNormal`` or ``LowRankMultivariateNormal`` with event shape
    ``(n_total,)``; any batch shape, e.g. one per horizon) returns a
    distribution, ``plc.constrain(forecast, A, 0)`` (a
    :class:`~pyro_linconstr.distributions.ConstrainedGaussian`):

    * its :attr:`mean` is the MinT reconciliation
      ``S (S^T W^{-1} S)^{-1} S^T W^{-1} y_hat`` with ``W`` the forecast's
      covariance (``W = sigma^2 I``: OLS; diagonal ``W``: WLS);
    * its covariance is the Gaussian conditional
      ``W - W A^T (A W A^T)^{-1} A W = S (S^T W^{-1} S)^{-1} S^T``, equal to
      MinT's reconciled covariance ``S G W G^T S^T``
      (``G = (S^T W^{-1} S)^{-1} S^T W^{-1}``) for this same ``W``. MinT run with
      another matrix ``W'`` (say from in-sample residuals, while the forecast's
      spread grows with the horizon) gives ``P W P^T`` with ``P = S G'`` built from
      ``W'``, which is not the conditional; :attr:`variance` gives the diagonal of the conditional
      covariance, :meth:`log_prob` the density on the coherent subspace;
    * its samples are coherent: ``|y_agg - S_agg y_bottom| <= c eps
      (|y_agg| + |S_agg| |y_bottom|)`` row by row, ``c = 8 sqrt(n_total)``
      (the package's exactness bound).

    **Samples** ``(num_samples, ..., n_total)`` (from any forecaster, e.g. the
    output of a :class:`pyro.contrib.forecast.Forecaster`, whose shape is
    ``(num_samples, ..., duration, n_total)``) return coherent samples of the
    same shape. Each batch element (each horizon) gets its own covariance
    ``W``: the Schäfer-Strimmer shrinkage of the sample covariance toward its
    diagonal, the estimator of MinT-shrink (Wickramasuriya et al. 2019; the
    formula of R's ``hts::shrink.estim``, on the centred samples, divided by
    ``num_samples``). Every sample ``y`` is mapped by Matheron's rule,
    ``x = y - W A^T (A W A^T)^{-1} A y``: the exact conditional sample when the
    forecast is Gaussian with covariance ``W``, and the MinT projection of the
    samples (Panagiotelis et al. 2023) in general. Why this method, rather than
    fitting a Gaussian and sampling it: each sample is moved by a linear
    correction onto the coherent subspace, along the directions in which the
    forecast is least certain, so what the forecaster put into its samples
    (skewness, heavy tails, the log-normal spread of a model fitted on log
    levels, dependence between series) carries over instead of being replaced
    by a Gaussian; for Gaussian samples the two coincide. Coherent samples are
    returned unchanged. The shrinkage keeps ``W``
    positive definite with fewer samples than series. ``W`` is kept low-rank
    plus diagonal (rank ``num_samples``) when ``num_samples < n_total``, full
    otherwise, so the cost is ``O(num_samples * min(num_samples, n_total) * n_total)``
    per batch element. To condition a Gaussian fitted to samples instead,
    build it and pass the distribution.

    :param forecast: a Gaussian distribution with event shape ``(n_total,)``, or
        a floating-point tensor of samples ``(num_samples, ..., n_total)``
        with ``num_samples >= 2``.
    :param torch.Tensor S: the summing matrix ``(n_total, n_bottom)``, dense or
        sparse (COO / CSR), real values (a 0/1 matrix for sums; other weights
        are allowed). A matrix with no aggregate row (``S = I``) returns
        ``forecast`` unchanged.
    :returns: a :class:`~pyro_linconstr.distributions.ConstrainedGaussian` for a
        Gaussian forecast; a tensor of coherent samples, same shape and dtype,
        for samples.
    :raises ValueError: ``S`` not 2-D, its last rows not the identity, non-finite
        values in ``S`` or ``forecast``, a last dimension of ``forecast`` other
        than ``n_total``, fewer than 2 samples.
    :raises TypeError: ``forecast`` neither a supported Gaussian nor a tensor.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_linconstr as plc
        >>> S = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # total = a + b
        >>> base = dist.Normal(torch.tensor([10.0, 4.0, 5.0]), torch.ones(3)).to_event(1)
        >>> d = plc.reconcile(base, S)
        >>> d.mean  # OLS reconciliation: the excess 1 spread over the three series
        tensor([9.6667, 4.3333, 5.3333])
        >>> samples = plc.reconcile(base.sample((500,)), S)
        >>> samples.shape, bool((samples[:, 0] - samples[:, 1:].sum(-1)).abs().max() < 1e-5)
        (torch.Size([500, 3]), True)

    **References:** S. L. Wickramasuriya, G. Athanasopoulos, R. J. Hyndman,
    "Optimal forecast reconciliation for hierarchical and grouped time series
    through trace minimization", JASA 114 (2019). A. Panagiotelis, P. Gamakumara,
    G. Athanasopoulos, R. J. Hyndman, "Probabilistic forecast reconciliation:
    properties, evaluation and score optimisation", EJOR 306 (2023).
    J. Schäfer, K. Strimmer, "A shrinkage approach to large-scale covariance
    matrix estimation", SAGMB 4 (2005).
    """
    n_total, n_agg, rows, cols, vals = _parse_summing_matrix(S)
    if isinstance(forecast, torch.Tensor):
        return _reconcile_samples(forecast, n_total, n_agg, rows, cols, vals)
    if isinstance(forecast, Distribution):
        return _reconcile_gaussian(forecast, n_total, n_agg, rows, cols, vals)
    raise TypeError(
        f"reconcile: forecast must be a Gaussian distribution ({_GAUSSIANS}) or a tensor of "
        f"samples (num_samples, ..., n_total), got {type(forecast).__name__}."
    )


# ------------------------------------------------------------------ the summing matrix
def _parse_summing_matrix(S):
    """Check ``S``; return ``(n_total, n_agg, rows, cols, vals)`` of ``S_agg`` in COO form."""
    if not isinstance(S, torch.Tensor):
        raise TypeError(
            f"reconcile: S must be a torch.Tensor (the summing matrix n_total x n_bottom), "
            f"got {type(S).__name__}."
        )
    if S.dim() != 2:
        raise ValueError(
            f"reconcile: S must be 2-D, the summing matrix (n_total, n_bottom), got shape "
            f"{tuple(S.shape)}; one S serves every batch element of the forecast."
        )
    if S.is_complex() or S.dtype == torch.bool:
        raise ValueError(f"reconcile: S must hold real numbers, got dtype {S.dtype}.")
    n_total, n_bottom = S.shape
    n_agg = n_total - n_bottom
    if n_bottom == 0 or n_agg < 0:
        raise ValueError(
            f"reconcile: S must have shape (n_total, n_bottom) with n_total >= n_bottom >= 1 "
            f"(aggregates first, then the identity over the bottom series), got {tuple(S.shape)}."
        )
    if S.layout == torch.sparse_csr:
        S = S.to_sparse_coo()
    elif S.layout != torch.strided and S.layout != torch.sparse_coo:
        raise ValueError(
            f"reconcile: S must be dense or sparse COO / CSR, got layout {S.layout}; convert it "
            "with S.to_dense() or S.to_sparse_coo()."
        )
    if S.layout == torch.sparse_coo:
        S = S.coalesce()
        idx, val = S.indices(), S.values()
        nz = val != 0
        r, c, v = idx[0][nz], idx[1][nz], val[nz]
    else:
        r, c = S.nonzero(as_tuple=True)
        v = S[r, c]
    v = v.to(torch.float64) if not v.is_floating_point() else v
    if not bool(torch.isfinite(v).all()):
        raise ValueError("reconcile: S has non-finite entries (nan or inf).")
    # the bottom block: exactly one non-zero per row, on the diagonal, equal to 1
    bottom = r >= n_agg
    rb, cb, vb = r[bottom] - n_agg, c[bottom], v[bottom]
    ok = rb.numel() == n_bottom and bool((rb == cb).all()) and bool((vb == 1).all())
    if not ok:
        raise ValueError(
            f"reconcile: the last n_bottom = {n_bottom} rows of S must be the identity "
            "(Hyndman's notation: aggregate series first, bottom series last). Reorder the "
            "series so that the bottom level comes last, or transpose S if it is "
            "(n_bottom, n_total)."
        )
    agg = ~bottom
    return n_total, n_agg, r[agg], c[agg], v[agg]


def _identities(n_total, n_agg, rows, cols, vals, dtype, device) -> torch.Tensor:
    """``A = [I_agg, -S_agg]`` as a sparse COO ``(n_agg, n_total)`` tensor."""
    eye = torch.arange(n_agg, device=device)
    index = torch.stack(
        [torch.cat([eye, rows.to(device)]), torch.cat([eye, cols.to(device) + n_agg])]
    )
    values = torch.cat(
        [torch.ones(n_agg, dtype=dtype, device=device), -vals.to(device=device, dtype=dtype)]
    )
    coo = torch.sparse_coo_tensor(index, values, (n_agg, n_total), check_invariants=False)
    return coo.coalesce()


# ------------------------------------------------------------------ Gaussian forecasts
def _reconcile_gaussian(forecast, n_total, n_agg, rows, cols, vals):
    inner, k = forecast, 0
    while isinstance(inner, Independent):
        k += inner.reinterpreted_batch_ndims
        inner = inner.base_dist
    vector = isinstance(inner, (MultivariateNormal, LowRankMultivariateNormal)) and k == 0
    scalar = isinstance(inner, Normal) and k == 1
    if not (vector or scalar):
        raise TypeError(
            f"reconcile: forecast must be a Gaussian over the n_total series ({_GAUSSIANS}, "
            f"event shape (n_total,)) or a tensor of samples, got {type(forecast).__name__} "
            f"of {type(inner).__name__} with event shape {tuple(forecast.event_shape)}. For "
            "another family, pass samples: reconcile(forecast.sample((1000,)), S)."
        )
    if forecast.event_shape != (n_total,):
        raise ValueError(
            f"reconcile: forecast has event shape {tuple(forecast.event_shape)}, but S has "
            f"n_total = {n_total} rows: the forecast's last dimension must be the {n_total} "
            "series, ordered as the rows of S."
        )
    params = (
        (inner.loc, inner.scale)
        if scalar
        else (inner.loc, inner.cov_factor, inner.cov_diag)
        if isinstance(inner, LowRankMultivariateNormal)
        else (inner.loc, inner._unbroadcasted_scale_tril)
    )
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise ValueError("reconcile: forecast has non-finite parameters (nan or inf).")
    if n_agg == 0:
        return forecast
    dtype, device = inner.loc.dtype, inner.loc.device
    A = _identities(n_total, n_agg, rows, cols, vals, dtype, device)
    return constrain(forecast, A, torch.zeros(n_agg, dtype=dtype, device=device))


# ------------------------------------------------------------------ samples
def _reconcile_samples(samples, n_total, n_agg, rows, cols, vals):
    if samples.dim() < 2 or samples.shape[-1] != n_total:
        raise ValueError(
            f"reconcile: forecast samples must have shape (num_samples, ..., n_total) with "
            f"n_total = {n_total} (the rows of S), got shape {tuple(samples.shape)}."
        )
    if not samples.is_floating_point():
        raise ValueError(
            f"reconcile: forecast samples must be floating point, got dtype {samples.dtype}; "
            "convert them, e.g. samples.double()."
        )
    if samples.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"reconcile: forecast samples in {samples.dtype} are too coarse for the covariance "
            "and its factorization; convert them, e.g. samples.float()."
        )
    N = samples.shape[0]
    if N < 2:
        raise ValueError(
            f"reconcile: forecast has {N} sample(s); at least 2 are needed to estimate the "
            "covariance that reconciles them (dim 0 of the tensor is the sample dimension)."
        )
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("reconcile: forecast samples have non-finite entries (nan or inf).")
    if n_agg == 0 or samples[0].numel() == 0:  # no identity, or an empty batch: nothing to move
        return samples
    base = shrinkage_gaussian(samples)
    dtype, device = samples.dtype, samples.device
    A = _identities(n_total, n_agg, rows, cols, vals, dtype, device)
    d = constrain(base, A, torch.zeros(n_agg, dtype=dtype, device=device))
    # Matheron's rule on the given draws (the conditioning's own map, with its refinement)
    return d._cond.condition(samples)


def shrinkage_gaussian(samples: torch.Tensor) -> Distribution:
    r"""The Gaussian with the samples' mean and Schäfer-Strimmer shrinkage covariance.

    Per batch element of ``samples`` ``(N, ..., n)``: with ``X`` the centred
    samples, ``C = X^T X / N``, ``D = diag(C)`` and ``R`` the correlations,
    ``W = lambda D + (1 - lambda) C`` with
    ``lambda = sum_{i != j} Var(r_ij) / sum_{i != j} r_ij^2`` clipped to
    ``[0, 1]`` (``hts::shrink.estim``). The sums over pairs are taken from the
    smaller of the ``n x n`` and ``N x N`` Gram matrices of the standardised
    samples, so nothing larger is formed. A series with zero spread keeps a
    variance of ``eps * max_i D_ii`` so that ``W`` stays positive definite.

    :returns: a ``LowRankMultivariateNormal`` (factor ``sqrt((1 - lambda) / N) X^T``,
        rank ``N``) when ``N < n``, else a ``MultivariateNormal``; batch shape
        ``samples.shape[1:-1]``.
    """
    N, n = samples.shape[0], samples.shape[-1]
    mean = samples.mean(0)
    X = samples - mean
    d = X.square().mean(0)  # (..., n)
    eps = torch.finfo(samples.dtype).eps
    floor = eps * d.amax(-1, keepdim=True) + torch.finfo(samples.dtype).tiny
    d_safe = d.clamp_min(floor)
    Z = X / d_safe.sqrt()  # standardised samples; 0 for a series with no spread
    Z = torch.where(d > 0, Z, 0.0)
    Zb = Z.movedim(0, -2)  # (..., N, n)
    gram = Zb.transpose(-1, -2) @ Zb if n <= N else Zb @ Zb.transpose(-1, -2)
    frob = gram.square().sum((-2, -1))  # ||Z^T Z||_F^2
    col = Z.square().sum(0)  # (..., n): sum_k z_ki^2
    diag_sq = col.square().sum(-1)
    off_sq = frob - diag_sq  # sum_{i != j} (sum_k z_ki z_kj)^2
    row = Z.square().sum(-1)  # (N, ...): sum_i z_ki^2
    t1 = (row.square() - Z.pow(4).sum(-1)).sum(0)  # sum_k sum_{i != j} z_ki^2 z_kj^2
    sum_var = (t1 - off_sq / N) / (N * (N - 1))
    sum_r2 = off_sq / N**2
    lam = torch.where(sum_r2 > 0, sum_var / sum_r2.clamp_min(torch.finfo(d.dtype).tiny), 1.0)
    lam = lam.clamp(0.0, 1.0).unsqueeze(-1)  # (..., 1)
    diag = (lam * d).clamp_min(floor)
    if N < n:
        factor = ((1 - lam).unsqueeze(-1) / N).sqrt() * X.movedim(0, -1)  # (..., n, N)
        return LowRankMultivariateNormal(mean, factor, diag)
    Xb = X.movedim(0, -2)  # (..., N, n)
    W = (1 - lam).unsqueeze(-1) * (Xb.transpose(-1, -2) @ Xb) / N + torch.diag_embed(diag)
    return MultivariateNormal(mean, covariance_matrix=W)
