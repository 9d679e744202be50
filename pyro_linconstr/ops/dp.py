r"""Log-space dynamic program over partial sums (conditional Bernoulli / Binomial).

Entries ``r = 0, ..., S - 1`` of a group take values ``x_r in {0, ..., X - 1}``
with log-weights ``w_r(x)`` (for a Binomial base, its log-pmf). The forward
table

.. math::

    \alpha_r(j) = \log \sum_{x_0 + \dots + x_{r-1} = j} \prod_{s < r} e^{w_s(x_s)},
    \qquad \alpha_{r+1}(j) = \operatorname{logsumexp}_x \big(\alpha_r(j - x) + w_r(x)\big),

costs ``O(S K X)`` for totals up to ``K`` and gives the normaliser
``\log Z = \alpha_S(k)`` of the conditional law ``p(x | sum x = k)``.
Backward sampling draws ``x_{S-1}, ..., x_0`` in turn from
``p(x_r = x | remaining c) \propto \exp(\alpha_r(c - x) + w_r(x))``.

All groups (and batch elements) run in lock-step on a padded ``(..., m, S, X)``
tensor. Impossible states carry the finite sentinel :data:`NEG` instead of
``-inf``, so that neither the values nor the gradients (``logsumexp`` of all
``-inf`` has a NaN gradient) are ever NaN; a sentinel state never gains weight
(``exp(NEG - log Z) = 0``).

The steps use their own ``logaddexp`` / ``logsumexp`` whose backward is
``softmax`` of the inputs (weights that sum to 1 to rounding): torch's
``logaddexp`` has a NaN second derivative next to a sentinel, and torch's
``logsumexp`` backward ``exp(x - out)`` loses mass through the rounding of
``out`` (about ``eps |log Z|`` per step, 1% after a few thousand float32
steps). The Bernoulli family's ``mean`` is a gradient of ``log Z`` and is
itself differentiated, so the backward is written in differentiable ops.
"""

from __future__ import annotations

import torch

#: Log-weight of an impossible state (finite, so gradients stay finite).
NEG = -1e30


class _LogAddExp(torch.autograd.Function):
    """``log(e^a + e^b)``, backward ``sigmoid(a - b), sigmoid(b - a)`` (twice differentiable)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.logaddexp(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        d = a - b
        return grad * torch.sigmoid(d), grad * torch.sigmoid(-d)


class _LogSumExp(torch.autograd.Function):
    """``logsumexp`` over ``dim`` with backward ``softmax`` (twice differentiable)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.save_for_backward(x)
        ctx.dim = dim
        return torch.logsumexp(x, dim)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.unsqueeze(ctx.dim) * torch.softmax(x, ctx.dim), None


