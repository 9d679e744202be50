r"""
Fully invested portfolios from a temporal graph network
=======================================================

A portfolio is a vector of weights ``w`` over ``n`` assets, and a fully invested
one obeys the *budget law* ``sum_i w_i = 1``. A network that outputs a Gaussian
over next-day weights, ``w ~ N(mu, diag s^2)``, puts probability zero on that
law. Here the Gaussian is *conditioned* on it,

.. code-block:: python

    law = plc.GroupSum(torch.zeros(n, dtype=torch.long), 1)  # one row of ones
    policy = plc.constrain(dist.Normal(mu, s).to_event(1), law, torch.ones(1))

and the network is trained *through* the conditional distribution on a
differentiable risk-adjusted return, as in the stock-portfolio experiment of Li,
Sahu, Van den Broeck & Zeng (NeSy 2026), which put the method on StemGNN.

**Data.** ``skfolio.datasets.load_sp500_dataset()``: daily closing prices of 20
S&P 500 stocks, 1990-2022, shipped with ``skfolio``. Walk-forward splits without
look-ahead: for each test year ``Y`` the network is trained on the four years
``Y-5 .. Y-2``, the epoch is chosen on year ``Y-1`` (validation), and the
weights are applied to every day of ``Y``. The weights of day ``t+1`` are
decided from the returns up to the close of day ``t``; the portfolio earns the
simple returns of day ``t+1`` (rebalanced daily, no transaction costs; the
turnover is reported).

**The network** (plain torch, in the spirit of StemGNN, Cao et al., NeurIPS
2020). Kept: StemGNN's *latent correlation layer* — a GRU reads each asset's
window of returns, and self-attention between the assets' last GRU states gives
a learned, input-dependent graph ``W = softmax(Q K^T / sqrt(d))`` — and
*temporal convolutions* with gated linear units (GLU) over the lookback window,
followed by a graph convolution that mixes the assets through ``W``.
Simplified: StemGNN computes the graph Fourier transform (an eigendecomposition
of the normalised Laplacian of ``W``) and convolves in the discrete-Fourier
domain of time with Chebyshev graph filters, in two residual blocks with a
forecast and a backcast branch. Here the temporal convolutions act in the time
domain (two dilated causal-free ``Conv1d`` + GLU layers), the graph convolution
is one spatial hop ``h + W h``, there is one block and no backcast, and the
heads output portfolio weights instead of a price forecast. The GRU runs over
time for each asset (the StemGNN paper's description). The experiment's exact
settings in Li et al. (window, period, stocks, objective) are not known
(PAPER.md gives the Sharpe ratios only), so the numbers here are not comparable
to theirs, only the direction.

**The objective.** For a mini-batch of ``B`` days with next-day returns
``r_t``, the policy draws ``w_t ~ p_theta(w | x_t, A w = b)`` and the portfolio
earns ``p_t = w_t^T r_t``. We maximise the expected Sharpe ratio of the batch,

.. math::

    J(\theta) = \mathbb{E}_{w_t \sim p_\theta(w \mid x_t,\, A w = b)}
        \left[ \frac{\bar p}{\sqrt{\tfrac1B \sum_t (p_t - \bar p)^2 + \epsilon}} \right],
    \qquad \bar p = \tfrac1B \sum_t p_t ,

with ``K`` samples per day. Its gradient is estimated with the package's
estimators (:mod:`pyro_linconstr.infer.estimators`): ``"reparam"``
(constrained reparametrization, CR: pathwise through the exact sample
``w = y + S A^T (A S A^T)^{-1} (b - A y)``, ``y ~ N(mu, S)``, ``S = diag s^2``)
and ``"marginal"`` (the paper's estimator: the exact sample forward, the
gradient of the conditional mean ``m = E[w | A w = b]`` backward). With the
budget law ``m_i = mu_i + s_i^2 (1 - sum_j mu_j) / sum_j s_j^2``: the network
learns *which* assets absorb the residual of the budget, which the orthogonal
projection (all ``s_i`` equal) cannot.

A third variant (closed form) needs no samples. Over the batch and the policy,
the portfolio return is a mixture with exact moments

.. math::

    \mathbb{E}[p_t] = m_t^T r_t, \qquad
    \operatorname{Var}[p_t] = r_t^T C_t r_t
      = \sum_i s_i^2 r_i^2 - \sum_g \frac{(\sum_{i \in g} s_i^2 r_i)^2}{\sum_{i \in g} s_i^2},

``C = S - S A^T (A S A^T)^{-1} A S`` the conditional covariance, written for
group-sum laws (one group for the budget). The Sharpe ratio of the mixture,
``M1 / sqrt(M2 - M1^2)`` with ``M1 = mean_t m_t^T r_t`` and
``M2 = mean_t [(m_t^T r_t)^2 + r_t^T C_t r_t]``, is a deterministic,
differentiable mean-variance objective of the conditional moments: the
policy's noise enters as extra variance that the network learns to spend.

**What is compared**, with the same network, initialisation (equal weights at
the start), epochs and stopping rule, on the same test years:

* **unconstrained**: the raw weights ``w = mu`` (the budget is violated);
* **softmax**: ``w = softmax(n mu)`` (long-only; to first order around equal
  weights the same step as the projection);
* **projection** (KKT-hPINN): ``w = plc.project(mu, A, b)``;
* **constraint layer** (the repair of Stoian et al., ICLR 2024, for a linear
  equality): the variables are fixed in a chosen order and the last one of each
  law absorbs its residual, ``w_last = b - sum_{others} mu``; it moves ``mu`` by
  the smallest possible L1 distance ``|1^T mu - b|``, all on one asset;
* **constrained reparametrization** (CR) and **ours** (marginal estimator,
  and the closed form above) through ``plc.constrain``; they invest with the
  conditional mean ``m``;
* the classical references of ``skfolio`` fitted on the same five years
  (training + validation): ``EqualWeighted``, ``InverseVolatility``,
  ``MeanRisk`` (minimum variance, its default) and ``MeanRisk`` maximising the
  Sharpe ratio (mean-variance tangency), all long-only.

A second law, **sector neutrality**: the weight of each GICS sector equals its
weight in the equal-weight benchmark, ``sum_{i in g} w_i = n_g / n``
(``plc.GroupSum(sector, 7)``; it implies the budget). Equal weight satisfies
it; the optimised references do not.

``PLC_SMOKE=1`` runs one test year, few epochs and one seed (well under a
minute). The full mode (about 21 CPU-minutes on one thread) runs the test years
2018-2022, 10 epochs, and 10 seeds for each law.
Switches: ``PLC_PORTFOLIO_SEEDS``, ``PLC_PORTFOLIO_EPOCHS``, ``PLC_PORTFOLIO_FIRST_YEAR``,
``PLC_PORTFOLIO_METHODS``, ``PLC_PORTFOLIO_LAWS=budget,sector``,
``PLC_PORTFOLIO_SECTOR_SEEDS`` (seeds of the sector law), ``PLC_PORTFOLIO_RESUME=1``
(continue an interrupted run), ``PLC_TAG``.
"""

