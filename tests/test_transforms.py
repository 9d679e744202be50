"""AffineSubspaceTransform: structured (GroupSum, Helmert) against dense oracles."""

import pyro.distributions as dist
import pytest
import torch

import pyro_linconstr as plc


def _groups():
    return plc.GroupSum(torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 2, 4]), 5)  # group 3 empty


def test_group_sum_transform_is_an_orthonormal_chart():
    A = _groups()
    b = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    t = plc.transforms.AffineSubspaceTransform(A, b)
    assert t.dim == 10 - 4  # four non-empty groups
    z = torch.randn(3, t.dim, dtype=torch.float64)
    x = t(z)
    torch.testing.assert_close(A.matvec(x), b.expand(3, 5))
    torch.testing.assert_close(t.inv(x), z)
    J = torch.autograd.functional.jacobian(t, z[0])
    torch.testing.assert_close(J.T @ J, torch.eye(t.dim, dtype=torch.float64))
    # x0 is the minimum-norm solution and the chart spans the same subspace as the dense one
    dense = plc.transforms.AffineSubspaceTransform(A.to_dense().double(), b)
    torch.testing.assert_close(t._x0, dense._x0)
    torch.testing.assert_close(J @ J.T, dense._basis @ dense._basis.T)


def test_group_sum_inverse_is_the_orthogonal_projection():
    A = _groups()
    b = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    t = plc.transforms.AffineSubspaceTransform(A, b)
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(t(t.inv(x)), plc.project(x, A, b))


def test_group_sum_transform_scales_linearly():
    n, m = 200_000, 1_000
    groups = torch.randint(0, m, (n,))
    groups[:m] = torch.arange(m)
    A = plc.GroupSum(groups, m)
    t = plc.transforms.AffineSubspaceTransform(A, torch.zeros(m))
    z = torch.randn(t.dim)
    x = t(z)
    assert x.shape == (n,) and t.dim == n - m
    assert A.matvec(x.double()).abs().max() < 1e-3
    torch.testing.assert_close(t.inv(x), z, rtol=1e-4, atol=1e-4)


def test_biject_to_group_sum_support_and_density():
    """The constrained density is the null-space density pushed through the chart."""
    A = plc.GroupSum(torch.tensor([0, 0, 0, 1, 1]), 2)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    loc = torch.tensor([0.1, 0.2, -0.3, 0.5, 0.0], dtype=torch.float64)
    s = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    d = plc.constrain(dist.Normal(loc, s.sqrt()).to_event(1), A, b)
    t = torch.distributions.biject_to(d.support)
    assert t._helmert is not None
    x = d.sample((5,))
    z = t.inv(x)
    J = torch.autograd.functional.jacobian(t, z[0])  # constant: the basis N
    cov = torch.diag(s)
    prec = torch.linalg.inv(cov)
    Cz = torch.linalg.inv(J.T @ prec @ J)
    mz = Cz @ J.T @ prec @ (loc - t._x0)
    torch.testing.assert_close(d.log_prob(x), dist.MultivariateNormal(mz, Cz).log_prob(z))


def test_group_sum_transform_errors():
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.transforms.AffineSubspaceTransform(_groups(), torch.ones(5))
    with pytest.raises(ValueError, match="one entry"):
        plc.transforms.AffineSubspaceTransform(plc.GroupSum(torch.arange(3), 3), torch.zeros(3))


def test_group_sum_chart_is_exact_per_group_whatever_the_other_groups():
    """A group of small entries after a group of huge ones still sums to zero to eps of its
    own entries (group-wise prefix sums, not differences of one global cumulative sum)."""
    for groups in ([0] * 3 + [1] * 3, [0] * 5 + [1] * 2):  # equal and unequal sizes
        A = plc.GroupSum(torch.tensor(groups), 2)
        t = plc.transforms.AffineSubspaceTransform(A, torch.zeros(2, dtype=torch.float64))
        k0 = groups.count(0)  # group 0's k0 - 1 coordinates come first
        z = 1e-3 * torch.randn(t.dim, dtype=torch.float64)
        z[: k0 - 1] = 1e6 * torch.randn(k0 - 1, dtype=torch.float64)
        x = t(z)
        c = plc.constraints.affine_subspace(A, torch.zeros(2, dtype=torch.float64))
        assert bool(c.check(x)), c.residual(x)
        torch.testing.assert_close(t.inv(x), z)


AXIS_CASES = [((4, 5), (0, 1)), ((3, 4, 5), (0, 1, 2)), ((3, 4, 5), (0, 2)), ((2, 3, 4, 2), (1, 3))]


@pytest.mark.parametrize("shape,axes", AXIS_CASES + [((6,), (0,)), ((4, 5), (1,))])
def test_axis_sums_chart_matches_the_dense_chart(shape, axes):
    A = plc.AxisSums(shape, axes)
    g = torch.Generator().manual_seed(0)
    b = A.matvec(torch.randn(2, A.num_cols, generator=g, dtype=torch.float64))  # any margins
    t = plc.transforms.AffineSubspaceTransform(A, b, event_shape=shape)
    assert t._helmert is not None and t.dim == A.null_dim()
    z = torch.randn(2, t.dim, generator=g, dtype=torch.float64)
    x = t(z)
    assert x.shape == (2, *shape)
    torch.testing.assert_close(A.matvec(x.reshape(2, -1)), b)
    assert bool(plc.constraints.affine_subspace(A, b, shape).check(x).all())
    torch.testing.assert_close(t.inv(x), z)
    assert (t.log_abs_det_jacobian(z, x) == 0).all()
    J = torch.autograd.functional.jacobian(lambda v: t(v)[0].reshape(-1), z)[:, 0]
    torch.testing.assert_close(J.T @ J, torch.eye(t.dim, dtype=torch.float64))
    dense = plc.transforms.AffineSubspaceTransform(A.to_dense().double(), b)
    torch.testing.assert_close(t._x0, dense._x0)  # the minimum-norm solution
    torch.testing.assert_close(J @ J.T, dense._basis @ dense._basis.T)  # the same subspace
    # the inverse is the orthogonal projection's coordinates
    y = torch.randn(2, A.num_cols, generator=g, dtype=torch.float64)
    projected = t(t.inv(y.reshape(2, *shape))).reshape(2, -1)
    torch.testing.assert_close(projected, plc.project(y, A.to_dense().double(), b))


def test_biject_to_axis_sums_support_and_density():
    """The constrained density (per-element variances, fixed margins) is the null-space
    density pushed through the O(n) chart."""
    shape = (3, 4)
    A = plc.AxisSums(shape, (0, 1))
    g = torch.Generator().manual_seed(2)
    loc = torch.randn(shape, generator=g, dtype=torch.float64)
    s = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    b = A.rhs(
        (torch.tensor([1.0, -1.0, 2.0, 0.5]).double(), torch.tensor([1.0, 0.5, 1.0]).double())
    )
    d = plc.constrain(dist.Normal(loc, s.sqrt()).to_event(2), A, b)
    t = torch.distributions.biject_to(d.support)
    assert t._helmert is not None and t.event_shape == shape
    x = d.sample((5,))
    z = t.inv(x)
    J = torch.autograd.functional.jacobian(lambda v: t(v).reshape(-1), z[0])
    prec = torch.diag(1 / s.reshape(-1))
    Cz = torch.linalg.inv(J.T @ prec @ J)
    mz = Cz @ J.T @ prec @ (loc.reshape(-1) - t._x0)
    torch.testing.assert_close(d.log_prob(x), dist.MultivariateNormal(mz, Cz).log_prob(z))
