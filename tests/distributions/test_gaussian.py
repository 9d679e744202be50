"""ConstrainedGaussian against independent oracles (float64, fixed seeds)."""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import scipy.integrate
import scipy.linalg
import scipy.stats
import torch

import pyro_linconstr as plc
from pyro_linconstr.distributions import ConstrainedGaussian


def random_problem(n=6, m=2, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch + (n,), generator=g, dtype=torch.float64)
    W = torch.randn(batch + (n, 2), generator=g, dtype=torch.float64)
    d = torch.rand(batch + (n,), generator=g, dtype=torch.float64) + 0.5
    cov = W @ W.transpose(-1, -2) + torch.diag_embed(d)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(batch + (m,), generator=g, dtype=torch.float64)
    return loc, W, d, cov, A, b


def nullspace_oracle(loc, cov, A, b):
    """Conditional law through orthonormal null-space coordinates x = x0 + N z (numpy/scipy)."""
    loc, cov, A, b = (t.numpy() for t in (loc, cov, A, b))
    N = scipy.linalg.null_space(A)
    x0 = np.linalg.lstsq(A, b, rcond=None)[0]
    prec = np.linalg.inv(cov)
    Cz = np.linalg.inv(N.T @ prec @ N)
    mz = Cz @ N.T @ prec @ (loc - x0)
    return x0, N, mz, Cz