def _step(alpha: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One DP step: ``alpha (..., K+1)``, ``w (..., X)`` -> ``(..., K+1)``."""
    X = w.shape[-1]
    if X == 1:
        return alpha + w
    shifted = torch.nn.functional.pad(alpha[..., :-1], (1, 0), value=NEG)
    if X == 2:
        return _LogAddExp.apply(alpha + w[..., :1], shifted + w[..., 1:])
    K1 = alpha.shape[-1]
    padded = torch.nn.functional.pad(alpha, (X - 1, 0), value=NEG)
    # (..., X, K+1): row r = alpha(j - (X - 1 - r)), a view; it meets the reversed w
    windows = padded.unfold(-1, K1, 1)
    return _LogSumExp.apply(windows + w.flip(-1).unsqueeze(-1), -2)


def forward_tables(logw: torch.Tensor, K: int, keep: bool = False):
    """Run the forward DP.

    :param torch.Tensor logw: ``(..., S, X)`` log-weights (use :data:`NEG` for
        impossible values and for padding slots other than ``x = 0``).
    :param int K: largest total of interest (tables have ``K + 1`` states).
    :param bool keep: also return the list of every ``alpha_r``, ``r = 0..S``.
    :returns: ``alpha_S`` of shape ``(..., K + 1)`` (and the list when ``keep``).
    """
    batch = logw.shape[:-2]
    alpha = logw.new_full(batch + (K + 1,), NEG)
    alpha[..., 0] = 0.0
    tables = [alpha] if keep else None
    for r in range(logw.shape[-2]):
        alpha = _step(alpha, logw[..., r, :])
        if keep:
            tables.append(alpha)
    return (alpha, tables) if keep else alpha


def log_normalizer(logw: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """``log Z = alpha_S(k)``, differentiable in ``logw``; ``totals`` is ``(...)`` long."""
    K = int(totals.max()) if totals.numel() else 0
    alpha = forward_tables(logw, K)
    alpha = alpha.expand(totals.shape + alpha.shape[-1:])
    return alpha.gather(-1, totals.unsqueeze(-1)).squeeze(-1)


def backward_sample(
    logw: torch.Tensor, totals: torch.Tensor, sample_shape: torch.Size = torch.Size()
) -> torch.Tensor:
    """Exact draw from ``p(x | sum x = k)`` by backward sampling through the table.

    :param logw: ``(..., S, X)`` (detached).
    :param totals: ``(...)`` long, broadcastable with ``logw.shape[:-2]``.
    :returns: long tensor ``sample_shape + (..., S)``.
    """
    sample_shape = torch.Size(sample_shape)
    batch = torch.broadcast_shapes(logw.shape[:-2], totals.shape)
    logw = logw.expand(batch + logw.shape[-2:])
    K = int(totals.max()) if totals.numel() else 0
    _, tables = forward_tables(logw, K, keep=True)
    S, X = logw.shape[-2:]
    shape = sample_shape + batch
    remaining = totals.expand(shape).clone()
    xs = torch.arange(X, device=logw.device)
    out = []
    for r in range(S - 1, -1, -1):
        idx = remaining.unsqueeze(-1) - xs  # (shape, X)
        valid = idx >= 0
        alpha = tables[r].expand(shape + (K + 1,))
        score = alpha.gather(-1, idx.clamp_min(0)) + logw[..., r, :]
        score = torch.where(valid, score, torch.full_like(score, -float("inf")))
        # Gumbel-max: -log E with E ~ Exponential(1) is a standard Gumbel draw.
        expo = torch.empty_like(score).exponential_()
        x = (score - expo.log()).argmax(-1)
        remaining = remaining - x
        out.append(x)
    out.reverse()
    return torch.stack(out, -1)


def marginal_pmfs(logw: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """Exact conditional marginals ``P(x_r = x | sum x = k)``, shape ``(..., S, X)``.

    Forward-backward: ``P(x_r = x | k) \\propto \\sum_j \\exp(\\alpha_r(j) + w_r(x)
    + \\beta_{r+1}(k - j - x))`` with ``beta`` the forward table of the reversed
    entries. Not differentiable (use the gradient of :func:`log_normalizer`).
    """
    with torch.no_grad():
        batch = torch.broadcast_shapes(logw.shape[:-2], totals.shape)
        logw = logw.expand(batch + logw.shape[-2:])
        K = int(totals.max()) if totals.numel() else 0
        _, fwd = forward_tables(logw, K, keep=True)
        _, bwd = forward_tables(logw.flip(-2), K, keep=True)
        S, X = logw.shape[-2:]
        k = totals.expand(batch)
        js = torch.arange(K + 1, device=logw.device)
        out = []
        for r in range(S):
            alpha = fwd[r]  # entries < r
            beta = bwd[S - 1 - r]  # entries > r
            scores = []
            for x in range(X):
                need = k.unsqueeze(-1) - js - x  # (..., K+1)
                ok = need >= 0
                b = beta.gather(-1, need.clamp(0, K))
                s = torch.where(ok, alpha + b, torch.full_like(alpha, NEG))
                scores.append(torch.logsumexp(s, -1) + logw[..., r, x])
            scores = torch.stack(scores, -1)
            out.append(torch.softmax(scores, -1))
        return torch.stack(out, -2)
