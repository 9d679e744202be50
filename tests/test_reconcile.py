"""plc.reconcile against independent oracles.

Oracles (numpy, float64, written from the papers' formulas, not from the library):
MinT ``S (S^T W^-1 S)^-1 S^T W^-1 y_hat`` and its special cases OLS (``W = I``)
and WLS (diagonal ``W``); MinT's reconciled covariance ``S G W G^T S^T``; the
Schäfer-Strimmer shrinkage covariance written as R's ``hts::shrink.estim`` (with
explicit loops over pairs); the exactness bound of the package.
"""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch

import pyro_linconstr as plc
from pyro_linconstr.ops import SparseOperator
from pyro_linconstr.reconcile import shrinkage_gaussian

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta", "ignore:Sparse invariant checks"
)


# ------------------------------------------------------------------ hierarchies
def employment_S() -> torch.Tensor:
    """The grouped hierarchy of the tutorial: 7 aggregates over 15 bottom series; the
    aggregates overlap (nonfarm = private + government = goods + services)."""
    children = {
        0: [1, 14],  # nonfarm = private + government
        1: [2, 4],  # private = goods-producing + private services
        3: [4, 14],  # service-providing = private services + government
        2: [7, 8, 5],  # goods = mining + construction + manufacturing
        5: [9, 10],  # manufacturing = durable + nondurable
        4: [6, 11, 12, 13, 15, 16, 17],  # private services: TTU + 6 supersectors
        6: [18, 19, 20, 21],  # trade, transportation, utilities
    }
    # series 0..6 aggregates, 7.. bottom; express everything in bottom series recursively
    n_agg = 7
    bottoms = sorted(set(c for cs in children.values() for c in cs if c >= n_agg))
    index = {b: i for i, b in enumerate(bottoms)}

    def leaves(j):
        if j >= n_agg:
            return [j]
        return [x for c in children[j] for x in leaves(c)]

    S = torch.zeros(n_agg + len(bottoms), len(bottoms), dtype=F64)
    for j in range(n_agg):
        for leaf in leaves(j):
            S[j, index[leaf]] = 1.0
    S[n_agg:] = torch.eye(len(bottoms), dtype=F64)
    return S


def random_tree_S(seed: int, n_bottom: int = 9) -> torch.Tensor:
    """Total, a random partition of the bottom series into 3 groups, and the bottom."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 3, (n_bottom,), generator=g)
    groups[:3] = torch.arange(3)  # no empty group
    S = torch.cat(
        [
            torch.ones(1, n_bottom, dtype=F64),
            torch.nn.functional.one_hot(groups, 3).T.to(F64),
            torch.eye(n_bottom, dtype=F64),
        ]
    )
    return S


def random_spd(n: int, seed: int, spread: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = np.exp(rng.uniform(-spread, spread, size=n))
    return (Q * ev) @ Q.T


def mint(S: np.ndarray, W: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MinT: S (S^T W^-1 S)^-1 S^T W^-1 y (rows of y are forecasts)."""
    Wi = np.linalg.inv(W)
    G = np.linalg.solve(S.T @ Wi @ S, S.T @ Wi)
    return y @ (S @ G).T


def identity_residual(S: torch.Tensor, x: torch.Tensor):
    """|y_agg - S_agg y_bottom| and the bound c eps (|y_agg| + |S_agg| |y_bottom|)."""
    n_total, n_bottom = S.shape
    n_agg = n_total - n_bottom
    Sa = S[:n_agg].to(x.dtype)
    r = (x[..., :n_agg] - x[..., n_agg:] @ Sa.T).abs()
    scale = x[..., :n_agg].abs() + x[..., n_agg:].abs() @ Sa.abs().T
    c = 8 * math.sqrt(n_total)
    return r, c * torch.finfo(x.dtype).eps * scale


