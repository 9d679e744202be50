"""ZeroSumNormal against the peers' own definitions (PyMC, NumPyro) and dense oracles.

The two peer formulas below are written out from their sources:

* PyMC, ``pymc/distributions/multivariate.py``, ``zerosumnormal_logp``: with
  ``n_zerosum_axes`` trailing zero-sum axes,
  ``sum_{zero-sum axes} [-(x / sigma)^2 / 2 - (log sqrt(2 pi) + log sigma) * dof / size]``,
  ``dof = prod(shape with each zero-sum axis one shorter)``, ``size = prod(shape)``;
  its marginal variance (docs) ``sigma^2 prod (1 - 1/n)``.
* NumPyro, ``numpyro/distributions/continuous.py``, ``ZeroSumNormal``: a
  ``TransformedDistribution`` of ``Normal(0, scale).expand(shape - 1).to_event(k)``
  by ``ZeroSumTransform(k)`` (``numpyro/distributions/transforms.py``, ported
  from PyMC's), whose inverse applies ``extend_axis_rev`` along every event
  axis and whose ``log_abs_det_jacobian`` is 0; its ``variance`` property is
  ``scale^2 prod_axis (1 - 1 / event_shape[axis])``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.ops.stats import effective_sample_size
from torch.distributions import biject_to

import pyro_linconstr as plc


# ----------------------------------------------------------- peer oracles
def pymc_logp(value, sigma, n_zerosum_axes):
    """PyMC's ``zerosumnormal_logp`` (one event; the other axes are summed as well)."""
    shape = value.shape
    dof_shape = shape[: len(shape) - n_zerosum_axes] + tuple(s - 1 for s in shape[-n_zerosum_axes:])
    full_size, dof = math.prod(shape), math.prod(dof_shape)
    out = -0.5 * (value / sigma) ** 2 - (math.log(math.sqrt(2 * math.pi)) + math.log(sigma)) * (
        dof / full_size
    )
    return out.sum()


def numpyro_extend_axis_rev(array, axis):
    """NumPyro's ``ZeroSumTransform.extend_axis_rev`` (its inverse, one axis)."""
    n = array.shape[axis]
    last = array.narrow(axis, n - 1, 1)
    sum_vals = -last * math.sqrt(n)
    norm = sum_vals / (math.sqrt(n) + n)
    return array.narrow(axis, 0, n - 1) + norm


def numpyro_log_prob(value, scale):
    """``TransformedDistribution(Normal(0, scale).expand(shape - 1), ZeroSumTransform)``."""
    z = value
    for axis in range(-value.dim(), 0):
        z = numpyro_extend_axis_rev(z, axis)
    return dist.Normal(0.0, scale).log_prob(z).sum()  # + log_abs_det_jacobian == 0


def zero_sum_projector(shape, axes):
    """``kron`` of ``I - J / s`` along zero-sum axes and ``I`` along the others (dense)."""
    P = torch.ones(1, 1, dtype=torch.float64)
    for d, s in enumerate(shape):
        I = torch.eye(s, dtype=torch.float64)
        P = torch.kron(P, I - 1.0 / s if d in axes else I)
    return P


# ----------------------------------------------------------------- moments
@pytest.mark.parametrize(
    "shape,zero_sum_axes,axes",
    [
        ((6,), None, (0,)),
        ((3, 4), None, (0, 1)),
        ((3, 4, 5), None, (0, 1, 2)),
        ((3, 4), 1, (1,)),  # PyMC's n_zerosum_axes=1: the last axis
        ((3, 4, 5), 2, (1, 2)),
        ((3, 4), (0,), (0,)),
        ((3, 4, 5), (-3, -1), (0, 2)),
    ],
)
def test_variance_is_the_peers_formula(shape, zero_sum_axes, axes):
    sigma = 1.7
    d = plc.ZeroSumNormal(torch.tensor(sigma, dtype=torch.float64), shape, zero_sum_axes)
    assert d.event_shape == shape and d.batch_shape == ()
    expected = sigma**2 * math.prod(1 - 1 / shape[a] for a in axes)
    torch.testing.assert_close(d.variance, torch.full(shape, expected, dtype=torch.float64))
    torch.testing.assert_close(d.mean, torch.zeros(shape, dtype=torch.float64))


