"""Pyro's generic distribution contract under hostile input: dtypes, empty batches, zero rows,
pickling, masks, wrapped vector families, validation, caching."""

import copy
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import biject_to

import pyro_linconstr as plc
from pyro_linconstr.distributions import ConstrainedGaussian
from pyro_linconstr.ops import as_operator

F32, F64 = torch.float32, torch.float64


def _groups():
    return plc.GroupSum(torch.tensor([0, 0, 1, 1, 1]), 2)


def _bases(dtype=F32, batch=()):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(batch + (5,), generator=g, dtype=F64).to(dtype)
    scale = (torch.rand(batch + (5,), generator=g, dtype=F64) + 0.5).to(dtype)
    W = torch.randn(5, 2, generator=g, dtype=F64).to(dtype)
    L = torch.linalg.cholesky(W @ W.T + torch.diag(scale[..., :].reshape(-1, 5)[0] ** 2))
    return {
        "diag": dist.Normal(loc, scale).to_event(1),
        "lowrank": dist.LowRankMultivariateNormal(loc, W, scale**2),
        "full": dist.MultivariateNormal(loc, scale_tril=L),
    }


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
@pytest.mark.parametrize(
    "A_dtype,b_dtype",
    [(F32, F32), (F64, F32), (F32, F64), (torch.float16, F32), (torch.bfloat16, F64)],
)
@pytest.mark.parametrize("base_dtype", [F32, F64])
def test_dtype_rule_the_base_decides(kind, A_dtype, b_dtype, base_dtype):
    """A and b follow the base's dtype, whatever theirs (half precision included)."""
    base = _bases(base_dtype)[kind]
    A = torch.tensor([[1.0, 1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0, -1.0]])
    b = torch.tensor([0.5, -1.0])
    d = plc.constrain(base, A.to(A_dtype), b.to(b_dtype))
    ref = plc.constrain(base, A.to(base_dtype), b.to(base_dtype))
    x = d.sample((3,))
    for t in (x, d.mean, d.variance, d.log_prob(x), d.entropy()):
        assert t.dtype == base_dtype
    assert torch.equal(d.mean, ref.mean)
    assert torch.allclose(d.log_prob(x), ref.log_prob(x))


@pytest.mark.parametrize("b_dtype", [F32, torch.int64])
def test_float64_base_with_group_sum_and_float32_or_integer_b(b_dtype):
    base = _bases(F64)["diag"]
    d = plc.constrain(base, _groups(), torch.tensor([1, -2]).to(b_dtype))
    x = d.sample()
    assert x.dtype == F64 and d.mean.dtype == F64
    assert torch.allclose(_groups().matvec(x), torch.tensor([1.0, -2.0], dtype=F64), atol=1e-12)


def test_half_precision_base_is_a_clear_error():
    base = dist.Normal(torch.zeros(3, dtype=torch.float16), 1.0).to_event(1)
    with pytest.raises(ValueError, match="float16.*float32 or float64"):
        plc.constrain(base, torch.ones(1, 3), torch.zeros(1))


def test_group_sum_keeps_its_dtype():
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(F64)
        A = plc.GroupSum(torch.tensor([0, 1, 1]), 2)
    finally:
        torch.set_default_dtype(old)
    assert A.to_dense().dtype == F64  # built under float64: stays float64
    assert A.to(F32).to_dense().dtype == F32 and A.to(F64) is A
    assert plc.GroupSum(torch.tensor([0, 1]), 2, dtype=F64).to_dense().dtype == F64


@pytest.mark.parametrize("bad", [2.5, "2", True])
def test_group_sum_num_groups_must_be_an_integer(bad):
    with pytest.raises((ValueError, TypeError), match="num_groups"):
        plc.GroupSum(torch.tensor([0, 1]), bad)


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
@pytest.mark.parametrize("A_kind", ["dense", "batched", "groups"])
def test_empty_batch_returns_empty_results(kind, A_kind):
    base = _bases()[kind]
    A = {
        "dense": torch.ones(2, 5),
        "batched": torch.randn(0, 2, 5),
        "groups": _groups(),
    }[A_kind]
    if A_kind == "dense":
        A = A.clone()
        A[1, 0] = 0.0
    d = plc.constrain(base, A, torch.zeros(0, 2))
    x = d.rsample((3,))
    assert d.batch_shape == (0,) and x.shape == (3, 0, 5)
    assert d.log_prob(x).shape == (3, 0)
    assert d.mean.shape == d.variance.shape == (0, 5)
    assert d.entropy().shape == (0,) and d.support.check(x).shape == (3, 0)