# ------------------------------------------------------------------ Gaussian forecasts
@pytest.mark.parametrize("S_fn", [employment_S, lambda: random_tree_S(3)])
def test_mean_is_mint_full_covariance(S_fn):
    S = S_fn()
    n = S.shape[0]
    W = random_spd(n, seed=1)
    rng = np.random.default_rng(2)
    y_hat = rng.normal(size=(4, n)) * 10
    d = plc.reconcile(
        dist.MultivariateNormal(torch.tensor(y_hat), covariance_matrix=torch.tensor(W)), S
    )
    expected = mint(S.numpy(), W, y_hat)
    np.testing.assert_allclose(d.mean.numpy(), expected, rtol=1e-9, atol=1e-9)
    # covariance: the Gaussian conditional, equal to MinT's S G W G^T S^T for this W
    Wi = np.linalg.inv(W)
    Sn = S.numpy()
    G = np.linalg.solve(Sn.T @ Wi @ Sn, Sn.T @ Wi)
    cov_mint = Sn @ G @ W @ G.T @ Sn.T
    np.testing.assert_allclose(cov_mint, Sn @ np.linalg.inv(Sn.T @ Wi @ Sn) @ Sn.T, atol=1e-9)
    np.testing.assert_allclose(d.variance.numpy(), np.broadcast_to(np.diag(cov_mint), (4, n)))


def test_ols_and_wls():
    S = employment_S()
    Sn = S.numpy()
    n = S.shape[0]
    rng = np.random.default_rng(5)
    y_hat = rng.normal(size=n) * 100
    # OLS: W = sigma^2 I (the scale does not matter)
    d = plc.reconcile(
        dist.Normal(torch.tensor(y_hat), 3.0 * torch.ones(n, dtype=F64)).to_event(1), S
    )
    ols = Sn @ np.linalg.solve(Sn.T @ Sn, Sn.T @ y_hat)
    np.testing.assert_allclose(d.mean.numpy(), ols, rtol=1e-10, atol=1e-9)
    # WLS: diagonal W with variances spanning four orders of magnitude
    var = np.exp(rng.uniform(-4.6, 4.6, size=n))
    d = plc.reconcile(dist.Normal(torch.tensor(y_hat), torch.tensor(var).sqrt()).to_event(1), S)
    wls = Sn @ np.linalg.solve(Sn.T @ (Sn / var[:, None]), Sn.T @ (y_hat / var))
    np.testing.assert_allclose(d.mean.numpy(), wls, rtol=1e-9, atol=1e-8)
    assert not np.allclose(ols, wls, rtol=1e-3)  # the two weightings really differ here


def test_low_rank_forecast_and_batch_per_horizon():
    S = random_tree_S(7)
    n = S.shape[0]
    rng = np.random.default_rng(8)
    H, r = 3, 2
    F = rng.normal(size=(H, n, r))
    D = np.exp(rng.normal(size=(H, n)))
    y_hat = rng.normal(size=(H, n))
    d = plc.reconcile(
        dist.LowRankMultivariateNormal(torch.tensor(y_hat), torch.tensor(F), torch.tensor(D)), S
    )
    assert d.batch_shape == (H,) and d.event_shape == (n,)
    for h in range(H):
        W = F[h] @ F[h].T + np.diag(D[h])
        np.testing.assert_allclose(d.mean[h].numpy(), mint(S.numpy(), W, y_hat[h]), atol=1e-9)


