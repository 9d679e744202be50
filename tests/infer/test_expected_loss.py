"""ExpectedLoss: closed forms against Monte Carlo, estimator bias and variance, errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from _families import NoRsample
from pyro import poutine
from torch.distributions import constraints

import pyro_linconstr as plc
from pyro_linconstr.infer import ExpectedLoss
from pyro_linconstr.infer.estimators import estimated_sample, expected_abs_error


def guide(*args, **kwargs):
    pass


def dense_marginals(loc, cov, A, b):
    """Oracle: conditional mean and marginal variances by dense float64 algebra."""
    loc, cov, A, b = (t.double() for t in (loc, cov, A, b))
    K = cov @ A.T
    S = A @ K
    mean = loc + K @ torch.linalg.solve(S, b - A @ loc)
    var = (cov - K @ torch.linalg.solve(S, K.T)).diagonal()
    return mean, var


def problem(n=4, m=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    loc = torch.randn(n, generator=g, dtype=torch.float64)
    var = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    return A, A @ y, y, loc, var


def diag_model(loc, var, y, A, b):
    pyro.sample("x", plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b), obs=y)


def per_particle_grads(estimator, loss, loc, var, y, A, b, particles):
    """Single-sample gradients, one row per vectorized particle (the benchmark's trick)."""
    obj = ExpectedLoss(loss, estimator=estimator, num_particles=particles, vectorize_particles=True)
    loc_p = loc.expand(particles, -1).clone().requires_grad_()
    var_p = var.expand(particles, -1).clone().requires_grad_()
    value = obj.differentiable_loss(diag_model, guide, loc_p, var_p, y, A, b)
    return torch.cat(torch.autograd.grad(value, [loc_p, var_p]), -1) * particles


def exact_grad(loss, loc, var, y, A, b):
    loc, var = loc.clone().requires_grad_(), var.clone().requires_grad_()
    obj = ExpectedLoss(loss, "closed_form")
    value = obj.differentiable_loss(diag_model, guide, loc, var, y, A, b)
    return torch.cat(torch.autograd.grad(value, [loc, var]))


# ----------------------------------------------------------------- closed forms
@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("family", ["diag", "full", "lowrank"])
def test_closed_form_matches_dense_oracle_and_monte_carlo(loss, family):
    torch.set_default_dtype(torch.float64)
    n, m = 5, 2
    A, b, y, loc, var = problem(n, m, seed=3)
    if family == "diag":
        base, cov = dist.Normal(loc, var.sqrt()).to_event(1), torch.diag(var)
    elif family == "full":
        L = torch.tril(torch.randn(n, n)) * 0.3 + torch.diag(var.sqrt())
        base, cov = dist.MultivariateNormal(loc, scale_tril=L), L @ L.T
    else:
        W = 0.5 * torch.randn(n, 2)
        base, cov = dist.LowRankMultivariateNormal(loc, W, var), W @ W.T + torch.diag(var)
    d = plc.constrain(base, A, b)

    def model():
        pyro.sample("x", d, obs=y)

    exact = ExpectedLoss(loss, "closed_form").loss(model, guide)
    mean, v = dense_marginals(loc, cov, A, b)
    if loss == "l1":
        oracle = expected_abs_error(mean, v, y).sum()
    else:
        oracle = ((mean - y) ** 2 + v).sum()
    assert exact == pytest.approx(float(oracle), rel=1e-9)

    x = d.sample((40_000,))
    per = (x - y).abs().sum(-1) if loss == "l1" else ((x - y) ** 2).sum(-1)
    se = per.std() / math.sqrt(per.numel())
    assert abs(per.mean() - exact) < 5 * se
    # The objective's own Monte Carlo estimate, vectorized, agrees too.
    mc = ExpectedLoss(loss, "reparam", num_particles=20_000, vectorize_particles=True)
    assert abs(mc.loss(model, guide) - exact) < 5 * per.std() / math.sqrt(20_000)


def test_expected_abs_error_limits_and_gradcheck():
    torch.set_default_dtype(torch.float64)
    m = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    v = torch.tensor([0.7, 1e-3, 2.0], requires_grad=True)
    y = torch.tensor([0.1, 0.5, -0.4])
    assert torch.autograd.gradcheck(lambda m, v: expected_abs_error(m, v, y), (m, v))
    # v = 0: a coordinate fixed by the constraint has E|x - y| = |m - y|, finite gradient.
    zero = torch.zeros(3, requires_grad=True)
    out = expected_abs_error(m, zero, y)
    assert torch.allclose(out, (m - y).abs())
    out.sum().backward()
    assert torch.isfinite(zero.grad).all() and torch.isfinite(m.grad).all()


def test_plate_scale_and_mask():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, var = problem(4, 1, seed=5)
    ys = torch.stack([y, y + 1, y - 2])
    bs = ys @ A.T

    def one(i):
        d = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, bs[i])
        return ExpectedLoss("l1", "closed_form").loss(lambda: pyro.sample("x", d, obs=ys[i]), guide)

    singles = [one(i) for i in range(3)]
    mask = torch.tensor([True, False, True])

    def model():
        with pyro.plate("data", 3), poutine.scale(scale=2.0):
            base = dist.Normal(loc, var.sqrt()).to_event(1)
            pyro.sample("x", plc.constrain(base, A, bs).mask(mask), obs=ys)

    total = ExpectedLoss("l1", "closed_form").loss(model, guide)
    assert total == pytest.approx(2 * (singles[0] + singles[2]), rel=1e-9)
    for est in ("marginal", "score", "reparam"):
        value = ExpectedLoss("l1", est, num_particles=3).loss(model, guide)
        assert math.isfinite(value) and value > 0


