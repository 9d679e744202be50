"""ConstrainedTrace_ELBO against Trace_ELBO and an exact (dense) ELBO."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from _families import NoRsample
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import constraints

import pyro_linconstr as plc
from pyro_linconstr.infer import ConstrainedTrace_ELBO

TAU = 0.7  # likelihood scale


def problem(n=4, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    loc = torch.randn(n, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    return A, b, y, loc, scale


def model(loc, scale, y, A, b, wrap=None):
    x = pyro.sample("x", plc.constrain(dist.Normal(torch.zeros_like(y), 1.0).to_event(1), A, b))
    pyro.sample("y", dist.Normal(x, TAU).to_event(1), obs=y)


def guide(loc, scale, y, A, b, wrap=None):
    d = plc.constrain(dist.Normal(loc, scale).to_event(1), A, b)
    pyro.sample("x", wrap(d) if wrap else d)


def exact_loss(loc, scale, y, A, b):
    """-ELBO by dense float64 algebra: E_q of the quadratics plus the entropy of q."""
    n, m = A.shape[1], A.shape[0]
    Sigma = torch.diag(scale**2)
    K = Sigma @ A.T
    S = A @ K
    mq = loc + K @ torch.linalg.solve(S, b - A @ loc)
    Cq = Sigma - K @ torch.linalg.solve(S, K.T)
    tr = Cq.diagonal().sum()
    AAt = A @ A.T
    prior_norm = dist.MultivariateNormal(torch.zeros(m), AAt).log_prob(b) + 0.5 * torch.logdet(AAt)
    e_prior = -0.5 * (mq @ mq + tr) - 0.5 * n * math.log(2 * math.pi) - prior_norm
    e_lik = -0.5 * ((y - mq) @ (y - mq) + tr) / TAU**2 - 0.5 * n * math.log(2 * math.pi * TAU**2)
    k = n - m
    eig = torch.linalg.eigvalsh(Cq)[m:]
    entropy = 0.5 * k * (1 + math.log(2 * math.pi)) + 0.5 * eig.log().sum()
    return -(e_prior + e_lik + entropy)


def exact_grad(loc, scale, y, A, b):
    loc, scale = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    return torch.cat(torch.autograd.grad(exact_loss(loc, scale, y, A, b), [loc, scale]))


def per_particle(estimator, loc, scale, y, A, b, particles, wrap=None, elbo=None):
    """Losses and gradients of single particles: one parameter row per vectorized particle."""
    # max_plate_nesting=0 (+1 for the particles) skips the guess, which would run the
    # per-particle guide without its particle plate.
    elbo = elbo or ConstrainedTrace_ELBO(
        estimator=estimator, num_particles=particles, vectorize_particles=True, max_plate_nesting=0
    )
    loc_p = loc.expand(particles, -1).clone().requires_grad_()
    scale_p = scale.expand(particles, -1).clone().requires_grad_()
    value = elbo.differentiable_loss(model, guide, loc_p, scale_p, y, A, b, wrap=wrap)
    grads = torch.autograd.grad(value, [loc_p, scale_p])
    return value, torch.cat(grads, -1) * particles


# ---------------------------------------------------------------- Trace_ELBO
@pytest.mark.parametrize("vectorize", [False, True])
def test_reparam_equals_trace_elbo(vectorize):
    torch.set_default_dtype(torch.float64)
    A, b, y, loc0, scale0 = problem()

    def guide_p():
        loc = pyro.param("loc", loc0.clone())
        scale = pyro.param("scale", scale0.clone(), constraint=constraints.positive)
        pyro.sample("x", plc.constrain(dist.Normal(loc, scale).to_event(1), A, b))

    def model_p():
        model(None, None, y, A, b)

    results = []
    for elbo in (
        Trace_ELBO(num_particles=3, vectorize_particles=vectorize),
        ConstrainedTrace_ELBO("reparam", num_particles=3, vectorize_particles=vectorize),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(4)
        value = elbo.loss_and_grads(model_p, guide_p)
        grads = [pyro.param(k).unconstrained().grad.clone() for k in ("loc", "scale")]
        pyro.set_rng_seed(9)
        plain = elbo.loss(model_p, guide_p)
        pyro.set_rng_seed(9)
        diff = elbo.differentiable_loss(model_p, guide_p).item()
        results.append((value, grads, plain, diff))
    (v1, g1, l1, d1), (v2, g2, l2, d2) = results
    assert v1 == v2 and l1 == l2 and d1 == d2
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ------------------------------------------------------------- exact oracle
def test_loss_matches_exact_elbo():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem()
    exact = exact_loss(loc, scale, y, A, b).item()
    for est in ("reparam", "marginal", "score"):
        elbo = ConstrainedTrace_ELBO(est, num_particles=20, vectorize_particles=True)
        values = torch.tensor([elbo.loss(model, guide, loc, scale, y, A, b) for _ in range(200)])
        se = values.std() / math.sqrt(values.numel())
        assert abs(values.mean() - exact) < 5 * se


@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_unbiased_gradients_vectorized(estimator):
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem()
    exact = exact_grad(loc, scale, y, A, b)
    _, G = per_particle(estimator, loc, scale, y, A, b, 20_000)
    z = (G.mean(0) - exact) / (G.std(0) / math.sqrt(G.shape[0]))
    assert z.abs().max() < 5, z


def test_score_with_running_average_is_unbiased():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem(3, 1, seed=2)
    exact = exact_grad(loc, scale, y, A, b)
    elbo = ConstrainedTrace_ELBO("score", num_particles=2)
    rows = []
    for _ in range(600):
        loc_r, scale_r = loc.clone().requires_grad_(), scale.clone().requires_grad_()
        value = elbo.differentiable_loss(model, guide, loc_r, scale_r, y, A, b)
        rows.append(torch.cat(torch.autograd.grad(value, [loc_r, scale_r])))
    G = torch.stack(rows)
    z = (G.mean(0) - exact) / (G.std(0) / math.sqrt(G.shape[0]))
    assert z.abs().max() < 5, z


def test_score_baseline_reduces_variance():
    """Against Trace_ELBO's own baseline-free score function on a family without rsample."""
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem()
    _, with_baseline = per_particle("score", loc, scale, y, A, b, 4000)
    plain = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)
    _, without = per_particle(None, loc, scale, y, A, b, 4000, wrap=NoRsample, elbo=plain)
    assert with_baseline.var(0).sum() < 0.5 * without.var(0).sum()