def test_float32_forecast_agrees_with_float64_oracle():
    S = employment_S()
    n = S.shape[0]
    W = random_spd(n, seed=11, spread=1.0)
    y_hat = np.random.default_rng(12).normal(size=n)
    base = dist.MultivariateNormal(
        torch.tensor(y_hat, dtype=torch.float32),
        covariance_matrix=torch.tensor(W, dtype=torch.float32),
    )
    d = plc.reconcile(base, S.float())
    assert d.mean.dtype == torch.float32
    expected = mint(S.numpy(), W, y_hat)
    np.testing.assert_allclose(d.mean.numpy(), expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("layout", ["coo", "csr", "int"])
def test_sparse_and_integer_S_match_dense(layout):
    S = employment_S()
    n = S.shape[0]
    base = dist.Normal(
        torch.linspace(-3, 5, n, dtype=F64), torch.linspace(0.5, 2, n, dtype=F64)
    ).to_event(1)
    S2 = {"coo": S.to_sparse_coo(), "csr": S.to_sparse_csr(), "int": S.long()}[layout]
    torch.testing.assert_close(plc.reconcile(base, S2).mean, plc.reconcile(base, S).mean)


def test_structured_S_uses_a_sparse_operator_without_n_by_n_work(monkeypatch):
    # 1 total + 5 groups + 50,000 bottom series: an n x n matrix would hold 2.5e9 entries,
    # and no m x n matrix is formed either (to_dense raises)
    def no_dense(self):
        raise AssertionError("the m x n matrix was formed")

    monkeypatch.setattr(SparseOperator, "to_dense", no_dense)
    n_bottom, k = 50_000, 5
    groups = torch.arange(n_bottom) % k
    rows = torch.cat(
        [torch.zeros(n_bottom, dtype=torch.long), 1 + groups, 1 + k + torch.arange(n_bottom)]
    )
    cols = torch.arange(n_bottom).repeat(3)
    n = 1 + k + n_bottom
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(3 * n_bottom), (n, n_bottom))
    loc = torch.rand(n, dtype=F64)
    loc[0] = 0.0  # very incoherent: the total says 0
    d = plc.reconcile(dist.Normal(loc, torch.ones(n, dtype=F64)).to_event(1), S)
    assert isinstance(d.A, SparseOperator)
    assert d.A.nnz == (1 + k) + 2 * n_bottom
    x = d.sample((2,))
    r, bound = identity_residual_sparse(groups, k, x)
    assert bool((r <= bound).all())
    # OLS (W = I) by its optimality conditions: mean coherent, and loc - mean = A^T u, where
    # u is read off the aggregate entries (A's identity block) and the bottom entries of
    # A^T u are -(u_total + u_group)
    mean = d.mean
    r, bound = identity_residual_sparse(groups, k, mean)
    assert bool((r <= bound).all())
    u = (loc - mean)[: 1 + k]
    expected_bottom = -(u[0] + u[1 + groups])
    torch.testing.assert_close((loc - mean)[1 + k :], expected_bottom, rtol=1e-9, atol=1e-12)
    # samples in: the low-rank shrinkage covariance (8 samples << n), still no dense matrix
    y = loc + torch.randn(8, n, dtype=F64)
    xs = plc.reconcile(y, S)
    r, bound = identity_residual_sparse(groups, k, xs)
    assert bool((r <= bound).all())


def identity_residual_sparse(groups, k, x):
    bottom = x[..., 1 + k :]
    sums = torch.zeros(x.shape[:-1] + (k,), dtype=x.dtype).index_add(-1, groups, bottom)
    r = torch.cat([(x[..., :1] - bottom.sum(-1, keepdim=True)), x[..., 1 : 1 + k] - sums], -1)
    abs_sums = torch.zeros_like(sums).index_add(-1, groups, bottom.abs())
    scale = x[..., : 1 + k].abs() + torch.cat([bottom.abs().sum(-1, keepdim=True), abs_sums], -1)
    c = 8 * math.sqrt(x.shape[-1])
    return r.abs(), c * torch.finfo(x.dtype).eps * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_samples_are_coherent_to_machine_precision(dtype):
    S = employment_S().to(dtype)
    n = S.shape[0]
    # variances over eight orders of magnitude, levels as large as national employment
    scale = torch.logspace(-2, 2, n, dtype=dtype)
    loc = torch.linspace(100, 1.4e5, n, dtype=dtype)
    d = plc.reconcile(dist.Normal(loc, scale).to_event(1), S)
    x = d.sample((2000,))
    assert x.dtype == dtype
    r, bound = identity_residual(S, x)
    assert bool((r <= bound).all()), float((r / bound).max())