def test_samples_have_the_zero_sum_covariance():
    """Empirical covariance of 20,000 draws vs sigma^2 kron(I - J/s) (NumPyro's definition),
    within 5 standard errors of each entry."""
    shape, sigma, N = (3, 4), 1.5, 20_000
    x = plc.ZeroSumNormal(sigma, shape).sample((N,)).double()
    assert x.sum(-1).abs().max() < 1e-5 and x.sum(-2).abs().max() < 1e-5
    flat = x.reshape(N, -1)
    emp = flat.T @ flat / N  # mean 0 is known
    cov = sigma**2 * zero_sum_projector(shape, (0, 1))
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / N).sqrt()
    assert bool(((emp - cov).abs() <= 5 * se).all())


# ----------------------------------------------------------------- density
@pytest.mark.parametrize("shape", [(6,), (3, 4), (2, 3, 4)])
def test_log_prob_is_numpyros_and_pymcs(shape):
    sigma = 0.8
    d = plc.ZeroSumNormal(torch.tensor(sigma, dtype=torch.float64), shape)
    x = d.sample((5,))
    for xi, lp in zip(x, d.log_prob(x)):
        torch.testing.assert_close(lp, pymc_logp(xi, sigma, len(shape)))
        torch.testing.assert_close(lp, numpyro_log_prob(xi, sigma))


@pytest.mark.parametrize("shape,axes", [((3, 4), None), ((2, 3, 4), (0, 2)), ((5,), None)])
def test_closed_form_log_prob_equals_the_general_one(shape, axes):
    """One scale per event and no loc: the closed form (values and gradients in the value and
    the scale) equals the general ConstrainedGaussian formula for the same base and rows."""
    scale = torch.tensor([[0.7], [1.9]], dtype=torch.float64).reshape((2,) + (1,) * len(shape))
    s1 = scale.clone().requires_grad_()
    d = plc.ZeroSumNormal(s1, shape, axes)
    assert type(d).__name__ == "_UniformZeroSumNormal" and d.batch_shape == (2,)
    A = plc.AxisSums(shape, range(len(shape)) if axes is None else axes)
    s2 = scale.clone().requires_grad_()
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), s2).to_event(len(shape))
    ref = plc.constrain(base, A, torch.zeros(A.num_rows, dtype=torch.float64))
    assert type(ref) is plc.distributions.ConstrainedGaussian
    x = d.sample((3,)).requires_grad_()
    lp, lp_ref = d.log_prob(x), ref.log_prob(x)
    torch.testing.assert_close(lp, lp_ref)
    (gx,) = torch.autograd.grad(lp.sum(), x, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(lp_ref.sum(), x, retain_graph=True)
    torch.testing.assert_close(gx, gx_ref)
    lp.sum().backward()
    lp_ref.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_log_prob_with_pymcs_n_zerosum_axes():
    """PyMC, n_zerosum_axes=1 on a (3, 4) value: the first axis is free."""
    sigma = 1.3
    d = plc.ZeroSumNormal(torch.tensor(sigma, dtype=torch.float64), (3, 4), zero_sum_axes=1)
    x = d.sample((4,))
    assert x.sum(-1).abs().max() < 1e-12 and x.sum(-2).abs().min() > 1e-6
    for xi, lp in zip(x, d.log_prob(x)):
        torch.testing.assert_close(lp, pymc_logp(xi, sigma, 1))


def test_per_element_scale_and_loc_equal_the_dense_constrain():
    shape = (3, 4)
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(shape, generator=g, dtype=torch.float64) + 0.2
    loc = torch.randn(shape, generator=g, dtype=torch.float64)
    d = plc.ZeroSumNormal(scale, shape, loc=loc)
    A = plc.AxisSums(shape, (0, 1)).to_dense().double()
    ref = plc.constrain(dist.Normal(loc, scale).to_event(2), A, torch.zeros(A.shape[0]).double())
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.variance, ref.variance)
    x = d.sample((3,))
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    # the mean is loc corrected onto the subspace: its margins vanish
    assert d.mean.sum(0).abs().max() < 1e-12 and d.mean.sum(1).abs().max() < 1e-12


