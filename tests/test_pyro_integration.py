"""``plc.LinearConstraint`` inside Pyro: poutines, plates, Predictive, AutoGuides, MCMC, arviz.

Oracles are closed forms (the exchangeable sum-to-zero Gaussian, a conjugate
Gaussian model) and tolerances come from Monte Carlo standard errors.
"""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import HMC, MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

import pyro_linconstr as plc

K = 5  # groups
SIGMA = 2.0
ZERO_SUM = (torch.ones(1, K), torch.zeros(1))


def prior_model():
    return pyro.sample("eff", dist.Normal(torch.zeros(K), SIGMA).to_event(1))


# --- a conjugate model: eff ~ N(0, tau^2 I) on sum(eff) = 0, y[j, k] ~ N(eff[k], s^2)
TAU, S, J = 1.5, 1.0, 3


def conj_data():
    g = torch.Generator().manual_seed(7)
    truth = torch.tensor([1.0, -0.5, 0.2, -1.2, 0.5])
    return truth + S * torch.randn(J, K, generator=g)


@plc.LinearConstraint(*ZERO_SUM, site="eff")
def conj_model(y):
    eff = pyro.sample("eff", dist.Normal(torch.zeros(K), TAU).to_event(1))
    with pyro.plate("obs", J):
        pyro.sample("y", dist.Normal(eff, S).to_event(1), obs=y)


def conj_posterior(y):
    """Closed form: the unconstrained conjugate posterior, then conditioned on sum = 0."""
    var_u = 1.0 / (1.0 / TAU**2 + J / S**2)
    mean_u = var_u * y.sum(0) / S**2
    return mean_u - mean_u.mean(), torch.full((K,), var_u * (1 - 1 / K))


def _on_subspace(x, A, b):
    return bool(plc.constraints.affine_subspace(A, b).check(x).all())


# ----------------------------------------------------------------------------- Predictive
@pytest.mark.parametrize("parallel", [False, True])
def test_predictive_samples_satisfy_constraint(parallel):
    model = plc.LinearConstraint(*ZERO_SUM, site="eff")(prior_model)
    x = Predictive(model, num_samples=500, parallel=parallel)()["eff"]
    assert x.shape == (500, K)
    assert _on_subspace(x, *ZERO_SUM)
    # the exact marginal variance sigma^2 (1 - 1/K); the sample variance of 500 draws
    # has relative standard error sqrt(2/499) ~ 6%
    assert torch.allclose(x.var(0), torch.tensor(SIGMA**2 * (1 - 1 / K)), rtol=0.3)


# ----------------------------------------------------------------------------- poutines
def test_trace_replay_condition_scale_mask():
    model = plc.LinearConstraint(*ZERO_SUM, site="eff")(prior_model)
    tr = poutine.trace(model).get_trace()
    x = tr.nodes["eff"]["value"]
    lp = plc.constrain(dist.Normal(torch.zeros(K), SIGMA).to_event(1), *ZERO_SUM).log_prob(x)
    assert torch.allclose(tr.log_prob_sum(), lp)

    replayed = poutine.trace(poutine.replay(model, trace=tr)).get_trace()
    assert torch.equal(replayed.nodes["eff"]["value"], x)
    assert torch.allclose(replayed.log_prob_sum(), lp)

    cond = poutine.trace(poutine.condition(model, data={"eff": x})).get_trace()
    assert cond.nodes["eff"]["is_observed"]
    assert torch.allclose(cond.log_prob_sum(), lp)

    scaled = poutine.trace(poutine.scale(model, scale=3.0)).get_trace()
    assert torch.allclose(
        scaled.log_prob_sum(),
        3.0 * scaled.nodes["eff"]["fn"].log_prob(scaled.nodes["eff"]["value"]),
    )
    masked = poutine.trace(poutine.mask(model, mask=torch.tensor(False))).get_trace()
    assert float(masked.log_prob_sum()) == 0.0
    assert _on_subspace(masked.nodes["eff"]["value"], *ZERO_SUM)

    blocked = poutine.trace(poutine.block(model)).get_trace()
    assert "eff" not in blocked.nodes