# ------------------------------------------------------------------ samples
def hts_shrink(x: np.ndarray) -> np.ndarray:
    """hts::shrink.estim on centred samples x (N, n), with explicit loops over pairs."""
    N, n = x.shape
    x = x - x.mean(0)
    covm = x.T @ x / N
    sd = np.sqrt(np.diag(covm))
    corm = covm / np.outer(sd, sd)
    xs = x / sd
    num = den = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            w = xs[:, i] * xs[:, j]
            num += (np.sum(w**2) - np.sum(w) ** 2 / N) / (N * (N - 1))
            den += corm[i, j] ** 2
    lam = min(max(num / den, 0.0), 1.0)
    return lam * np.diag(np.diag(covm)) + (1 - lam) * covm, lam


@pytest.mark.parametrize("num_samples", [12, 300])  # fewer (low rank) and more samples than series
def test_shrinkage_covariance_matches_hts(num_samples):
    S = employment_S()
    n = S.shape[0]
    W = random_spd(n, seed=21, spread=2.0)
    rng = np.random.default_rng(22)
    y = rng.multivariate_normal(np.zeros(n), W, size=(num_samples, 2))  # batch of 2 horizons
    g = shrinkage_gaussian(torch.tensor(y))
    assert g.batch_shape == (2,)
    for h in range(2):
        W_hts, lam = hts_shrink(y[:, h])
        assert 0 < lam < 1
        np.testing.assert_allclose(g.covariance_matrix[h].numpy(), W_hts, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g.loc[h].numpy(), y[:, h].mean(0), atol=1e-12)