# %%
# Setup
# -----

import json
import math
import os
import time

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch
from skfolio.datasets import load_sp500_dataset
from skfolio.optimization import EqualWeighted, InverseVolatility, MeanRisk, ObjectiveFunction
from torch import nn

import pyro_linconstr as plc
from pyro_linconstr._tutorial import env_flag, env_int, env_subset, output_dir, smoke_mode
from pyro_linconstr.infer.estimators import estimated_sample

SMOKE = smoke_mode()  # PLC_SMOKE=1 (or true/yes/on): a quick run
LAST_YEAR = 2022
FIRST_YEAR = env_int("PLC_PORTFOLIO_FIRST_YEAR", 2022 if SMOKE else 2018, minimum=1996)
TEST_YEARS = list(range(FIRST_YEAR, LAST_YEAR + 1))
SEEDS = env_int("PLC_PORTFOLIO_SEEDS", 1 if SMOKE else 10, minimum=1)
SECTOR_SEEDS = env_int("PLC_PORTFOLIO_SECTOR_SEEDS", 1 if SMOKE else 10, minimum=1)
EPOCHS = env_int("PLC_PORTFOLIO_EPOCHS", 3 if SMOKE else 10, minimum=1)
TRAIN_YEARS = 4  # training window; the year after it is the validation year
LOOKBACK, WEEK = 40, 5  # trading days of returns the network sees, read week by week
BATCH_DAYS, PARTICLES, LR = 128, 4, 3e-3
HIDDEN = 8  # GRU state, attention and channel width
INIT_SCALE = 0.02  # initial per-asset standard deviation of the weights
ANNUAL = 252  # trading days per year
OUT = output_dir(globals().get("__file__"))  # tutorials/output/
# process-wide settings, restored at the end (sphinx-gallery runs every tutorial in one process)
_saved = (torch.get_num_threads(), torch.distributions.Distribution._validate_args)
torch.set_num_threads(env_int("PLC_THREADS", 1, minimum=1))
torch.distributions.Distribution.set_default_validate_args(False)
T0 = time.time()