def test_marginal_loc_gradient_equals_reparam():
    """For a Gaussian, x - E[x | Ax=b] does not depend on loc: ME and CR agree there."""
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem()
    grads = {}
    for est in ("marginal", "reparam"):
        pyro.set_rng_seed(1)
        grads[est] = per_particle(est, loc, scale, y, A, b, 500)[1]
    n = loc.shape[0]
    assert torch.allclose(grads["marginal"][:, :n], grads["reparam"][:, :n], atol=1e-10)
    assert not torch.allclose(grads["marginal"][:, n:], grads["reparam"][:, n:])


# ---------------------------------------------------------------------- SVI
@pytest.mark.parametrize("estimator", ["reparam", "marginal", "score"])
def test_svi_finds_the_exact_posterior_mean(estimator):
    """The guide family contains the posterior constrain(N(y / (1 + tau^2), ...), A, b)."""
    A = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 1.0]])
    b = torch.tensor([1.0, 0.5])
    y = torch.tensor([2.0, -1.0, 0.5, 1.0])

    def guide_p(y):
        loc = pyro.param("loc", torch.zeros(4))
        scale = pyro.param("scale", torch.ones(4), constraint=constraints.positive)
        pyro.sample("x", plc.constrain(dist.Normal(loc, scale).to_event(1), A, b))

    def model_p(y):
        model(None, None, y, A, b)

    elbo = ConstrainedTrace_ELBO(estimator, num_particles=16, vectorize_particles=True)
    svi = SVI(model_p, guide_p, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(300):
        svi.step(y)
    q = plc.constrain(dist.Normal(pyro.param("loc"), pyro.param("scale")).to_event(1), A, b)
    post = plc.constrain(dist.Normal(y / (1 + TAU**2), 1.0).to_event(1), A, b)
    assert (q.mean.detach() - post.mean).abs().max() < 0.15


def test_plates_and_subsampling():
    A, b = torch.ones(1, 3), torch.zeros(1)
    data = torch.randn(10, 3)

    def model_p(data):
        with pyro.plate("data", 10, subsample_size=5) as idx:
            prior = dist.Normal(torch.zeros(3), 1.0).to_event(1)
            x = pyro.sample("x", plc.constrain(prior, A, b))
            pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=data[idx])

    def guide_p(data):
        loc = pyro.param("loc", torch.zeros(10, 3))
        with pyro.plate("data", 10, subsample_size=5) as idx:
            base = dist.Normal(loc[idx], 0.5).to_event(1)
            pyro.sample("x", plc.constrain(base, A, b))

    for est in ("marginal", "score", "reparam"):
        for vectorize in (False, True):
            pyro.clear_param_store()
            elbo = ConstrainedTrace_ELBO(est, num_particles=3, vectorize_particles=vectorize)
            svi = SVI(model_p, guide_p, pyro.optim.Adam({"lr": 0.01}), elbo)
            assert math.isfinite(svi.step(data))
            moved = int((pyro.param("loc").detach() != 0).any(-1).sum())
            # only subsampled rows move: one subsample of 5 (vectorized) or one per particle
            assert moved == 5 if vectorize else 5 <= moved <= 15


# ------------------------------------------------------------------- errors
def test_bad_configurations():
    with pytest.raises(ValueError, match="unknown estimator"):
        ConstrainedTrace_ELBO("pathwise")
    with pytest.raises(ValueError, match="closed_form"):
        ConstrainedTrace_ELBO("closed_form")
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem()
    with pytest.raises(ValueError, match="rsample"):
        ConstrainedTrace_ELBO("reparam").loss(model, guide, loc, scale, y, A, b, wrap=NoRsample)


def test_family_without_rsample_trains_with_marginal_and_score():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, scale = problem()
    for est in ("marginal", "score"):
        loc_r = loc.clone().requires_grad_()
        elbo = ConstrainedTrace_ELBO(est, num_particles=4)
        value = elbo.differentiable_loss(model, guide, loc_r, scale, y, A, b, wrap=NoRsample)
        (g,) = torch.autograd.grad(value, [loc_r])
        assert torch.isfinite(g).all() and g.abs().sum() > 0