# ----------------------------------------------------------------------------- zero rows
@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
@pytest.mark.parametrize("A", [torch.ones(0, 5), torch.zeros(2, 5)], ids=["no rows", "zero A"])
def test_no_constraint_rows_give_the_base_law(kind, A):
    base = _bases()[kind]
    d = plc.constrain(base, A, torch.zeros(A.shape[0]))
    x = base.sample((4,))
    assert torch.allclose(d.mean, base.mean)
    assert torch.allclose(d.variance, base.variance, rtol=1e-5)
    assert torch.allclose(d.log_prob(x), base.log_prob(x), rtol=1e-5)
    assert d.sample((2,)).shape == (2, 5)


# ----------------------------------------------------------------------------- pickling
@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
@pytest.mark.parametrize("A_kind", ["dense", "groups", "ill"])
def test_pickle_and_deepcopy_in_every_state(kind, A_kind):
    base = _bases(batch=(2,))[kind]
    A = {
        "dense": torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]]),
        "groups": _groups(),
        # a redundant row: the system is orthonormalized in float64
        "ill": torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 0.0, 0.0, 2.0]]),
    }[A_kind]
    m = as_operator(A).num_rows
    d = plc.constrain(base, A, torch.zeros(m)).expand((3, 2))
    states = [lambda d: None, lambda d: d.rsample(), lambda d: (d.mean, d.variance)]
    states.append(lambda d: d.log_prob(d.sample()))
    for step in states:
        step(d)
        x = d.sample()
        for copied in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
            assert copied.batch_shape == d.batch_shape
            assert torch.allclose(copied.mean, d.mean) and torch.allclose(
                copied.log_prob(x), d.log_prob(x)
            )


def test_deepcopy_with_parameters_that_require_grad():
    loc = torch.zeros(4, requires_grad=True)
    d = plc.constrain(dist.Normal(loc, 1.0).to_event(1), torch.ones(1, 4), torch.ones(1))
    d.log_prob(d.rsample())
    c = copy.deepcopy(d)
    assert torch.allclose(c.mean, d.mean)


# ----------------------------------------------------------------------------- wrappers
def test_mask_of_the_batch_is_reapplied():
    base = _bases(batch=(3,))["diag"]
    mask = torch.tensor([True, False, True])
    d = plc.constrain(base.mask(mask), torch.ones(1, 5), torch.zeros(1))
    ref = plc.constrain(base, torch.ones(1, 5), torch.zeros(1))
    x = ref.sample()
    assert torch.allclose(d.log_prob(x), ref.log_prob(x) * mask)
    # a mask inside the Independent wrapper, of size 1 in the event dim, is the same mask
    inner = dist.Normal(base.base_dist.loc, base.base_dist.scale).mask(mask.unsqueeze(-1))
    d2 = plc.constrain(inner.to_event(1), torch.ones(1, 5), torch.zeros(1))
    assert torch.allclose(d2.log_prob(x), ref.log_prob(x) * mask)


def test_mask_over_event_entries_is_a_clear_error():
    base = dist.Normal(torch.zeros(5), 1.0).mask(torch.tensor([True, False] * 2 + [True]))
    with pytest.raises(ValueError, match="mask over entries of its event"):
        plc.constrain(base.to_event(1), torch.ones(1, 5), torch.zeros(1))


@pytest.mark.parametrize("family", ["full", "lowrank"])
def test_vector_family_to_event_is_block_diagonal(family):
    """MultivariateNormal(...).to_event(1) failed with the bare message 'MultivariateNormal'."""
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(2, 3, generator=g, dtype=F64)
    W = torch.randn(2, 3, 2, generator=g, dtype=F64)
    D = torch.rand(2, 3, generator=g, dtype=F64) + 0.5
    covs = W @ W.transpose(-1, -2) + torch.diag_embed(D)
    if family == "full":
        base = dist.MultivariateNormal(loc, covs).to_event(1)
    else:
        base = dist.LowRankMultivariateNormal(loc, W, D).to_event(1)
    A = torch.randn(2, 6, generator=g, dtype=F64)
    b = torch.randn(2, generator=g, dtype=F64)
    d = plc.constrain(base, A, b)
    ref = plc.constrain(dist.MultivariateNormal(loc.reshape(6), torch.block_diag(*covs)), A, b)
    x = d.sample((4,))
    assert x.shape == (4, 2, 3) and d.event_shape == (2, 3)
    assert torch.allclose(d.mean.reshape(6), ref.mean)
    assert torch.allclose(d.variance.reshape(6), ref.variance)
    assert torch.allclose(d.log_prob(x), ref.log_prob(x.reshape(4, 6)))