def test_callable_loss_forms_agree_with_l2():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, var = problem()
    elementwise = lambda x, t: (x - t) ** 2  # noqa: E731
    per_datum = lambda x, t: ((x - t) ** 2).sum(-1)  # noqa: E731
    values = []
    for loss in ("l2", elementwise, per_datum):
        pyro.set_rng_seed(7)
        values.append(ExpectedLoss(loss, "reparam").loss(diag_model, guide, loc, var, y, A, b))
    assert values[0] == pytest.approx(values[1]) and values[0] == pytest.approx(values[2])


# ---------------------------------------------------------- gradient estimators
@pytest.mark.parametrize("estimator", ["reparam", "score"])
@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_unbiased_gradients(estimator, loss):
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, var = problem(4, 2, seed=2)
    exact = exact_grad(loss, loc, var, y, A, b)
    G = per_particle_grads(estimator, loss, loc, var, y, A, b, 4000)
    z = (G.mean(0) - exact) / (G.std(0) / math.sqrt(G.shape[0]))
    assert z.abs().max() < 5, z


def test_marginal_is_biased_but_exact_in_loc():
    """ME and CR give identical loc-gradients for the same draw; they differ in the variances."""
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, var = problem(6, 3, seed=4)
    grads = {}
    for est in ("marginal", "reparam"):
        pyro.set_rng_seed(11)
        grads[est] = per_particle_grads(est, "l1", loc, var, y, A, b, 2000)
    n = 6
    assert torch.allclose(grads["marginal"][:, :n], grads["reparam"][:, :n], atol=1e-12)
    exact = exact_grad("l1", loc, var, y, A, b)
    G = grads["marginal"]
    z = (G.mean(0)[n:] - exact[n:]) / (G.std(0)[n:] / math.sqrt(G.shape[0]))
    assert z.abs().max() > 5  # the bias is visible in the variance parameters


def test_marginal_has_lower_variance_than_reparam_in_the_paper_setting():
    """Diagonal Gaussian, m = n / 2 random constraints, mean L1 loss, grads w.r.t. (loc, var)."""
    torch.set_default_dtype(torch.float64)
    n = 10
    A, b, y, loc, var = problem(n, n // 2, seed=0)
    variance = {}
    for est in ("marginal", "reparam"):
        G = per_particle_grads(est, "l1", loc, var, y, A, b, 4000) / n
        variance[est] = (G.var(0).mean(), G[:, n:].var(0).mean())
    assert variance["marginal"][0] < 0.95 * variance["reparam"][0]
    assert variance["marginal"][1] < 0.8 * variance["reparam"][1]


def test_marginal_forward_value_is_the_exact_sample():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, var = problem()
    loc = loc.clone().requires_grad_()
    d = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b)
    pyro.set_rng_seed(3)
    x_me = estimated_sample(d, "marginal", torch.Size([5]))
    pyro.set_rng_seed(3)
    x_cr = d.rsample(torch.Size([5]))
    assert torch.equal(x_me.detach(), x_cr.detach())
    assert x_me.requires_grad


def test_loss_and_grads_matches_differentiable_loss():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc0, var = problem()

    def model():
        loc = pyro.param("loc", loc0.clone())
        pyro.sample("x", plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b), obs=y)

    for est in ("reparam", "marginal", "score", "closed_form"):
        obj = ExpectedLoss("l1", est, num_particles=3)
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        value = obj.loss_and_grads(model, guide)
        g1 = pyro.param("loc").unconstrained().grad.clone()
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        obj.baseline = type(obj.baseline)()  # same (fresh) running-average state
        d = obj.differentiable_loss(model, guide)
        (g2,) = torch.autograd.grad(d, [pyro.param("loc").unconstrained()])
        assert d.item() == pytest.approx(value)
        assert torch.allclose(g1, g2)