# ----------------------------------------------------------------------------- plates
def _plate_model(N, subsample_size=None, obs=None):
    def model():
        with pyro.plate("data", N, subsample_size=subsample_size) as idx:
            y = None if obs is None else obs[idx]
            return idx, pyro.sample("x", dist.Normal(torch.zeros(K), 1.0).to_event(1), obs=y)

    return model


def test_plate_with_per_datum_b():
    N = 6
    B = torch.randn(N, 1)
    model = plc.LinearConstraint(torch.ones(1, K), B, site="x")(_plate_model(N))
    tr = poutine.trace(model).get_trace()
    _, x = tr.nodes["_RETURN"]["value"]
    assert x.shape == (N, K)
    assert _on_subspace(x, torch.ones(1, K), B)
    # vectorised Predictive adds a sample dim in front of the plate
    xs = Predictive(model, num_samples=20, parallel=True, return_sites=["x"])()["x"]
    assert xs.shape == (20, N, K)
    assert _on_subspace(xs, torch.ones(1, K), B)


def test_subsampling_plate_selects_per_datum_b_and_scales():
    N, sub = 10, 3
    B = torch.arange(N, dtype=torch.float32).unsqueeze(-1)
    model = plc.LinearConstraint(torch.ones(1, K), B, site="x")(_plate_model(N, sub))
    tr = poutine.trace(model).get_trace()
    idx, x = tr.nodes["_RETURN"]["value"]
    assert x.shape == (sub, K)
    assert torch.allclose(x.sum(-1), B[idx, 0], atol=1e-5)
    base = dist.Normal(torch.zeros(sub, K), 1.0).to_event(1)
    lp = plc.constrain(base, torch.ones(1, K), B[idx]).log_prob(x).sum()
    assert torch.allclose(tr.log_prob_sum(), N / sub * lp)


def test_subsampled_observed_site_trains_with_svi():
    N, sub = 12, 4
    groups = torch.tensor([0, 0, 1, 1, 1])
    A = plc.GroupSum(groups, 2)
    data = plc.project(torch.randn(N, K) + 2.0, A, torch.randn(N, 2))
    B = A.matvec(data)

    def model():
        loc = pyro.param("loc", torch.zeros(K))
        with pyro.plate("data", N, subsample_size=sub) as idx:
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=data[idx])

    model = plc.LinearConstraint(A, B, site="x")(model)
    svi = SVI(model, lambda: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(300):
        svi.step()
    # only loc's component orthogonal to the row space of A is identified: it is the
    # projection of the data mean onto null(A) (a 12-point mean, subsampling noise ~ 0.1)
    loc = pyro.param("loc").detach()
    mean = data.mean(0)
    null_part = lambda v: v - plc.project(v, A, torch.zeros(2))  # noqa: E731
    assert torch.allclose(null_part(loc), null_part(mean), atol=0.25)


# ----------------------------------------------------------------------------- AutoGuides
@pytest.mark.parametrize(
    "Guide", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoDelta]
)
def test_autoguides_sample_on_subspace_with_per_datum_b(Guide):
    N = 3
    B = torch.tensor([[1.0], [-2.0], [0.5]])
    model = plc.LinearConstraint(torch.ones(1, K), B, site="x")(_plate_model(N))
    guide = Guide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(10):
        assert math.isfinite(svi.step())
    x = Predictive(model, guide=guide, num_samples=7, return_sites=["x"])()["x"]
    assert x.shape == (7, N, K)
    assert _on_subspace(x, torch.ones(1, K), B)


def test_autoguide_under_subsampled_per_datum_b_is_caught_by_validation():
    # documented limitation: an AutoGuide's transform comes from its prototype subsample
    N = 10
    B = 3 * torch.randn(N, 1)
    model = plc.LinearConstraint(torch.ones(1, K), B, site="x")(_plate_model(N, 3))
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    with pytest.raises(ValueError, match="support"):
        for _ in range(5):
            svi.step()