def test_dense_formulas_match_nullspace_oracle():
    loc, W, d, cov, A, b = random_problem()
    d_full = plc.constrain(dist.MultivariateNormal(loc, cov), A, b)
    x0, N, mz, Cz = nullspace_oracle(loc, cov, A, b)
    mean = x0 + N @ mz
    C = N @ Cz @ N.T
    np.testing.assert_allclose(d_full.mean.numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(d_full.variance.numpy(), np.diag(C), rtol=1e-10, atol=1e-10)
    # the closed forms of DESIGN.md section 2
    S = A @ cov @ A.T
    K = cov @ A.T
    mean2 = loc + K @ torch.linalg.solve(S, b - A @ loc)
    np.testing.assert_allclose(mean2.numpy(), mean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
def test_log_prob_equals_nullspace_density(kind):
    loc, W, d, cov, A, b = random_problem(n=5, m=2, seed=1)
    if kind == "diag":
        base = dist.Normal(loc, d.sqrt()).to_event(1)
        cov = torch.diag(d)
    elif kind == "lowrank":
        base = dist.LowRankMultivariateNormal(loc, W, d)
    else:
        base = dist.MultivariateNormal(loc, cov)
    c = plc.constrain(base, A, b)
    x = c.sample((7,))
    x0, N, mz, Cz = nullspace_oracle(loc, cov, A, b)
    z = (x.numpy() - x0) @ N
    expected = scipy.stats.multivariate_normal(mz, Cz).logpdf(z)
    np.testing.assert_allclose(c.log_prob(x).numpy(), expected, rtol=1e-9, atol=1e-9)
    # entropy of the null-space Gaussian
    ent = scipy.stats.multivariate_normal(mz, Cz).entropy()
    np.testing.assert_allclose(float(c.entropy()), ent, rtol=1e-10)


def test_log_prob_invariant_under_row_transform():
    loc, W, d, cov, A, b = random_problem(n=6, m=3, seed=2)
    T = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    base = dist.LowRankMultivariateNormal(loc, W, d)
    d1 = plc.constrain(base, A, b)
    d2 = plc.constrain(base, T @ A, T @ b)
    x = d1.sample((5,))
    torch.testing.assert_close(d1.log_prob(x), d2.log_prob(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d1.mean, d2.mean)
    torch.testing.assert_close(d1.variance, d2.variance)


def test_density_integrates_to_one_along_a_line():
    loc = torch.tensor([0.3, -1.0], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    A = torch.tensor([[1.5, -0.7]], dtype=torch.float64)
    b = torch.tensor([0.4], dtype=torch.float64)
    d = plc.constrain(dist.MultivariateNormal(loc, cov), A, b)
    x0 = (A.T @ torch.linalg.solve(A @ A.T, b)).squeeze(-1)
    u = torch.tensor([0.7, 1.5], dtype=torch.float64)
    u = u / u.norm()  # unit speed along the null space of A

    def density(t):
        return float(d.log_prob(x0 + t * u).exp())

    total, err = scipy.integrate.quad(density, -np.inf, np.inf)
    assert abs(total - 1.0) < 1e-7


def test_monte_carlo_moments_within_standard_errors():
    loc, W, d, cov, A, b = random_problem(n=6, m=2, seed=3)
    c = plc.constrain(dist.LowRankMultivariateNormal(loc, W, d), A, b)
    N = 20000
    x = c.sample((N,))
    se_mean = (c.variance / N).sqrt()
    assert ((x.mean(0) - c.mean).abs() <= 5 * se_mean + 1e-12).all()
    # variance of a sample variance of a Gaussian: 2 v^2 / (N - 1)
    se_var = (2 * c.variance**2 / (N - 1)).sqrt()
    assert ((x.var(0) - c.variance).abs() <= 5 * se_var + 1e-12).all()
    # covariance against the oracle, entrywise, with SE sqrt((C_ij^2 + C_ii C_jj) / N)
    x0, Nb, mz, Cz = nullspace_oracle(loc, cov, A, b)
    C = torch.from_numpy(Nb @ Cz @ Nb.T)
    emp = torch.from_numpy(np.cov(x.numpy().T))
    se = ((C**2 + torch.outer(C.diag(), C.diag())) / N).sqrt()
    assert ((emp - C).abs() <= 5 * se + 1e-10).all()


def test_diag_lowrank_full_agree():
    loc, W, d, cov, A, b = random_problem(n=6, m=2, seed=4)
    Wz = torch.zeros(6, 1, dtype=torch.float64)
    dists = [
        plc.constrain(dist.Normal(loc, d.sqrt()).to_event(1), A, b),
        plc.constrain(dist.LowRankMultivariateNormal(loc, Wz, d), A, b),
        plc.constrain(dist.MultivariateNormal(loc, torch.diag(d)), A, b),
        plc.constrain(dist.MultivariateNormal(loc, precision_matrix=torch.diag(1 / d)), A, b),
        plc.constrain(dist.MultivariateNormal(loc, scale_tril=torch.diag(d.sqrt())), A, b),
    ]
    x = dists[0].sample((4,))
    for other in dists[1:]:
        torch.testing.assert_close(other.mean, dists[0].mean)
        torch.testing.assert_close(other.variance, dists[0].variance)
        torch.testing.assert_close(other.log_prob(x), dists[0].log_prob(x))
        torch.testing.assert_close(other.entropy(), dists[0].entropy())


@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
def test_group_sum_agrees_with_dense(kind):
    g = torch.Generator().manual_seed(6)
    groups = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 1])
    n = groups.numel()
    A = plc.GroupSum(groups, 3)
    loc = torch.randn(4, n, generator=g, dtype=torch.float64)
    s = torch.rand(4, n, generator=g, dtype=torch.float64) + 0.2
    W = torch.randn(n, 2, generator=g, dtype=torch.float64)
    if kind == "diag":
        base = dist.Normal(loc, s.sqrt()).to_event(1)
    elif kind == "lowrank":
        base = dist.LowRankMultivariateNormal(loc, W, s)
    else:
        base = dist.MultivariateNormal(loc, W @ W.T + torch.diag_embed(s))
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    d1 = plc.constrain(base, A, b)
    d2 = plc.constrain(base, A.to_dense().double(), b)
    torch.testing.assert_close(d1.mean, d2.mean)
    torch.testing.assert_close(d1.variance, d2.variance)
    x = d1.sample((3,))
    torch.testing.assert_close(A.matvec(x), b.expand(3, 4, 3))
    torch.testing.assert_close(d1.log_prob(x), d2.log_prob(x))
    torch.testing.assert_close(d1.entropy(), d2.entropy())


def test_single_sum_closed_form():
    """PAPER.md: m_i = mu_i + s_i (b - sum mu) / sum s, v_i = s_i - s_i^2 / sum s."""
    mu = torch.tensor([0.1, -0.3, 0.5, 0.2], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)
    d = plc.constrain(
        dist.Normal(mu, s.sqrt()).to_event(1),
        plc.GroupSum(torch.zeros(4, dtype=torch.long), 1),
        mu.new_tensor([1.0]),
    )
    torch.testing.assert_close(d.mean, mu + s * (1.0 - mu.sum()) / s.sum())
    torch.testing.assert_close(d.variance, s - s**2 / s.sum())


def test_gradcheck_rsample_and_log_prob():
    loc, W, d, cov, A, b = random_problem(n=5, m=2, seed=7)
    loc.requires_grad_(True)
    W.requires_grad_(True)
    d.requires_grad_(True)

    def sample(loc, W, d):
        torch.manual_seed(0)
        return plc.constrain(dist.LowRankMultivariateNormal(loc, W, d), A, b).rsample((2,))

    assert torch.autograd.gradcheck(sample, (loc, W, d))

    x = plc.constrain(dist.LowRankMultivariateNormal(loc, W, d), A, b).sample((3,))

    def logp(loc, W, d):
        return plc.constrain(dist.LowRankMultivariateNormal(loc, W, d), A, b).log_prob(x)

    assert torch.autograd.gradcheck(logp, (loc, W, d))

    def moments(loc, d):
        c = plc.constrain(dist.Normal(loc, d.sqrt()).to_event(1), A, b)
        return c.mean, c.variance

    assert torch.autograd.gradcheck(moments, (loc, d))


def test_shapes_sample_shape_and_expand():
    n, m = 6, 2
    base = dist.Normal(torch.zeros(3, 1, n), torch.ones(3, 1, n)).to_event(1)
    A = torch.randn(m, n)
    b = torch.randn(4, m)
    d = plc.constrain(base, A, b)
    assert d.batch_shape == (3, 4) and d.event_shape == (n,)
    assert d.sample().shape == (3, 4, n)
    assert d.rsample((5, 2)).shape == (5, 2, 3, 4, n)
    assert d.log_prob(d.sample((5,))).shape == (5, 3, 4)
    assert d.mean.shape == d.variance.shape == (3, 4, n)
    e = d.expand((2, 3, 4))
    assert e.batch_shape == (2, 3, 4)
    x = e.sample((7,))
    assert x.shape == (7, 2, 3, 4, n)
    torch.testing.assert_close(e.log_prob(x)[:, 0], d.log_prob(x[:, 0]))
    assert e.entropy().shape == (2, 3, 4)
    assert d.support.check(x[:, 0]).all()


def test_multidimensional_event_keeps_shape():
    # an image site (1, 4, 4) whose 2x2 blocks have known sums
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    groups = ((rows // 2) * 2 + cols // 2).reshape(-1)
    A = plc.GroupSum(groups, 4)
    base = dist.Normal(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)).to_event(3)
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    d = plc.constrain(base, A, b)
    assert d.event_shape == (1, 4, 4) and d.batch_shape == (2,)
    x = d.sample((3,))
    assert x.shape == (3, 2, 1, 4, 4)
    torch.testing.assert_close(A.matvec(x.reshape(3, 2, 16)), b.expand(3, 2, 4))
    assert d.log_prob(x).shape == (3, 2)
    assert d.mean.shape == (2, 1, 4, 4)


def test_shared_factorization_once_per_call():
    """A shared A and covariance: one Cholesky of shape (m, m), not one per item."""
    n, m = 8, 3
    A = torch.randn(m, n, dtype=torch.float64)
    base = dist.MultivariateNormal(
        torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    )
    d = plc.constrain(base, A, torch.randn(100, m, dtype=torch.float64))
    assert d.batch_shape == (100,)
    assert d._cond.chol.shape == (m, m)


def test_rank_deficient_consistent_A_drops_rows():
    loc, W, d, cov, A, b = random_problem(n=6, m=2, seed=8)
    A3 = torch.cat([A, A[:1] + 2 * A[1:]], 0)
    b3 = torch.cat([b, b[:1] + 2 * b[1:]], 0)
    base = dist.MultivariateNormal(loc, cov)
    d1, d2 = plc.constrain(base, A, b), plc.constrain(base, A3, b3)
    torch.testing.assert_close(d1.mean, d2.mean)
    torch.testing.assert_close(d1.variance, d2.variance)
    x = d2.sample((4,))
    torch.testing.assert_close(d1.log_prob(x), d2.log_prob(x))
    torch.testing.assert_close(A3 @ x.unsqueeze(-1), b3.expand(4, 3).unsqueeze(-1))
    # m >= n, still consistent and of rank < n
    A7 = torch.cat([A3, A3[:2] * 3, A3[:2] - A3[1:3]], 0)
    b7 = torch.cat([b3, b3[:2] * 3, b3[:2] - b3[1:3]], 0)
    assert A7.shape[0] == 7
    torch.testing.assert_close(plc.constrain(base, A7, b7).mean, d1.mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exactness_ill_conditioned(dtype):
    g = torch.Generator().manual_seed(9)
    n, m = 40, 10
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    sv = torch.logspace(0, -5, m, dtype=torch.float64)  # cond(A) = 1e5
    A = (U * sv) @ V.T
    var = torch.logspace(-6, 6, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    loc = torch.randn(n, generator=g, dtype=torch.float64) * 10
    b = torch.randn(3, m, generator=g, dtype=torch.float64)
    A, var, loc, b = A.to(dtype), var.to(dtype), loc.to(dtype), b.to(dtype)
    d = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b)
    x = d.sample((50,))
    assert x.dtype == dtype
    A64, x64, b64 = A.double(), x.double(), b.double()
    resid = (A64 @ x64.unsqueeze(-1)).squeeze(-1) - b64
    bound = (
        8
        * math.sqrt(n)
        * torch.finfo(dtype).eps
        * ((A64.abs() @ x64.abs().unsqueeze(-1)).squeeze(-1) + b64.abs())
    )
    assert (resid.abs() <= bound).all()
    assert d.support.check(x).all()


def test_affine_subspace_transform():
    g = torch.Generator().manual_seed(10)
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    c = plc.constraints.affine_subspace(A, b)
    t = torch.distributions.biject_to(c)
    assert isinstance(t, plc.transforms.AffineSubspaceTransform)
    assert isinstance(torch.distributions.transform_to(c), plc.transforms.AffineSubspaceTransform)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = t(z)
    assert x.shape == (4, 5)
    assert c.check(x).all()
    torch.testing.assert_close(t.inv(x), z)
    assert (t.log_abs_det_jacobian(z, x) == 0).all()
    # the basis is orthonormal: the Jacobian J satisfies J^T J = I
    J = torch.autograd.functional.jacobian(lambda u: t(u), z[0])
    torch.testing.assert_close(J.T @ J, torch.eye(3, dtype=torch.float64))
    assert t.inverse_shape((7, 5)) == (7, 3) and t.forward_shape((7, 3)) == (7, 5)


def test_log_prob_agrees_with_transform():
    """The null-space density pushed through the transform is the constrained density."""
    loc, W, d, cov, A, b = random_problem(n=5, m=2, seed=11)
    c = plc.constrain(dist.MultivariateNormal(loc, cov), A, b)
    t = torch.distributions.biject_to(c.support)
    x = c.sample((6,))
    z = t.inv(x)
    N = t._basis
    mz = N.T @ (c.mean - t._x0)
    _, Nb, _, Cz_oracle = nullspace_oracle(loc, cov, A, b)
    Cz = N.T @ torch.from_numpy(Nb @ Cz_oracle @ Nb.T) @ N
    expected = dist.MultivariateNormal(mz, Cz).log_prob(z)
    torch.testing.assert_close(c.log_prob(x), expected)


# ------------------------------------------------------------------ bad input
def _base(n=4):
    return dist.Normal(torch.zeros(n), torch.ones(n)).to_event(1)


def test_error_inconsistent_b():
    A = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.constrain(_base(), A, torch.tensor([1.0, 3.0]))


def test_error_m_ge_n():
    with pytest.raises(ValueError, match="m >= n"):
        plc.constrain(_base(), torch.randn(4, 4), torch.randn(4))
    with pytest.raises(ValueError, match="m >= n"):
        plc.constrain(_base(2), plc.GroupSum(torch.tensor([0, 1]), 2), torch.zeros(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_error_non_finite(bad):
    A = torch.ones(1, 4)
    with pytest.raises(ValueError, match="b has non-finite"):
        plc.constrain(_base(), A, torch.tensor([bad]))
    A2 = A.clone()
    A2[0, 1] = bad
    with pytest.raises(ValueError, match="A has non-finite"):
        plc.constrain(_base(), A2, torch.zeros(1))


def test_error_shapes():
    with pytest.raises(ValueError, match=r"A has 3 columns .* n = 4"):
        plc.constrain(_base(), torch.ones(1, 3), torch.zeros(1))
    with pytest.raises(ValueError, match=r"b must have shape \(\.\.\., m\) with m = 1"):
        plc.constrain(_base(), torch.ones(1, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        plc.constrain(_base(), torch.ones(4), torch.zeros(1))
    with pytest.raises(ValueError, match="do not broadcast"):
        plc.constrain(_base().expand((3,)), torch.ones(1, 4), torch.zeros(2, 1))


def test_error_group_ids():
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, num_groups\)"):
        plc.GroupSum(torch.tensor([0, 1, 3]), 2)
    with pytest.raises(ValueError, match="group ids"):
        plc.GroupSum(torch.tensor([0, -1]), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        plc.GroupSum(torch.tensor([0.0, 1.0]), 2)


def test_error_non_positive_variance():
    base = dist.Normal(
        torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]), validate_args=False
    ).to_event(1)
    with pytest.raises(ValueError, match="non-positive"):
        plc.constrain(base, torch.ones(1, 4), torch.zeros(1))
    base = dist.MultivariateNormal(torch.zeros(4), scale_tril=-torch.eye(4), validate_args=False)
    with pytest.raises(ValueError, match="non-positive"):
        plc.constrain(base, torch.ones(1, 4), torch.zeros(1))


def test_error_unsupported_family():
    with pytest.raises(NotImplementedError, match="register_constrain"):
        plc.constrain(dist.Gamma(torch.ones(3), 1.0).to_event(1), torch.ones(1, 3), torch.ones(1))
    with pytest.raises(ValueError, match="to_event"):
        plc.constrain(dist.Normal(torch.zeros(3), 1.0), torch.ones(1, 3), torch.ones(1))


def test_empty_group_with_zero_target_is_dropped():
    A = plc.GroupSum(torch.tensor([0, 0, 2, 2, 2]), 3)  # group 1 is empty
    base = dist.Normal(
        torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    ).to_event(1)
    d = plc.constrain(base, A, torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    d2 = plc.constrain(
        base,
        plc.GroupSum(torch.tensor([0, 0, 1, 1, 1]), 2),
        torch.tensor([1.0, 2.0], dtype=torch.float64),
    )
    x = d.sample((3,))
    torch.testing.assert_close(d.log_prob(x), d2.log_prob(x))
    with pytest.raises(ValueError, match="inconsistent b"):
        plc.constrain(base, A, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))


def test_register_constrain_adds_a_family():
    class MyNormal(dist.Normal):
        pass

    @plc.register_constrain(MyNormal)
    def _(base, A, b):
        return ConstrainedGaussian(dist.Normal(base.loc, base.scale).to_event(1), A, b)

    d = plc.constrain(MyNormal(torch.zeros(3), 1.0), torch.ones(1, 3), torch.ones(1))
    assert isinstance(d, ConstrainedGaussian)


def test_group_sum_lowrank_variance_never_densifies():
    """n = 200,000 entries in 2,000 groups: an m x n matrix would hold 4e8 numbers."""
    n, m, r = 200_000, 2_000, 3
    g = torch.Generator().manual_seed(12)
    groups = torch.sort(
        torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=g)])
    ).values
    A = plc.GroupSum(groups, m)
    W = torch.randn(n, r, generator=g, dtype=torch.float64) * 0.1
    d = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    base = dist.LowRankMultivariateNormal(torch.zeros(n, dtype=torch.float64), W, d)
    c = plc.constrain(base, A, torch.zeros(m, dtype=torch.float64))
    v = c.variance
    assert v.shape == (n,) and torch.isfinite(v).all() and (v >= 0).all()
    assert (v <= (W**2).sum(-1) + d + 1e-12).all()  # conditioning never adds variance
    # a singleton group's entry is pinned to its target: zero variance
    singletons = (A.group_sizes() == 1).nonzero().squeeze(-1)
    if singletons.numel():
        pinned = torch.isin(groups, singletons)
        assert v[pinned].abs().max() < 1e-12


def test_log_prob_validates_values_it_did_not_draw():
    d = plc.constrain(
        dist.Normal(torch.zeros(4), 1.0).to_event(1), torch.ones(1, 4), torch.zeros(1)
    )
    x = d.rsample()
    d.log_prob(x)  # its own sample: valid by construction
    x2 = x.detach().clone()
    x2[0] += 1.0
    with pytest.raises(ValueError, match="support"):
        d.log_prob(x2)
    with torch.no_grad():
        x[0] += 1.0  # modified in place after sampling: validated again
    with pytest.raises(ValueError, match="support"):
        d.log_prob(x)