# ---------------------------------------------------------------------- SVI
@pytest.mark.parametrize("estimator", ["closed_form", "marginal", "reparam", "score"])
def test_svi_learns_the_target(estimator):
    """A Gaussian with learnable loc and scale, trained on one constrained target."""
    A = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    y = torch.tensor([1.0, -2.0, 0.5, 0.5])
    b = A @ y

    def model():
        loc = pyro.param("loc", torch.zeros(4))
        scale = pyro.param("scale", torch.ones(4), constraint=constraints.positive)
        pyro.sample("x", plc.constrain(dist.Normal(loc, scale).to_event(1), A, b), obs=y)

    obj = ExpectedLoss("l1", estimator, num_particles=8, vectorize_particles=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), obj)
    first = obj.loss(model, guide)
    for _ in range(150):
        svi.step()
    last = ExpectedLoss("l1", "closed_form").loss(model, guide)
    assert last < 0.5 * first
    m = plc.constrain(
        dist.Normal(pyro.param("loc"), pyro.param("scale")).to_event(1), A, b
    ).mean.detach()
    assert (m - y).abs().max() < 0.3


def test_guide_latents_and_offset_targets():
    """A latent z from a guide drives the decoder; targets need not satisfy A y = b."""
    A = torch.ones(1, 3)
    y = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])

    def model(y):
        w = pyro.param("w", torch.zeros(3))
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            base = dist.Normal(w + z.unsqueeze(-1), 1.0).to_event(1)
            pyro.sample("x", plc.constrain(base, A, torch.zeros(2, 1)), obs=y)

    def guide(y):
        q = pyro.param("q", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(q, 0.1))

    obj = ExpectedLoss("l2", "marginal", num_particles=4, vectorize_particles=True)
    obj.loss_and_grads(model, guide, y)
    assert pyro.param("w").unconstrained().grad.abs().sum() > 0


# ------------------------------------------------------------- other families
def test_family_without_rsample():
    torch.set_default_dtype(torch.float64)
    A, b, y, loc, var = problem()
    loc = loc.clone().requires_grad_()

    def model():
        inner = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b)
        pyro.sample("x", NoRsample(inner), obs=y)

    for est in ("marginal", "score"):
        value = ExpectedLoss("l1", est, num_particles=2).differentiable_loss(model, guide)
        (g,) = torch.autograd.grad(value, [loc])
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="rsample"):
        ExpectedLoss("l1", "reparam").loss(model, guide)
    with pytest.raises(ValueError, match="Gaussian"):
        ExpectedLoss("l1", "closed_form").loss(model, guide)


def test_poisson_marginal_and_score_if_available():
    rate = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    groups, k = plc.GroupSum(torch.tensor([0, 0, 1, 1]), 2), torch.tensor([3.0, 5.0])
    try:
        d = plc.constrain(dist.Poisson(rate).to_event(1), groups, k)
    except NotImplementedError:
        pytest.skip("ConstrainedPoisson not available yet")
    y = torch.tensor([1.0, 2.0, 2.0, 3.0])

    def model():
        pyro.sample("x", plc.constrain(dist.Poisson(rate).to_event(1), groups, k), obs=y)

    for est in ("marginal", "score"):
        value = ExpectedLoss("l2", est, num_particles=64, vectorize_particles=True)
        (g,) = torch.autograd.grad(value.differentiable_loss(model, guide), [rate])
        assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="Gaussian"):
        ExpectedLoss("l2", "closed_form").loss(model, guide)
    assert d.mean.requires_grad


# -------------------------------------------------------------------- errors
def test_bad_configurations():
    with pytest.raises(ValueError, match="unknown estimator"):
        ExpectedLoss("l1", estimator="pathwise")
    with pytest.raises(ValueError, match="unknown loss"):
        ExpectedLoss("huber")
    with pytest.raises(ValueError, match="callable"):
        ExpectedLoss(lambda x, y: (x - y).abs(), estimator="closed_form")
    with pytest.raises(ValueError, match="num_particles"):
        ExpectedLoss("l1", num_particles=0)

    def unconstrained():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1), obs=torch.zeros(2))

    with pytest.raises(ValueError, match="no observed constrained site"):
        ExpectedLoss("l1").loss(unconstrained, guide)