# ----------------------------------------------------------------------------- validation
def test_validate_args_true_is_honoured_when_global_validation_is_off():
    base = dist.Normal(torch.zeros(3), -torch.ones(3), validate_args=False).to_event(1)
    A, b = as_operator(torch.ones(1, 3)), torch.zeros(1)
    pyro.enable_validation(False)
    try:
        ConstrainedGaussian(base, A, b, validate_args=False)  # explicitly off: accepted
        with pytest.raises(ValueError, match="scale"):
            ConstrainedGaussian(base, A, b, validate_args=True)
        good = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
        d = ConstrainedGaussian(good, A, b, validate_args=True)
        with pytest.raises(ValueError):
            d.log_prob(torch.ones(3))  # off the subspace
    finally:
        pyro.enable_validation(True)


def test_arg_constraints_are_declared_and_checked():
    assert set(ConstrainedGaussian.arg_constraints) == {"loc", "b"}
    base = dist.Normal(torch.tensor([0.0, float("inf"), 0.0]), 1.0, validate_args=False)
    with pytest.raises(ValueError, match="loc"):
        plc.constrain(base.to_event(1), torch.ones(1, 3), torch.zeros(1))


def test_nan_below_the_diagonal_of_scale_tril_is_named():
    L = torch.eye(3)
    L[2, 0] = float("nan")
    base = dist.MultivariateNormal(torch.zeros(3), scale_tril=L, validate_args=False)
    with pytest.raises(ValueError, match="scale_tril.*non-finite entries"):
        plc.constrain(base, torch.ones(1, 3), torch.zeros(1))


def test_num_particles_must_be_positive():
    with pytest.raises(ValueError, match="ConstrainedTrace_ELBO: num_particles"):
        plc.infer.ConstrainedTrace_ELBO(num_particles=0)
    with pytest.raises(ValueError, match="ExpectedLoss: num_particles"):
        plc.infer.ExpectedLoss(num_particles=0)


# ----------------------------------------------------------------------------- caching
def test_support_and_its_chart_are_built_once(monkeypatch):
    d = plc.constrain(_bases()["diag"], torch.randn(2, 5), torch.zeros(2))
    assert d.support is d.support
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    t = biject_to(d.support)
    assert biject_to(d.support) is t and transform_to_is_same(d)
    assert len(calls) == 1


def transform_to_is_same(d):
    from torch.distributions import transform_to

    return transform_to(d.support) is biject_to(d.support)


def test_an_observed_value_is_checked_once(monkeypatch):
    from pyro_linconstr.constraints import _AffineSubspace

    calls = []
    real = _AffineSubspace.check
    monkeypatch.setattr(_AffineSubspace, "check", lambda s, v: calls.append(1) or real(s, v))

    def model(y):
        pyro.sample("y", dist.Normal(torch.zeros(4), 1.0).to_event(1), obs=y)

    y = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with plc.LinearConstraint(torch.ones(1, 4), torch.zeros(1), site="y"):
        tr = pyro.poutine.trace(model).get_trace(y)
    tr.compute_log_prob()
    assert len(calls) == 1 and torch.isfinite(tr.nodes["y"]["log_prob_sum"])


def test_an_operator_on_a_shaped_event_rejects_another_shape():
    A = plc.AxisSums((3, 4), (0, 1))
    b = torch.zeros(A.num_rows)
    plc.constrain(dist.Normal(torch.zeros(3, 4), 1.0).to_event(2), A, b)
    plc.constrain(dist.Normal(torch.zeros(12), 1.0).to_event(1), A, b)  # flat, row-major
    with pytest.raises(ValueError, match=r"events of shape \(3, 4\)"):
        plc.constrain(dist.Normal(torch.zeros(4, 3), 1.0).to_event(2), A, b)


def test_quantities_derived_from_a_fixed_dense_A_are_reused_until_it_changes(monkeypatch):
    A = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    base = dist.Normal(torch.zeros(6), 1.0).to_event(1)
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda M, **k: calls.append(M.dtype) or real(M, **k)
    )
    d1 = plc.constrain(base, A, torch.zeros(3))
    n_first = calls.count(F64)
    d2 = plc.constrain(base, A, torch.ones(3))
    assert calls.count(F64) == n_first  # log det(A A^T) in float64: once for this A
    assert torch.equal(d1._cond.constraint_logdet(), d2._cond.constraint_logdet())
    A.add_(0.5)  # in place: a new version, recomputed (not the stale value)
    d3 = plc.constrain(base, A, torch.zeros(3))
    assert calls.count(F64) > n_first
    fresh = plc.constrain(base, A.clone(), torch.zeros(3))
    torch.testing.assert_close(d3._cond.constraint_logdet(), fresh._cond.constraint_logdet())
    assert abs(float(d3._cond.constraint_logdet() - d1._cond.constraint_logdet())) > 0.1
