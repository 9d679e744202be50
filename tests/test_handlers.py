"""Unit tests of ``plc.LinearConstraint`` and ``plc.project``."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_linconstr as plc

K = 4


def _base(batch=()):
    loc = torch.arange(K, dtype=torch.get_default_dtype()).expand(batch + (K,))
    return dist.Normal(loc, torch.tensor([1.0, 2.0, 0.5, 1.5])).to_event(1)


def _model(obs=None):
    return pyro.sample("x", _base(), obs=obs)


def _sum_close(x, target, tol=1e-5):
    return bool(((x.sum(-1) - target).abs() <= tol * (1 + x.abs().sum(-1))).all())


# ----------------------------------------------------------------------------- basic use
def test_context_manager_constrains_latent_site():
    with plc.LinearConstraint(torch.ones(1, K), torch.tensor([3.0]), site="x"):
        x = _model()
    assert _sum_close(x, 3.0)


def test_decorator_replaces_fn_and_keeps_other_sites():
    @plc.LinearConstraint(torch.ones(1, K), torch.zeros(1), site="x")
    def model():
        x = pyro.sample("x", _base())
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return x, z

    tr = poutine.trace(model).get_trace()
    assert isinstance(tr.nodes["x"]["fn"], plc.distributions.ConstrainedGaussian)
    assert isinstance(tr.nodes["z"]["fn"], dist.Normal)
    assert _sum_close(tr.nodes["x"]["value"], 0.0)
    # a decorated model can be called many times
    for _ in range(3):
        assert _sum_close(model()[0], 0.0)


def test_log_prob_of_latent_site_is_constrained_density():
    A, b = torch.tensor([[1.0, -1.0, 2.0, 0.0]]), torch.tensor([0.5])
    tr = poutine.trace(plc.LinearConstraint(A, b, site="x")(_model)).get_trace()
    x = tr.nodes["x"]["value"]
    expected = plc.constrain(_base(), A, b).log_prob(x)
    assert torch.allclose(tr.log_prob_sum(), expected)


@pytest.mark.parametrize("where", ["obs", "condition_inside", "condition_outside"])
def test_observed_log_likelihood_equals_constrain_log_prob(where):
    torch.set_default_dtype(torch.float64)
    A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 2.0]])
    y0 = torch.tensor([0.3, -1.2, 2.5, 0.7])
    b = A @ y0
    handler = plc.LinearConstraint(A, b, site="x")
    if where == "obs":
        model = handler(lambda: _model(obs=y0))
    elif where == "condition_inside":
        model = handler(poutine.condition(_model, data={"x": y0}))
    else:
        model = poutine.condition(handler(_model), data={"x": y0})
    tr = poutine.trace(model).get_trace()
    assert tr.nodes["x"]["is_observed"]
    expected = plc.constrain(_base(), A, b).log_prob(y0)
    assert torch.allclose(tr.log_prob_sum(), expected, rtol=1e-12)
    # and Trace_ELBO with an empty guide is minus that log-likelihood
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, lambda: None)
    assert torch.allclose(loss, -expected, rtol=1e-12)


def test_multidimensional_event_with_groupsum():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    A, b = plc.GroupSum(groups, 2), torch.tensor([1.0, -2.0])

    def model():
        return pyro.sample("img", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))

    tr = poutine.trace(plc.LinearConstraint(A, b, site="img")(model)).get_trace()
    img = tr.nodes["img"]["value"]
    assert img.shape == (2, 3)
    assert torch.allclose(img.sum(-1), b, atol=1e-5)


# ----------------------------------------------------------------------------- observed checks
def test_observation_violating_constraint_raises_naming_site_and_residual():
    handler = plc.LinearConstraint(torch.ones(1, K), torch.tensor([1.0]), site="x")
    y = torch.tensor([0.3, 0.3, 0.3, 0.2])  # sums to 1.1
    with pytest.raises(ValueError, match=r"site 'x'.*\|A x - b\| = 0\.1.*plc\.project"):
        handler(_model)(y)


def test_observation_violation_through_outer_condition_raises():
    handler = plc.LinearConstraint(torch.ones(1, K), torch.tensor([1.0]), site="x")
    model = poutine.condition(handler(_model), data={"x": torch.full((K,), 0.3)})
    with pytest.raises(ValueError, match="site 'x'"):
        model()


def test_projected_rounded_observation_is_accepted():
    A, b = torch.ones(1, K), torch.tensor([1.0])
    rounded = torch.tensor([0.34, 0.33, 0.33, 0.01])  # shares of 1, rounded: they sum to 1.01
    handler = plc.LinearConstraint(A, b, site="x")
    with pytest.raises(ValueError):
        handler(_model)(rounded)
    cleaned = plc.project(rounded, A, b)
    tr = poutine.trace(handler(_model)).get_trace(cleaned)
    assert torch.isfinite(tr.log_prob_sum())


def test_observation_within_tolerance_is_accepted():
    torch.set_default_dtype(torch.float64)
    y = torch.tensor([0.1, 0.2, 0.3, 0.4])
    b = y.sum().reshape(1) + 1e-15  # a rounding-level residual
    plc.LinearConstraint(torch.ones(1, K), b, site="x")(_model)(y)


def test_nonfinite_observation_raises():
    handler = plc.LinearConstraint(torch.ones(1, K), torch.tensor([1.0]), site="x")
    with pytest.raises(ValueError, match="site 'x'"):
        handler(_model)(torch.tensor([float("nan"), 0.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- missing site, skip
def test_missing_site_raises_on_exit():
    with pytest.raises(ValueError, match="no sample site named 'y'"):
        with plc.LinearConstraint(torch.ones(1, K), torch.zeros(1), site="y"):
            _model()
    # the handler left the stack
    assert not any(isinstance(m, plc.LinearConstraint) for m in poutine.runtime._PYRO_STACK)


def test_missing_site_error_does_not_mask_model_error():
    with pytest.raises(RuntimeError, match="boom"):
        with plc.LinearConstraint(torch.ones(1, K), torch.zeros(1), site="y"):
            raise RuntimeError("boom")


def test_plate_subsample_site_is_skipped():
    # the plate's internal _Subsample site is named like the plate: never constrained.
    def model():
        with pyro.plate("x", 10, subsample_size=3):
            pass

    with pytest.raises(ValueError, match="no sample site named 'x'"):
        plc.LinearConstraint(torch.ones(1, K), torch.zeros(1), site="x")(model)()


def test_block_inside_hides_site_block_outside_does_not():
    handler = plc.LinearConstraint(torch.ones(1, K), torch.zeros(1), site="x")
    with pytest.raises(ValueError, match="no sample site named 'x'"):
        handler(poutine.block(_model, hide=["x"]))()
    x = poutine.block(plc.LinearConstraint(torch.ones(1, K), torch.zeros(1), site="x")(_model))()
    assert _sum_close(x, 0.0)


# ----------------------------------------------------------------------------- bad inputs
def test_unsupported_family_names_site():
    def model():
        return pyro.sample("rate", dist.Gamma(torch.ones(K), 1.0).to_event(1))

    handler = plc.LinearConstraint(torch.ones(1, K), torch.ones(1), site="rate")
    with pytest.raises(NotImplementedError, match=r"site 'rate'.*Gamma.*register_constrain"):
        handler(model)()


def test_bad_shapes_name_site():
    handler = plc.LinearConstraint(torch.ones(1, K + 1), torch.ones(1), site="x")
    with pytest.raises(ValueError, match=r"site 'x'.*columns"):
        handler(_model)()


def test_constructor_type_errors():
    with pytest.raises(TypeError, match="site"):
        plc.LinearConstraint(torch.ones(1, K), torch.ones(1), site=3)
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        plc.LinearConstraint(torch.ones(1, K), [1.0], site="x")
    with pytest.raises(TypeError, match="A must be"):
        plc.LinearConstraint([[1.0] * K], torch.ones(1), site="x")


# ----------------------------------------------------------------------------- stacking
def _stacked(model, A1, b1, A2, b2):
    return plc.LinearConstraint(A2, b2, site="x")(plc.LinearConstraint(A1, b1, site="x")(model))


def test_two_handlers_on_one_site_stack():
    torch.set_default_dtype(torch.float64)
    A1, b1 = torch.ones(1, K), torch.tensor([3.0])
    A2, b2 = plc.GroupSum(torch.tensor([0, 0, 1, 1]), 2), torch.tensor([1.0, 2.0])
    tr = poutine.trace(_stacked(_model, A1, b1, A2, b2)).get_trace()
    x = tr.nodes["x"]["value"]
    assert torch.allclose(x.sum(), torch.tensor(3.0))
    assert torch.allclose(A2.matvec(x), b2)
    oracle = plc.constrain(_base(), torch.cat([A1, A2.to_dense()]), torch.cat([b1, b2]))
    assert torch.allclose(tr.nodes["x"]["fn"].mean, oracle.mean)
    assert torch.allclose(tr.log_prob_sum(), oracle.log_prob(x))


def test_stacking_a_repeated_law_gives_the_same_distribution():
    torch.set_default_dtype(torch.float64)
    A, b = torch.tensor([[1.0, 2.0, 0.0, -1.0]]), torch.tensor([0.5])
    tr = poutine.trace(_stacked(_model, A, b, A, b)).get_trace()
    single = plc.constrain(_base(), A, b)
    assert torch.allclose(tr.nodes["x"]["fn"].variance, single.variance)
    assert torch.allclose(tr.log_prob_sum(), single.log_prob(tr.nodes["x"]["value"]))


def test_stacking_inconsistent_laws_raises_naming_site():
    A = torch.ones(1, K)
    with pytest.raises(ValueError, match=r"site 'x'.*inconsistent"):
        _stacked(_model, A, torch.tensor([0.0]), A, torch.tensor([1.0]))()


def test_stacking_across_a_plate_broadcasts():
    N = 3
    b_outer = torch.zeros(1)
    b_inner = torch.randn(N, 1)  # per-datum law inside the plate
    A_inner = torch.tensor([[1.0, -1.0, 0.0, 0.0]])

    def model():
        with pyro.plate("data", N):
            with plc.LinearConstraint(A_inner, b_inner, site="x"):
                return pyro.sample("x", _base())

    x = plc.LinearConstraint(torch.ones(1, K), b_outer, site="x")(model)()
    assert x.shape == (N, K)
    assert torch.allclose(x.sum(-1), torch.zeros(N), atol=1e-5)
    assert torch.allclose(x[:, 0] - x[:, 1], b_inner[:, 0], atol=1e-5)


def test_stacking_onto_model_built_constrained_distribution_raises():
    def model():
        return pyro.sample("x", plc.constrain(_base(), torch.ones(1, K), torch.zeros(1)))

    handler = plc.LinearConstraint(torch.tensor([[1.0, -1.0, 0.0, 0.0]]), torch.zeros(1), "x")
    with pytest.raises(ValueError, match=r"site 'x' already has a constrained distribution"):
        handler(model)()


# ----------------------------------------------------------------------------- project
def _kkt_projection(x, A, b):
    """Oracle: solve the KKT system [[I, A^T], [A, 0]] [y; lam] = [x; b] in float64."""
    m, n = A.shape
    kkt = torch.zeros(n + m, n + m, dtype=torch.float64)
    kkt[:n, :n] = torch.eye(n, dtype=torch.float64)
    kkt[:n, n:] = A.T
    kkt[n:, :n] = A
    rhs = torch.cat([x, b]).double()
    return torch.linalg.solve(kkt, rhs)[:n]


def test_project_dense_matches_kkt_oracle_batched():
    torch.manual_seed(1)
    A = torch.randn(5, 2, 6, dtype=torch.float64)
    b = torch.randn(5, 2, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    y = plc.project(x, A, b)
    for i in range(5):
        assert torch.allclose(y[i], _kkt_projection(x[i], A[i], b[i]), atol=1e-12)
    assert torch.allclose((A @ y.unsqueeze(-1)).squeeze(-1), b, atol=1e-12)
    assert torch.allclose(plc.project(y, A, b), y, atol=1e-12)  # idempotent


def test_project_groupsum_matches_dense_and_is_linear_time():
    torch.manual_seed(2)
    groups = torch.tensor([0, 2, 2, 0, 1, 2, 1, 0])
    A = plc.GroupSum(groups, 3)
    b = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    y = plc.project(x, A, b)
    assert torch.allclose(y, plc.project(x, A.to_dense().double(), b), atol=1e-12)
    assert torch.allclose(A.matvec(y), b, atol=1e-12)
    # large n: no m x n matrix is formed (it would need 8e10 bytes)
    n, m = 200_000, 50_000
    big = plc.GroupSum(torch.arange(n) % m, m)
    y = plc.project(torch.randn(n), big, torch.zeros(m))
    assert float(big.matvec(y).abs().max()) < 1e-5


def test_project_rank_deficient_consistent():
    torch.set_default_dtype(torch.float64)
    A = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([1.0, 2.0, 3.0])
    x = torch.tensor([0.5, -0.5, 4.0, 0.0])
    y = plc.project(x, A, b)
    assert torch.allclose(y, _kkt_projection(x, A[:2], b[:2]), atol=1e-12)


@pytest.mark.parametrize("which", ["dense", "groupsum"])
def test_project_inconsistent_raises(which):
    if which == "dense":
        A = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]])
        b = torch.tensor([1.0, 3.0])
    else:
        A, b = plc.GroupSum(torch.tensor([0, 0, 2]), 3), torch.tensor([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.project(torch.zeros(3), A, b)


def test_project_float32_residual_within_documented_tolerance():
    torch.manual_seed(3)
    A = torch.randn(3, 50)
    b = torch.randn(3) * 10
    x = torch.randn(7, 50) * 100
    y = plc.project(x, A, b)
    assert y.dtype == torch.float32
    assert bool(plc.constraints.affine_subspace(A, b).check(y).all())


def test_project_integer_input_and_errors():
    y = plc.project(torch.tensor([1, 2, 3]), torch.ones(1, 3), torch.tensor([0.0]))
    assert y.dtype == torch.get_default_dtype()
    assert torch.allclose(y, torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="x must have shape"):
        plc.project(torch.zeros(4), torch.ones(1, 3), torch.zeros(1))
    with pytest.raises(ValueError, match="b must have shape"):
        plc.project(torch.zeros(3), torch.ones(1, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        plc.project(torch.tensor([float("inf"), 0.0, 0.0]), torch.ones(1, 3), torch.zeros(1))


def test_project_gradcheck():
    A = torch.randn(2, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: plc.project(x, A, b), (x, b))