def test_svi_autodelta_reaches_posterior_mean():
    y = conj_data()
    mean, _ = conj_posterior(y)
    guide = AutoDelta(conj_model)
    svi = SVI(conj_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(600):
        svi.step(y)
    est = guide.median(y)["eff"].detach()
    assert torch.allclose(est, mean, atol=2e-3)  # deterministic optimisation: MAP = mean


@pytest.mark.parametrize("Guide", [AutoNormal, AutoMultivariateNormal])
def test_svi_autoguide_reaches_analytic_posterior(Guide):
    y = conj_data()
    mean, var = conj_posterior(y)
    guide = Guide(conj_model)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    svi = SVI(conj_model, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True))
    for _ in range(600):
        svi.step(y)
    x = Predictive(conj_model, guide=guide, num_samples=4000, return_sites=["eff"])(y)["eff"]
    assert _on_subspace(x, *ZERO_SUM)
    # SVI noise at the final step size plus Monte Carlo error of 4000 draws
    se_mean = (var / 4000).sqrt()
    assert torch.allclose(x.mean(0), mean, atol=float(4 * se_mean.max()) + 0.03)
    assert torch.allclose(x.var(0), var, rtol=0.15)


# ----------------------------------------------------------------------------- MCMC
def _ess(x: np.ndarray) -> float:
    """Bulk ESS of a (chains, draws) array."""
    return float(az.ess(x))


@pytest.fixture(scope="module")
def prior_runs():
    """Two NUTS chains on eff ~ N(0, sigma^2 I) given sum(eff) = 0 (run sequentially)."""
    pyro.set_rng_seed(11)
    model = plc.LinearConstraint(*ZERO_SUM, site="eff")(prior_model)
    runs = []
    for _ in range(2):
        mcmc = MCMC(NUTS(model), num_samples=300, warmup_steps=150, disable_progbar=True)
        mcmc.run()
        runs.append(mcmc)
    return runs


def test_nuts_recovers_zero_sum_normal_variance(prior_runs):
    x = torch.stack([m.get_samples()["eff"] for m in prior_runs]).double()  # (2, 300, K)
    assert _on_subspace(x.float(), *ZERO_SUM)
    target = SIGMA**2 * (1 - 1 / K)  # the ZeroSumNormal marginal variance
    for k in range(K):
        sq = (x[..., k] - 0.0) ** 2  # the mean is 0 exactly
        se = float(sq.std()) / math.sqrt(_ess(sq.numpy()))
        assert abs(float(sq.mean()) - target) < 4 * se, (k, float(sq.mean()), target, se)
    # the pooled estimate is tighter
    assert abs(float((x**2).mean()) - target) < 0.2 * target


def test_arviz_from_pyro_and_summary(prior_runs):
    idata = az.concat([az.from_pyro(m) for m in prior_runs], dim="chain")
    assert idata.posterior["eff"].shape == (2, 300, K)
    summary = az.summary(idata, var_names=["eff"])
    assert len(summary) == K
    assert bool((summary["r_hat"] < 1.05).all())
    assert bool((summary["ess_bulk"] > 100).all())
    # the coordinates sum to zero draw by draw
    assert np.allclose(idata.posterior["eff"].sum("eff_dim_0"), 0.0, atol=1e-5)


def test_nuts_conjugate_posterior_mean():
    pyro.set_rng_seed(3)
    y = conj_data()
    mean, var = conj_posterior(y)
    mcmc = MCMC(NUTS(conj_model), num_samples=200, warmup_steps=100, disable_progbar=True)
    mcmc.run(y)
    x = mcmc.get_samples()["eff"]
    assert _on_subspace(x, *ZERO_SUM)
    for k in range(K):
        se = math.sqrt(float(var[k]) / _ess(x[None, :, k].numpy()))
        assert abs(float(x[:, k].mean() - mean[k])) < 4 * se


def test_hmc_samples_satisfy_per_datum_constraint():
    N = 3
    B = torch.tensor([[1.0, 0.0], [0.0, -1.0], [2.0, 2.0]])
    A = plc.GroupSum(torch.tensor([0, 0, 1, 1, 1]), 2)
    model = plc.LinearConstraint(A, B, site="x")(_plate_model(N))
    mcmc = MCMC(
        HMC(model, step_size=0.3, num_steps=4),
        num_samples=50,
        warmup_steps=20,
        disable_progbar=True,
    )
    mcmc.run()
    x = mcmc.get_samples()["x"]
    assert x.shape == (50, N, K)
    assert _on_subspace(x, A, B)
    assert x.std(0).min() > 0.1  # the chain moved
