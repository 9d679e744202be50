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