# %%
# The data and the two laws
# -------------------------
# Simple returns ``R`` (what a portfolio earns) and log returns (the network's
# input). Sectors: the GICS sector of each ticker as classified in 2022
# (hard-coded; ``skfolio`` ships prices only). Range Resources (RRC) is an
# exploration and production company, i.e. Energy; GE is Industrials.

prices = load_sp500_dataset()
TICKERS = list(prices.columns)
SECTOR_OF = {
    "AAPL": "Information Technology",
    "AMD": "Information Technology",
    "MSFT": "Information Technology",
    "BAC": "Financials",
    "JPM": "Financials",
    "BBY": "Consumer Discretionary",
    "HD": "Consumer Discretionary",
    "CVX": "Energy",
    "RRC": "Energy",
    "XOM": "Energy",
    "GE": "Industrials",
    "JNJ": "Health Care",
    "LLY": "Health Care",
    "MRK": "Health Care",
    "PFE": "Health Care",
    "UNH": "Health Care",
    "KO": "Consumer Staples",
    "PEP": "Consumer Staples",
    "PG": "Consumer Staples",
    "WMT": "Consumer Staples",
}
SECTORS = sorted(set(SECTOR_OF.values()))
N = len(TICKERS)
price = torch.tensor(prices.to_numpy(), dtype=torch.float64)
R_all = price[1:] / price[:-1] - 1.0  # R_all[t]: simple return of day t (index of dates[t])
logret = torch.log1p(R_all).float()
dates = prices.index[1:]
years = torch.tensor(dates.year.to_numpy())
print(f"{N} stocks, {len(dates)} days {dates[0].date()} .. {dates[-1].date()}")


def law(name: str):
    """``(A, b, last)``: a group-sum law, its right-hand side and the asset that
    the constraint layer makes absorb each row's residual (the last in ticker
    order)."""
    if name == "budget":
        group = torch.zeros(N, dtype=torch.long)
    else:
        group = torch.tensor([SECTORS.index(SECTOR_OF[t]) for t in TICKERS])
    G = int(group.max()) + 1
    A = plc.GroupSum(group, G)
    # budget: b = 1; sectors: the equal-weight benchmark's sector weights n_g / n
    b = torch.bincount(group, minlength=G).double() / N
    last = torch.tensor([int(torch.nonzero(group == g)[-1]) for g in range(G)])
    return A, b, last, group


LAWS = {name: law(name) for name in env_subset("PLC_PORTFOLIO_LAWS", ["budget", "sector"])}
for name, lw in LAWS.items():
    print(f"law {name}: {lw[0].num_rows} row(s), b = {[round(float(v), 3) for v in lw[1]]}")

# %%
# A StemGNN-style temporal graph network
# --------------------------------------
# Input: ``(B, n, L)``, each asset's last ``L`` log returns (standardised by the
# training window's per-asset volatility). Output: a raw weight ``mu_i`` and a
# log standard deviation per asset. ``mu`` starts at the equal weights ``1/n``
# (the head is initialised at zero), so every method starts from the same
# portfolio; a learned per-asset offset lets the network hold a static tilt.