def test_batch_shapes_expand_and_rsample_gradients():
    scale = (torch.rand(5, 1, 1) + 0.5).requires_grad_()
    d = plc.ZeroSumNormal(scale, (3, 4))
    assert d.batch_shape == (5,) and d.event_shape == (3, 4)
    x = d.rsample((2,))
    assert x.shape == (2, 5, 3, 4)
    x.square().sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all()
    e = d.expand((7, 5))
    assert e.sample().shape == (7, 5, 3, 4) and e.log_prob(e.sample()).shape == (7, 5)


# ------------------------------------------------------------------- chart
@pytest.mark.parametrize("shape,zero_sum_axes", [((5,), None), ((3, 4), None), ((2, 3, 4), (0, 2))])
def test_biject_to_chart_is_orthonormal(shape, zero_sum_axes):
    d = plc.ZeroSumNormal(torch.tensor(1.0, dtype=torch.float64), shape, zero_sum_axes)
    t = biject_to(d.support)
    assert isinstance(t, plc.transforms.AffineSubspaceTransform) and t._helmert is not None
    z = torch.randn(4, t.dim, dtype=torch.float64)
    x = t(z)
    assert x.shape == (4, *shape) and bool(d.support.check(x).all())
    torch.testing.assert_close(t.inv(x), z)
    assert (t.log_abs_det_jacobian(z, x) == 0).all()
    J = torch.autograd.functional.jacobian(lambda v: t(v).reshape(-1), z[0])
    torch.testing.assert_close(J.T @ J, torch.eye(t.dim, dtype=torch.float64))
    # spans the zero-sum subspace: J J^T is its orthogonal projector
    axes = {a % len(shape) for a in (range(len(shape)) if zero_sum_axes is None else zero_sum_axes)}
    torch.testing.assert_close(J @ J.T, zero_sum_projector(shape, axes))
    # the density on z is N(0, sigma^2 I): the chart carries the subspace density unchanged
    torch.testing.assert_close(d.log_prob(x), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_chart_and_distribution_are_linear_in_n(monkeypatch):
    """200 x 200, both axes: no m x n, n x n or dense basis (to_dense and the dense null
    space raise), and no single allocation above a few floats per entry."""

    def boom(*args, **kwargs):
        raise AssertionError("a dense m x n or n x n matrix was formed")

    monkeypatch.setattr(plc.AxisSums, "to_dense", boom)
    monkeypatch.setattr(plc.transforms, "_null_space", boom)
    r = 200
    n = r * r
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        d = plc.ZeroSumNormal(torch.full((r, r), 0.5).requires_grad_(), (r, r))
        t = biject_to(d.support)
        z = torch.randn(t.dim)
        x = t(z)
        torch.testing.assert_close(t.inv(x), z, rtol=1e-4, atol=1e-4)
        lp = d.log_prob(d.rsample())
        lp.backward()
    assert t.dim == (r - 1) ** 2 and x.shape == (r, r)
    assert x.double().sum(0).abs().max() < 1e-3 and x.double().sum(1).abs().max() < 1e-3
    biggest = max(e.self_cpu_memory_usage for e in prof.function_events)
    assert biggest <= 64 * n  # an m x n float32 matrix would be 4 * 399 * n bytes


# --------------------------------------------------------------- inference
def test_nuts_recovers_a_known_zero_sum_posterior():
    """3 x 4 two-way effects with a Gaussian likelihood of known per-cell noise: the posterior
    is Gaussian on the subspace, computed exactly in null-space coordinates; NUTS means and
    variances agree within 5 Monte Carlo standard errors."""
    shape, tau = (3, 4), 1.0
    g = torch.Generator().manual_seed(0)
    noise = (0.3 + torch.rand(shape, generator=g, dtype=torch.float64)) * 1.2
    truth = plc.ZeroSumNormal(torch.tensor(tau, dtype=torch.float64), shape).sample()
    y = truth + noise * torch.randn(shape, generator=g, dtype=torch.float64)

    def model(y):
        eff = pyro.sample("eff", plc.ZeroSumNormal(torch.tensor(tau, dtype=torch.float64), shape))
        pyro.sample("y", dist.Normal(eff, noise).to_event(2), obs=y)

    mcmc = MCMC(NUTS(model), num_samples=300, warmup_steps=150, disable_progbar=True)
    mcmc.run(y)
    draws = mcmc.get_samples()["eff"].reshape(300, -1)
    assert draws.reshape(300, *shape).sum(-1).abs().max() < 1e-10

    # exact posterior: x = N z, z ~ N(0, tau^2 I), y ~ N(N z, diag(noise^2))
    P = zero_sum_projector(shape, (0, 1))
    evals, evecs = torch.linalg.eigh(P)
    N = evecs[:, evals > 0.5]  # orthonormal basis of the zero-sum subspace
    Dinv = noise.reshape(-1) ** -2
    prec = torch.eye(N.shape[1], dtype=torch.float64) / tau**2 + N.T @ (Dinv[:, None] * N)
    cov_z = torch.linalg.inv(prec)
    mean = N @ (cov_z @ (N.T @ (Dinv * y.reshape(-1))))
    var = (N @ cov_z @ N.T).diagonal()

    ess = effective_sample_size(draws.unsqueeze(0), chain_dim=0, sample_dim=1)
    mcse = (var / ess).sqrt()
    assert bool(((draws.mean(0) - mean).abs() <= 5 * mcse).all())
    sq = (draws - mean) ** 2
    ess_sq = effective_sample_size(sq.unsqueeze(0), chain_dim=0, sample_dim=1)
    assert bool(((sq.mean(0) - var).abs() <= 5 * var * (2 / ess_sq).sqrt()).all())


def test_autonormal_and_predictive_on_a_zero_sum_latent():
    shape = (3, 5)
    y = torch.randn(shape)

    def model(y=None):
        eff = pyro.sample("eff", plc.ZeroSumNormal(1.0, shape))
        return pyro.sample("y", dist.Normal(eff, 0.5).to_event(2), obs=y)

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    draws = Predictive(model, guide=guide, num_samples=10)(None)["eff"]
    assert draws.shape == (10, *shape)
    assert draws.sum(-1).abs().max() < 1e-5 and draws.sum(-2).abs().max() < 1e-5


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"event_shape": (3, 4), "zero_sum_axes": 0}, r"must lie in \[1, 2\]"),
        ({"event_shape": (3, 4), "zero_sum_axes": 3}, r"must lie in \[1, 2\]"),
        ({"event_shape": (3, 4), "zero_sum_axes": (2,)}, "outside the event"),
        ({"event_shape": (3, 4), "zero_sum_axes": (0, -2)}, "duplicate axes"),
        ({"event_shape": (3, 4), "zero_sum_axes": 1.5}, "None, an int or a tuple"),
        ({"event_shape": (3, 4), "zero_sum_axes": True}, "an int or a tuple"),
        ({"event_shape": (1, 4)}, "axis 0 has size 1"),
        ({"event_shape": ()}, "non-empty tuple"),
        ({"event_shape": (3, 5), "scale": torch.ones(4)}, "must broadcast with event_shape"),
        ({"event_shape": (1, 3), "scale": torch.ones(2, 3), "zero_sum_axes": (1,)}, "broadcast"),
        ({"event_shape": (3, 4), "loc": torch.zeros(2)}, "must broadcast with event_shape"),
        ({"event_shape": (3, 4), "scale": -1.0}, "scale must be finite and > 0"),
        ({"event_shape": (3, 4), "scale": torch.tensor([0.0, 1, 1, 1])}, "finite and > 0"),
    ],
)
def test_bad_input_errors(kwargs, match):
    kwargs = {"scale": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        plc.ZeroSumNormal(**kwargs)