@pytest.mark.parametrize("num_samples", [12, 300])
def test_samples_are_the_mint_projection_with_the_shrinkage_covariance(num_samples):
    S = employment_S()
    Sn = S.numpy()
    n = S.shape[0]
    rng = np.random.default_rng(31)
    # skewed, incoherent samples (log-normal around levels of different sizes), 3 horizons
    y = np.exp(rng.normal(size=(num_samples, 3, n)) * 0.3) * np.linspace(1, 50, n)
    x = plc.reconcile(torch.tensor(y), S)
    assert x.shape == y.shape and x.dtype == F64
    for h in range(3):
        W, _ = hts_shrink(y[:, h])
        np.testing.assert_allclose(x[:, h].numpy(), mint(Sn, W, y[:, h]), rtol=1e-9, atol=1e-9)
    r, bound = identity_residual(S, x)
    assert bool((r <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reconciled_samples_coherent_in_both_dtypes(dtype):
    S = random_tree_S(41).to(dtype)
    n = S.shape[0]
    y = torch.randn(500, 6, n, dtype=dtype) * torch.logspace(-1, 3, n, dtype=dtype) + 1e3
    x = plc.reconcile(y, S)
    assert x.dtype == dtype
    r, bound = identity_residual(S, x)
    assert bool((r <= bound).all()), float((r / bound).max())
    # the incoherence of the input is far above that bound
    r_in, bound_in = identity_residual(S, y)
    assert float((r_in / bound_in).min()) > 10


def test_coherent_samples_are_left_unchanged():
    S = employment_S()
    bottom = torch.randn(400, 2, S.shape[1], dtype=F64).exp()  # any law, here log-normal
    y = bottom @ S.T
    torch.testing.assert_close(plc.reconcile(y, S), y, rtol=1e-12, atol=1e-12)


def test_gaussian_samples_reconcile_to_the_conditional_law():
    # Monte Carlo: samples of N(y_hat, W) with a coherent y_hat, reconciled, have the
    # conditional mean y_hat (within 5 standard errors) and the conditional variances
    # diag(S (S^T W^-1 S)^-1 S^T) (within 5 standard errors, sqrt(2 / N) relative)
    S = random_tree_S(51)
    Sn = S.numpy()
    n = S.shape[0]
    W = random_spd(n, seed=52, spread=1.0)
    y_hat = Sn @ np.random.default_rng(53).normal(size=Sn.shape[1])
    N = 4000
    y = np.random.default_rng(54).multivariate_normal(y_hat, W, size=N)
    x = plc.reconcile(torch.tensor(y), S).numpy()
    cond_var = np.diag(Sn @ np.linalg.inv(Sn.T @ np.linalg.inv(W) @ Sn) @ Sn.T)
    assert np.all(np.abs(x.mean(0) - y_hat) < 5 * np.sqrt(cond_var / N))
    assert np.all(np.abs(x.var(0) / cond_var - 1) < 5 * np.sqrt(2 / N))
    assert np.all(y.var(0) > cond_var)  # conditioning removed variance


def test_no_aggregates_returns_the_forecast():
    base = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    assert plc.reconcile(base, torch.eye(3)) is base
    y = torch.randn(5, 3)
    assert plc.reconcile(y, torch.eye(3)) is y


def test_empty_batches_keep_their_shape():
    S = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.randn(5, 0, 3)
    assert plc.reconcile(y, S) is y
    d = plc.reconcile(dist.Normal(torch.zeros(0, 3), 1.0).to_event(1), S)
    assert d.mean.shape == (0, 3) and d.sample().shape == (0, 3)


def test_reconciled_gaussian_pickles():
    import pickle

    S = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    d = plc.reconcile(dist.Normal(torch.tensor([10.0, 4.0, 5.0]), 1.0).to_event(1), S)
    torch.testing.assert_close(pickle.loads(pickle.dumps(d)).mean, d.mean)


# ------------------------------------------------------------------ errors
S3 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
G3 = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)


@pytest.mark.parametrize(
    "forecast, S, exc, match",
    [
        (G3, torch.ones(3), ValueError, "S must be 2-D"),
        (G3, torch.ones(2, 3, 2), ValueError, "S must be 2-D"),
        (G3, S3.flip(0), ValueError, "last n_bottom = 2 rows of S must be the identity"),
        (G3, torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 2.0]]), ValueError, "identity"),
        (G3, S3.T, ValueError, "n_total >= n_bottom"),
        (
            G3,
            torch.tensor([[1.0, float("nan")], [1.0, 0.0], [0.0, 1.0]]),
            ValueError,
            "S has non-finite",
        ),
        (G3, [[1, 1], [1, 0], [0, 1]], TypeError, "S must be a torch.Tensor"),
        (dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1), S3, ValueError, "n_total = 3"),
        (torch.zeros(10, 4), S3, ValueError, r"\(num_samples, ..., n_total\) with n_total = 3"),
        (torch.zeros(3), S3, ValueError, "num_samples"),
        (torch.zeros(1, 3), S3, ValueError, "at least 2"),
        (torch.zeros(10, 3, dtype=torch.long), S3, ValueError, "floating point"),
        (torch.zeros(10, 3, dtype=torch.float16), S3, ValueError, "samples.float()"),
        (torch.zeros(10, 3, dtype=torch.bfloat16), S3, ValueError, "samples.float()"),
        (torch.tensor([[0.0, 1.0, float("inf")]] * 4), S3, ValueError, "non-finite"),
        (
            dist.Normal(
                torch.tensor([0.0, float("nan"), 0.0]), torch.ones(3), validate_args=False
            ).to_event(1),
            S3,
            ValueError,
            "non-finite parameters",
        ),
        (dist.Poisson(torch.ones(3)).to_event(1), S3, TypeError, "Gaussian over the n_total"),
        (dist.Normal(torch.zeros(3), torch.ones(3)), S3, TypeError, "event shape"),
        ([1.0, 2.0, 3.0], S3, TypeError, "forecast must be a Gaussian"),
    ],
)
def test_errors_name_the_argument(forecast, S, exc, match):
    with pytest.raises(exc, match=match):
        plc.reconcile(forecast, S)