class TemporalGraphNet(nn.Module):
    def __init__(self, n: int = N, hidden: int = HIDDEN):
        super().__init__()
        self.gru = nn.GRU(WEEK, hidden, batch_first=True)  # latent correlation layer
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.tconv = nn.Sequential(  # temporal convolutions with gated linear units
            nn.Conv1d(1, 2 * hidden, WEEK, stride=WEEK),  # one output per week
            nn.GLU(dim=1),
            nn.Conv1d(hidden, 2 * hidden, 3, dilation=2),  # across weeks
            nn.GLU(dim=1),
        )
        self.graph = nn.Linear(2 * hidden, hidden)  # graph convolution h + W h
        self.head = nn.Linear(hidden, 2)
        self.asset_mu = nn.Parameter(torch.zeros(n))
        self.asset_log_scale = nn.Parameter(torch.full((n,), math.log(INIT_SCALE)))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.hidden = hidden

    def forward(self, x: torch.Tensor):
        B, n, L = x.shape
        _, state = self.gru(x.reshape(B * n, L // WEEK, WEEK))  # one GRU step per week
        state = state[0].reshape(B, n, self.hidden)
        att = self.query(state) @ self.key(state).transpose(-1, -2) / math.sqrt(self.hidden)
        W = torch.softmax(att, dim=-1)  # learned graph between the assets, (B, n, n)
        h = self.tconv(x.reshape(B * n, 1, L)).mean(-1).reshape(B, n, self.hidden)
        h = torch.cat([h, state], -1)
        h = torch.relu(self.graph(h + W @ h))
        out = self.head(h)
        mu = 1.0 / n + out[..., 0] + self.asset_mu
        scale = torch.exp(out[..., 1] + self.asset_log_scale)
        return mu, scale


# %%
# From the network's output to weights
# ------------------------------------
# ``weights(method, mu, scale, law)`` is the portfolio that the method invests
# in (deterministic); ``train_weights`` what its training objective sees.


def constrained(mu, scale, lw):
    A, b, _, _ = lw
    return plc.constrain(dist.Normal(mu, scale).to_event(1), A, b.to(mu.dtype))


def group_softmax(mu, lw):
    """``w_i = b_g exp(n mu_i) / sum_{j in g} exp(n mu_j)``: softmax within each row."""
    A, b, _, group = lw
    logits = N * mu
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return b.to(mu.dtype)[group] * e / A.matvec(e)[..., group]


def constraint_layer(mu, lw):
    """Stoian et al.'s repair for an equality: the last asset of each row takes the residual."""
    A, b, last, _ = lw
    resid = b.to(mu.dtype) - A.matvec(mu)
    return mu.index_add(-1, last, resid)


def weights(method, mu, scale, lw):
    A, b, _, _ = lw
    if method == "unconstrained":
        return mu
    if method == "softmax":
        return group_softmax(mu, lw)
    if method == "projection":
        return plc.project(mu, A, b.to(mu.dtype))
    if method == "layer":
        return constraint_layer(mu, lw)
    return constrained(mu, scale, lw).mean  # cr, marginal, closed_form: the conditional mean


def conditional_return_variance(scale, r, lw):
    """``r^T C r`` with ``C`` the conditional covariance of ``w`` under a group-sum law."""
    A = lw[0]
    s2 = scale**2
    return (s2 * r**2).sum(-1) - (A.matvec(s2 * r) ** 2 / A.matvec(s2)).sum(-1)


def sharpe(p, dim=-1, eps=1e-12):
    mean = p.mean(dim)
    return mean / (((p - mean.unsqueeze(dim)) ** 2).mean(dim) + eps).sqrt()


def training_loss(method, mu, scale, r, lw):
    """Negative (expected) Sharpe ratio of one mini-batch of days."""
    if method in ("cr", "marginal"):
        d = constrained(mu, scale, lw)
        estimator = "reparam" if method == "cr" else "marginal"
        w = estimated_sample(d, estimator, torch.Size([PARTICLES]))  # (K, B, n)
        return -sharpe((w * r).sum(-1)).mean()
    if method == "closed_form":
        m = constrained(mu, scale, lw).mean
        p = (m * r).sum(-1)
        m1 = p.mean()
        m2 = (p**2 + conditional_return_variance(scale, r, lw)).mean()
        return -m1 / (m2 - m1**2 + 1e-12).sqrt()
    return -sharpe((weights(method, mu, scale, lw) * r).sum(-1))


# %%
# Checks, for each law: every constrained map satisfies ``A w = b`` to float64
# rounding; with equal scales the conditional mean is the orthogonal projection
# (KKT-hPINN is the equal-variance special case); the Jacobian of the softmax at
# equal weights is the projection's; and the closed form: the mean and variance
# of ``r^T w`` over 20,000 exact constrained samples against ``m^T r`` and
# ``r^T C r``, within four standard errors.

gen = torch.Generator().manual_seed(0)
mu0 = 1.0 / N + 0.05 * torch.randn(N, generator=gen, dtype=torch.float64)
s0 = 0.01 + 0.05 * torch.rand(N, generator=gen, dtype=torch.float64)
r0 = 0.02 * torch.randn(N, generator=gen, dtype=torch.float64)
jacobian = torch.autograd.functional.jacobian
torch.manual_seed(0)
for name, lw in LAWS.items():
    for method in ("softmax", "projection", "layer", "marginal"):
        residual = lw[0].matvec(weights(method, mu0, s0, lw)) - lw[1]
        assert float(residual.abs().max()) < 1e-14, (name, method)
    equal_scales = constrained(mu0, torch.full_like(s0, 0.03), lw).mean
    assert torch.allclose(equal_scales, weights("projection", mu0, s0, lw), atol=1e-14)
    ew = torch.full((N,), 1.0 / N, dtype=torch.float64)
    jac_softmax = jacobian(lambda m, lw=lw: group_softmax(m, lw), ew)
    jac_projection = jacobian(lambda m, lw=lw: plc.project(m, *lw[:2]), ew)
    assert torch.allclose(jac_softmax, jac_projection, atol=1e-12), name
    d = constrained(mu0, s0, lw)
    draws = d.sample(torch.Size([20000])) @ r0
    var = float(conditional_return_variance(s0, r0, lw))
    mean = float(d.mean @ r0)
    z_mean = (float(draws.mean()) - mean) / math.sqrt(var / len(draws))
    z_var = (float(draws.var()) - var) / (var * math.sqrt(2 / (len(draws) - 1)))
    print(f"closed form vs Monte Carlo ({name}): z of mean {z_mean:+.2f}, of variance {z_var:+.2f}")
    assert abs(z_mean) < 4 and abs(z_var) < 4, (name, z_mean, z_var)

METHODS = {
    "unconstrained": "TGN, unconstrained (raw weights)",
    "softmax": "TGN + softmax",
    "projection": "TGN + projection (KKT-hPINN)",
    "layer": "TGN + constraint layer (Stoian)",
    "cr": "TGN + constrained reparametrization",
    "marginal": "TGN + conditioning, marginal (ours)",
    "closed_form": "TGN + conditioning, closed form (ours)",
}
METHODS = {k: METHODS[k] for k in env_subset("PLC_PORTFOLIO_METHODS", METHODS)}
PAPER = {  # StemGNN Sharpe ratio, Table 21 of Li et al. (PAPER.md): mean ± std
    "unconstrained": "1.56 ± 0.34",
    "projection": "1.81 ± 0.71",
    "cr": "1.82",
    "marginal": "1.90 ± 0.23",
}

# %%
# Walk-forward splits and the backtest
# ------------------------------------
# Decision day ``t`` (its features end at ``t``) is assigned to the year of the
# return it earns, day ``t+1``. The per-asset volatility that scales the inputs
# comes from the training years only.

windows = logret.unfold(0, LOOKBACK, 1)  # windows[k]: days k .. k+L-1, shape (n, L)
decision = torch.arange(LOOKBACK - 1, len(dates) - 1)  # last day of each window
target_year = years[decision + 1]


def split(test_year):
    def days(lo, hi):
        return decision[(target_year >= lo) & (target_year <= hi)]

    tr = days(test_year - TRAIN_YEARS - 1, test_year - 2)
    va, te = days(test_year - 1, test_year - 1), days(test_year, test_year)
    vol = logret[tr[0] - LOOKBACK + 1 : tr[-1] + 1].std(0)
    return tr, va, te, vol


def features(day_idx, vol):
    x = windows[day_idx - LOOKBACK + 1] / vol[:, None]
    return x.clamp(-5.0, 5.0)


def backtest(w, day_idx):
    """Daily portfolio returns, Sharpe, turnover, drawdown of weights ``w`` (days, n), float64."""
    R = R_all[day_idx + 1]
    p = (w * R).sum(-1)
    drifted = w * (1 + R) / (1 + p)[:, None]  # holdings at the close, before rebalancing
    turnover = (w[1:] - drifted[:-1]).abs().sum(-1).mean()
    return p, float(turnover)


def summary(p):
    sr = float(p.mean() / p.std() * math.sqrt(ANNUAL))
    wealth = torch.cumprod(1 + p, 0)
    mdd = float((1 - wealth / torch.cummax(wealth, 0).values).max())
    return sr, mdd


def violation(w, lw):
    A, b, _, _ = lw
    return float((A.matvec(w) - b).abs().max())


# %%
# Training one network
# --------------------
# Adam, ``EPOCHS`` passes over the training days in shuffled mini-batches of
# ``BATCH_DAYS`` days, and the epoch with the best validation Sharpe is kept
# (at least one epoch: the initial equal weights are not a candidate, so that
# every method invests with what its own training produced). Same initial
# network and batch order for every method of a (year, seed).


@torch.no_grad()
def invest(net, method, day_idx, vol, lw):
    mu, scale = net(features(day_idx, vol))
    return weights(method, mu.double(), scale.double(), lw)


def train(method, test_year, seed, lw):
    tr, va, te, vol = split(test_year)
    torch.manual_seed(seed)
    net = TemporalGraphNet()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x_tr, r_tr = features(tr, vol), R_all[tr + 1].float()
    gen = torch.Generator().manual_seed(seed)

    def val_sharpe():
        return summary(backtest(invest(net, method, va, vol, lw), va)[0])[0]

    best, best_epoch, best_state = -float("inf"), 0, None
    for epoch in range(1, EPOCHS + 1):
        for batch in torch.randperm(len(tr), generator=gen).split(BATCH_DAYS):
            mu, scale = net(x_tr[batch])
            loss = training_loss(method, mu, scale, r_tr[batch], lw)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sr = val_sharpe()
        if sr > best:
            best, best_epoch = sr, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    w_tr = invest(net, method, tr, vol, lw)
    w_te = invest(net, method, te, vol, lw)
    return {
        "w": w_te,
        "train_sharpe": summary(backtest(w_tr, tr)[0])[0],
        "val_sharpe": best,
        "epoch": best_epoch,
    }


# %%
# The classical references of skfolio
# -----------------------------------
# Fitted on the simple returns of the five years before the test year (the
# network's training and validation years), held at constant weights
# (rebalanced daily) over the test year.

CLASSICAL = {
    "equal": ("EqualWeighted (skfolio)", EqualWeighted),
    "inv_vol": ("InverseVolatility (skfolio)", InverseVolatility),
    "min_var": ("MeanRisk, minimum variance (skfolio)", MeanRisk),
    "max_sharpe": (
        "MeanRisk, maximum Sharpe (skfolio)",
        lambda: MeanRisk(objective_function=ObjectiveFunction.MAXIMIZE_RATIO),
    ),
}


def classical(key, test_year):
    tr, va, te, _ = split(test_year)
    fit_days = torch.cat([tr, va]) + 1  # the returns of the five years before the test year
    X = pd.DataFrame(R_all[fit_days].numpy(), columns=TICKERS, index=dates[fit_days.numpy()])
    model = CLASSICAL[key][1]().fit(X)
    w = torch.tensor(np.asarray(model.weights_), dtype=torch.float64)
    return w.expand(len(te), N), summary(R_all[fit_days] @ w)[0]


# %%
# Run
# ---

# Each finished (law, method, seed) is appended to
# ``output/portfolio_runs_<mode>.jsonl``; with ``PLC_PORTFOLIO_RESUME=1`` the runs
# found there (same settings) are reused, so an interrupted full run continues.
# Seeds are the outer loop, so a partial file holds whole seeds of every method.
# The unconstrained network ignores the law: it is trained once, under the
# budget law, and its row is repeated under the sector law (its ``max viol``
# there is that of the budget law).


def metrics(ws, days, lw, **extra):
    """The reported numbers of one backtest over all test years."""
    w, day_idx = torch.cat(ws), torch.cat(days)
    p, turnover = backtest(w, day_idx)
    sr, mdd = summary(p)
    return dict(
        sharpe=sr,
        turnover=turnover,
        mdd=mdd,
        viol=violation(w, lw),
        active=float((w - 1.0 / N).abs().sum(-1).mean() / 2),
        annual_sharpe=[summary(backtest(wy, d)[0])[0] for wy, d in zip(ws, days)],
        **extra,
    )


mode = ("smoke" if SMOKE else "full") + os.environ.get("PLC_TAG", "")
SETTINGS = f"years {TEST_YEARS[0]}-{TEST_YEARS[-1]} epochs {EPOCHS} lookback {LOOKBACK}"
RUNS_FILE = OUT / f"portfolio_runs_{mode}.jsonl"
done = {}
if env_flag("PLC_PORTFOLIO_RESUME") and RUNS_FILE.exists():
    for line in RUNS_FILE.read_text().splitlines():
        rec = json.loads(line)
        if rec["settings"] == SETTINGS:
            done[(rec["law"], rec["method"], rec["seed"])] = rec["metrics"]
    print(f"resuming: {len(done)} finished runs in {RUNS_FILE.name}")
else:
    RUNS_FILE.write_text("")

rows = {}  # (law, method) -> list over seeds of per-run metrics
for seed in range(max(SEEDS, SECTOR_SEEDS)):
    for law_name, lw in LAWS.items():
        if seed >= (SEEDS if law_name == "budget" else SECTOR_SEEDS):
            continue
        for method in METHODS:
            if method == "unconstrained" and law_name != "budget" and "budget" in LAWS:
                continue
            key = (law_name, method, seed)
            t1 = time.time()
            if key not in done:
                runs = [train(method, year, 1000 * seed + year, lw) for year in TEST_YEARS]
                done[key] = metrics(
                    [r["w"] for r in runs],
                    [split(year)[2] for year in TEST_YEARS],
                    lw,
                    train_sharpe=float(np.mean([r["train_sharpe"] for r in runs])),
                    val_sharpe=float(np.mean([r["val_sharpe"] for r in runs])),
                    epoch=float(np.mean([r["epoch"] for r in runs])),
                )
                rec = dict(law=law_name, method=method, seed=seed, settings=SETTINGS)
                with RUNS_FILE.open("a") as f:
                    f.write(json.dumps(dict(rec, metrics=done[key])) + "\n")
            m = done[key]
            rows.setdefault((law_name, method), []).append(m)
            print(
                f"{law_name:6s} {method:13s} seed {seed}: Sharpe {m['sharpe']:5.2f}  "
                f"turnover {m['turnover']:.3f}  MDD {m['mdd']:.3f}  max viol {m['viol']:.1e}"
                f"  ({time.time() - t1:.1f} s)",
                flush=True,
            )
if "unconstrained" in METHODS and "budget" in LAWS:
    for law_name in LAWS:
        rows[(law_name, "unconstrained")] = rows[("budget", "unconstrained")]

for law_name, lw in LAWS.items():
    for key in CLASSICAL:
        fitted = [classical(key, year) for year in TEST_YEARS]
        rows[(law_name, key)] = [
            metrics(
                [w for w, _ in fitted],
                [split(year)[2] for year in TEST_YEARS],
                lw,
                train_sharpe=float(np.mean([ins for _, ins in fitted])),
                val_sharpe=float("nan"),
                epoch=float("nan"),
            )
        ]
print(f"total {time.time() - T0:.0f} s")

# %%
# Results beside the paper
# ------------------------
# Out-of-sample daily returns of all test years concatenated: annualised Sharpe
# ratio (mean ± std over seeds for the networks), mean daily two-way turnover
# ``sum_i |w_{t+1,i} - w_{t,i}^{drifted}|``, maximum drawdown of the wealth, and
# the largest violation ``max_t |A w_t - b|`` (float64 weights).


def mean_std(values, fmt="{:.2f}"):
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) == 1:
        return fmt.format(float(t[0]))
    return f"{fmt.format(float(t.mean()))} ± {fmt.format(float(t.std()))}"


NAMES = dict(METHODS, **{k: v[0] for k, v in CLASSICAL.items()})
lines = [
    f"Portfolio of 20 S&P 500 stocks ({mode}): test years {TEST_YEARS[0]}-{TEST_YEARS[-1]}, "
    f"train {TRAIN_YEARS} y + validation 1 y before each, {EPOCHS} epochs, lookback "
    f"{LOOKBACK} days, seeds: budget {SEEDS}, sector {SECTOR_SEEDS}"
]
for law_name in LAWS:
    lines += [
        "",
        f"law: {law_name}",
        f"{'method':40s} {'Sharpe':>13s} {'turnover':>9s} {'max DD':>7s} {'max viol':>9s}"
        f" | {'paper Sharpe':>12s}",
    ]
    for k, name in NAMES.items():
        r, paper = rows[(law_name, k)], PAPER.get(k, "–")
        lines.append(
            f"{name:40s} {mean_std([x['sharpe'] for x in r]):>13s} "
            f"{np.mean([x['turnover'] for x in r]):9.3f} {np.mean([x['mdd'] for x in r]):7.3f} "
            f"{max(x['viol'] for x in r):9.1e} | {paper if law_name == 'budget' else '':>12s}"
        )

# %%
# Paired differences against the projection
# -----------------------------------------
# Every method of a seed starts from the same network and sees the same
# batches, so ``Sharpe(method) - Sharpe(projection)`` per seed removes the
# spread between initialisations: mean ± standard error over seeds, and on how
# many seeds the method was better.

for law_name in LAWS:
    if "projection" not in METHODS:
        break
    base = torch.tensor([x["sharpe"] for x in rows[(law_name, "projection")]])
    if len(base) < 2:
        continue
    lines += ["", f"law {law_name}: paired Sharpe difference against the projection"]
    for k in METHODS:
        if k == "projection":
            continue
        d = torch.tensor([x["sharpe"] for x in rows[(law_name, k)]][: len(base)]) - base
        lines.append(
            f"{METHODS[k]:40s} {float(d.mean()):+.3f} ± {float(d.std()) / len(d) ** 0.5:.3f}"
            f"  better on {int((d > 0).sum())}/{len(d)} seeds"
        )

# %%
# Why (or why not) the networks beat equal weight
# -----------------------------------------------
# First the difference to equal weight (deterministic, so not paired): mean ±
# standard error over seeds, and on how many seeds the network beat it. Then the
# in-sample Sharpe (training years, at the chosen epoch; for skfolio the fitting
# window), validation Sharpe, out-of-sample Sharpe, the chosen epoch and the
# active share ``0.5 sum_i |w_i - 1/n|`` against equal weight; then the
# out-of-sample Sharpe per test year (mean over seeds).

for law_name in LAWS:
    equal = rows[(law_name, "equal")][0]["sharpe"]
    lines += ["", f"law {law_name}: Sharpe minus that of equal weight ({equal:.3f})"]
    for k in METHODS:
        d = torch.tensor([x["sharpe"] for x in rows[(law_name, k)]]) - equal
        se = float(d.std()) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        lines.append(
            f"{METHODS[k]:40s} {float(d.mean()):+.3f} ± {se:.3f}"
            f"  better on {int((d > 0).sum())}/{len(d)} seeds"
        )
    lines += [
        "",
        f"law {law_name}: in sample vs out of sample",
        f"{'method':40s} {'train SR':>8s} {'val SR':>7s} {'test SR':>7s}"
        f" {'epoch':>6s} {'active':>7s}",
    ]
    for k, name in NAMES.items():
        r = {f: np.mean([x[f] for x in rows[(law_name, k)]]) for f in rows[(law_name, k)][0]}
        lines.append(
            f"{name:40s} {r['train_sharpe']:8.2f} {r['val_sharpe']:7.2f} {r['sharpe']:7.2f} "
            f"{r['epoch']:6.1f} {r['active']:7.3f}"
        )
    lines += ["", f"law {law_name}: Sharpe per test year (mean over seeds)"]
    lines.append(f"{'method':40s} " + " ".join(f"{y:>6d}" for y in TEST_YEARS))
    for k, name in NAMES.items():
        per_year = np.mean([x["annual_sharpe"] for x in rows[(law_name, k)]], axis=0)
        lines.append(f"{name:40s} " + " ".join(f"{v:6.2f}" for v in per_year))

table = "\n".join(lines)
print(table)
(OUT / f"portfolio_results_{mode}.txt").write_text(table + "\n")
print(f"table in {OUT}; total {time.time() - T0:.0f} s")

torch.set_num_threads(_saved[0])
torch.distributions.Distribution.set_default_validate_args(_saved[1])

# %%
# What the full run shows
# -----------------------
# The rendered page above is the smoke run (one test year, three epochs). The
# full run, ``docs/results/portfolio_full.txt`` (test years 2018-2022, 10 seeds
# per law), reads:
#
# * **No network beats equal weight.** Equal weight has Sharpe 0.90; the best
#   network, with softmax weights, is level with it (0.90 ± 0.08, +0.007 ±
#   0.025, better on 5 of 10 seeds), and every other is below. So are the
#   optimised references (minimum variance 0.71, maximum Sharpe 0.76): the
#   "1/n puzzle" of DeMiguel, Garlappi & Uppal (2009) on 20 large stocks.
# * **Why: the learned edge does not carry to the next year.** The networks
#   reach Sharpe 2.0-2.3 on their training years and on the validation year
#   that picks their epoch, and 0.55-0.90 out of sample; equal weight goes from
#   1.08 in sample to 0.90. A daily turnover of 0.5-0.9 for the constrained
#   networks (equal weight: 0.01) means they trade on day-to-day noise; with
#   costs they would lose more.
# * **The paper's direction is reproduced at its ends only.** Every method
#   that enforces the budget beats the unconstrained network (0.55 ± 0.23, its
#   weights summing to anything within 1.4 of one), and the constraint layer,
#   which pins the whole budget residual on one stock, is the worst of them
#   (0.58, drawdown 0.54). Between the projection and conditioning the order is
#   reversed here: projection 0.84 ± 0.12, constrained reparametrization 0.80,
#   conditioning 0.78 (marginal) and 0.75 (closed form); the paired difference
#   of the marginal estimator against the projection is -0.056 ± 0.028 (better
#   on 4 of 10 seeds). The measurement: the extra degree of freedom of
#   conditioning (which assets absorb the budget's residual, through the
#   learned scales) is spent on larger bets, active share 0.53 against 0.39 for
#   the projection and turnover 0.85 against 0.61, which fit the training
#   years better (Sharpe 2.28 against 2.15) and the test years worse.
# * **Under the sector law** the picture is the same: softmax (0.91 ± 0.05) and
#   the projection (0.90 ± 0.06) are level with equal weight (0.90), which
#   satisfies the law itself; conditioning follows (closed form 0.85 ± 0.11,
#   marginal 0.83 ± 0.18; paired against the projection -0.041 ± 0.040 and
#   -0.064 ± 0.061), then constrained reparametrization (0.78) and the
#   constraint layer (0.68). The optimised references break the law by up to
#   0.40 (a sector's weight off its target by 40 points).
# * Every constrained method satisfies its law to float64 rounding
#   (``max viol`` at most 3e-15).
