"""pyro_linconstr.infer.diffusion against independent float64 oracles."""

import math

import pyro
import pytest
import torch

import pyro_linconstr as plc
from pyro_linconstr.infer.diffusion import (
    constrained_reverse_step,
    reverse_step_kl,
    sample_law_marginal,
    sample_law_posterior,
)

F64 = torch.float64


def _laws():
    """(A as given to the library, its dense float64 matrix): image blocks and a dense A."""
    blocks = plc.GroupSum.blocks((4, 6), 2, dtype=F64)
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(5, 24, generator=g, dtype=F64)
    return [(blocks, blocks.to_dense()), (dense, dense)]


def _null_basis(M):
    """Orthonormal basis (n, n - m) of the null space of M, by SVD (independent of the package)."""
    _, _, Vh = torch.linalg.svd(M)
    return Vh[M.shape[0] :].T


def _oracle_conditional(mu, var, M, b):
    """Mean (n,) and coordinates of N(mu, diag(var)) | M x = b in the chart x = x* + Q u:
    returns (Q, x*, mean of u, covariance of u) from the precision Q^T Sigma^{-1} Q."""
    Q = _null_basis(M)
    xstar = torch.linalg.pinv(M) @ b
    prec = Q.T @ (Q / var.unsqueeze(-1))
    cov_u = torch.linalg.inv(prec)
    mean_u = cov_u @ (Q.T @ ((mu - xstar) / var))
    return Q, xstar, mean_u, cov_u


def _kl_mvn(m0, S0, m1, S1):
    d = m0.numel()
    S1inv = torch.linalg.inv(S1)
    diff = m1 - m0
    return 0.5 * (
        torch.trace(S1inv @ S0) - d + diff @ S1inv @ diff + torch.logdet(S1) - torch.logdet(S0)
    )


# ------------------------------------------------------------------ the reverse step
@pytest.mark.parametrize("law", range(2))
def test_reverse_step_mean_variance_and_exactness(law):
    A, M = _laws()[law]
    torch.manual_seed(0)
    mu = torch.randn(3, 24, dtype=F64)
    var = torch.rand(3, 24, dtype=F64) * 2 + 0.05
    b = torch.randn(3, M.shape[0], dtype=F64)
    step = constrained_reverse_step(mu, var, A, b)
    for i in range(3):
        Q, xstar, mean_u, cov_u = _oracle_conditional(mu[i], var[i], M, b[i])
        torch.testing.assert_close(step.mean[i], xstar + Q @ mean_u)
        torch.testing.assert_close(step.variance[i], ((Q @ cov_u) * Q).sum(-1))
    x = step.sample((20,))
    assert (x @ M.T - b).abs().max() < 1e-10


def test_isotropic_step_is_projected_mean_plus_projected_noise():
    """The check the tutorial shows: with Sigma = s I, the exact conditioned draw equals
    the orthogonal projection of the unconstrained draw mu + sqrt(s) eps (same eps)."""
    A = plc.GroupSum.blocks((14, 14), 2)
    torch.manual_seed(1)
    mu, b = torch.randn(64, 196), torch.randn(64, 49)
    s = torch.rand(64) + 0.1  # one variance per image (per diffusion step)
    torch.manual_seed(7)
    x = constrained_reverse_step(mu, s, A, b).sample()
    torch.manual_seed(7)
    eps = torch.randn(64, 196)
    projected = plc.project(mu + s.sqrt().unsqueeze(-1) * eps, A, b)
    torch.testing.assert_close(x, projected, atol=2e-6, rtol=0)
    # and per-pixel variances do not give the projection: the block residual is shared
    # in proportion to the variances
    var = torch.rand(64, 196) + 0.1
    mean = constrained_reverse_step(mu, var, A, b).mean
    assert (mean - plc.project(mu, A, b)).abs().max() > 0.1


def test_deterministic_limit_is_the_conditional_mean():
    """DDIM with eta -> 0: draws of N(mu, e^2 diag(s)) | Ax = b converge to the conditional
    mean, which does not depend on e (the variance-weighted projection)."""
    A, M = _laws()[0]
    torch.manual_seed(2)
    mu, s, b = (
        torch.randn(24, dtype=F64),
        torch.rand(24, dtype=F64) + 0.1,
        torch.randn(6, dtype=F64),
    )
    means = [constrained_reverse_step(mu, e**2 * s, A, b).mean for e in (1.0, 1e-2, 1e-4)]
    torch.testing.assert_close(means[0], means[2])
    x = constrained_reverse_step(mu, 1e-8 * s, A, b).sample()
    torch.testing.assert_close(x, means[0], atol=1e-3, rtol=0)
    # the weighted projection, independently: argmin (x - mu)^T diag(1/s) (x - mu), M x = b
    K = s.unsqueeze(-1) * M.T
    wproj = mu + K @ torch.linalg.solve(M @ K, b - M @ mu)
    torch.testing.assert_close(means[0], wproj)


# ------------------------------------------------------------------ the law's chain
def _ddpm_coefficients(abar_t, abar_s):
    """Textbook DDPM posterior q(x_s | x_t, x_0) for consecutive steps (Ho et al. eq. 7)."""
    alpha = abar_t / abar_s
    beta = 1 - alpha
    c0 = math.sqrt(abar_s) * beta / (1 - abar_t)
    ct = math.sqrt(alpha) * (1 - abar_s) / (1 - abar_t)
    var = (1 - abar_s) / (1 - abar_t) * beta
    return c0, ct, var


@pytest.mark.parametrize("law", range(2))
def test_law_posterior_is_the_ddpm_posterior_seen_through_A(law):
    A, M = _laws()[law]
    torch.manual_seed(4)
    x0 = torch.randn(8, 24, dtype=F64)
    b = x0 @ M.T
    abar_t, abar_s = 0.55, 0.62
    xt = math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * torch.randn(8, 24, dtype=F64)
    eps = torch.randn(8, 24, dtype=F64)
    c0, ct, var = _ddpm_coefficients(abar_t, abar_s)
    xs = c0 * x0 + ct * xt + math.sqrt(var) * eps
    zs = sample_law_posterior(A, b, xt @ M.T, abar_t, abar_s, noise=eps)
    torch.testing.assert_close(zs, xs @ M.T)
    # DDIM: q_sigma(x_s | x_t, x_0) of Song et al. eq. 7, any sigma
    sigma2 = 0.3 * var
    eps_t = (xt - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    xs = math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s - sigma2) * eps_t + math.sqrt(sigma2) * eps
    zs = sample_law_posterior(A, b, xt @ M.T, abar_t, abar_s, variance=sigma2, noise=eps)
    torch.testing.assert_close(zs, xs @ M.T)
    # the last step lands on the law
    z0 = sample_law_posterior(A, b, xt @ M.T, abar_t, 1.0)
    torch.testing.assert_close(z0, b)


def test_law_chain_keeps_the_forward_marginals():
    """Monte Carlo: z_T from the marginal, then posterior steps with sigma^2 = eta^2 beta~;
    every z_t has mean sqrt(abar_t) b and covariance (1 - abar_t) A A^T (tolerances from
    the standard errors of 40,000 draws)."""
    A, M = _laws()[0]
    torch.manual_seed(5)
    N = 40_000
    b = torch.randn(M.shape[0], dtype=F64)
    abars = [0.05, 0.3, 0.7, 0.95]
    z = sample_law_marginal(A, b.expand(N, -1), abars[0])
    for eta in (1.0,):
        for abar_t, abar_s in zip(abars[:-1], abars[1:]):
            ddpm = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
            z = sample_law_posterior(A, b, z, abar_t, abar_s, variance=0.5 * eta**2 * ddpm)
            cov_true = (1 - abar_s) * (M @ M.T)
            se_mean = (cov_true.diagonal() / N).sqrt()
            assert ((z.mean(0) - math.sqrt(abar_s) * b).abs() < 5 * se_mean).all()
            cov = torch.cov(z.T)
            se_cov = ((cov_true**2 + cov_true.diagonal()[:, None] * cov_true.diagonal()) / N).sqrt()
            assert ((cov - cov_true).abs() < 5 * se_cov).all()


# ------------------------------------------------------------------ the objective
@pytest.mark.parametrize("law", range(2))
def test_reverse_step_kl_matches_the_null_space_oracle(law):
    A, M = _laws()[law]
    torch.manual_seed(6)
    b = torch.randn(2, M.shape[0], dtype=F64)
    tq = torch.randn(2, 24, dtype=F64)
    vq = torch.tensor([0.3, 0.02], dtype=F64)  # isotropic targets, one per image
    mu = torch.randn(2, 24, dtype=F64)
    var = torch.rand(2, 24, dtype=F64) + 0.05
    kl = reverse_step_kl(tq, vq, mu, var, A, b)
    for i in range(2):
        _, _, m0, S0 = _oracle_conditional(tq[i], vq[i].expand(24), M, b[i])
        _, _, m1, S1 = _oracle_conditional(mu[i], var[i], M, b[i])
        torch.testing.assert_close(kl[i], _kl_mvn(m0, S0, m1, S1))


def test_reverse_step_kl_gradients_and_simple_loss_identity():
    """Isotropic model: 2 alpha (1 - abar) / beta * KL = ||(I - P)(eps - eps_theta)||^2 with
    the projector P from a pseudo-inverse; gradients in float64 by gradcheck."""
    A = plc.GroupSum.blocks((4, 4), 2, dtype=F64)
    M = A.to_dense()
    P = torch.linalg.pinv(M) @ M
    torch.manual_seed(8)
    abar_t, abar_s = 0.4, 0.45
    alpha = abar_t / abar_s
    beta = 1 - alpha
    x0, eps, eps_hat = (torch.randn(3, 16, dtype=F64) for _ in range(3))
    xt = math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps
    c0, ct, _ = _ddpm_coefficients(abar_t, abar_s)
    mu_q = c0 * x0 + ct * xt
    mu_theta = (xt - beta / math.sqrt(1 - abar_t) * eps_hat) / math.sqrt(alpha)
    z = torch.randn(3, 4, dtype=F64)  # any target of the step
    kl = reverse_step_kl(mu_q, beta, mu_theta, beta, A, z)
    simple = (((eps - eps_hat) @ (torch.eye(16, dtype=F64) - P)) ** 2).sum(-1)
    torch.testing.assert_close(2 * alpha * (1 - abar_t) / beta * kl, simple)

    var = (torch.rand(3, 16, dtype=F64) + 0.1).requires_grad_()
    loc = torch.randn(3, 16, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda loc, var: reverse_step_kl(mu_q, 0.2, loc, var, A, z), (loc, var)
    )


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, words",
    [
        (lambda A, b, z: sample_law_marginal(A, b, 1.5), ["alpha_bar", "[0, 1]"]),
        (lambda A, b, z: sample_law_marginal(A, b, float("nan")), ["alpha_bar"]),
        (lambda A, b, z: sample_law_marginal(A, b * float("nan"), 0.5), ["b", "non-finite"]),
        (lambda A, b, z: sample_law_marginal(A, b[..., :3], 0.5), ["b", "(..., 4)"]),
        (
            lambda A, b, z: sample_law_marginal(A, b, 0.5, noise=torch.randn(3, 15)),
            ["noise", "(..., 16)"],
        ),
        (lambda A, b, z: sample_law_posterior(A, b, z, 0.5, 0.3), ["alpha_bar_s", "swapped"]),
        (lambda A, b, z: sample_law_posterior(A, b, z, 1.0, 1.0), ["alpha_bar_t", "[0, 1)"]),
        (
            lambda A, b, z: sample_law_posterior(A, b, z, 0.3, 0.5, variance=0.9),
            ["variance", "1 - alpha_bar_s"],
        ),
        (
            lambda A, b, z: sample_law_posterior(A, b, z, 0.3, 0.5, variance=-0.1),
            ["variance"],
        ),
        (lambda A, b, z: sample_law_posterior(A, b, z[..., :2], 0.3, 0.5), ["z_t", "(..., 4)"]),
        (
            lambda A, b, z: sample_law_posterior(A, b, z * float("inf"), 0.3, 0.5),
            ["z_t", "non-finite"],
        ),
        (
            lambda A, b, z: constrained_reverse_step(torch.zeros(3, 16), 0.0, A, b),
            ["variance", "positive", ".mean"],
        ),
        (
            lambda A, b, z: reverse_step_kl(torch.zeros(16), -1.0, torch.zeros(16), 1.0, A, b),
            ["variance", "positive"],
        ),
    ],
)
def test_bad_arguments_are_named(call, words):
    """Silent NaNs before: alpha_bar outside [0, 1], swapped steps, a variance above
    1 - alpha_bar_s (it was clamped), non-finite b or z_t; a zero variance hit a
    message about Normal's scale."""
    A = plc.GroupSum.blocks((4, 4), 2)
    b = torch.rand(3, 4)
    z = torch.rand(3, 4)
    with pytest.raises(ValueError) as err:
        call(A, b, z)
    for word in words:
        assert word in str(err.value)


def test_value_checks_follow_validation_and_edges_pass():
    A = plc.GroupSum.blocks((4, 4), 2)
    b = torch.rand(3, 4)
    z = sample_law_marginal(A, b, 0.3)
    # the edges of the documented ranges are accepted
    assert torch.equal(sample_law_marginal(A, b, 1.0), b)
    assert torch.isfinite(sample_law_marginal(A, b, 0.0)).all()
    assert torch.equal(sample_law_posterior(A, b, z, 0.3, 1.0), b)
    full = sample_law_posterior(A, b, z, 0.3, 0.5, variance=0.5)  # sigma^2 = 1 - abar_s
    assert torch.isfinite(full).all()
    # empty batches come back empty
    assert sample_law_posterior(A, b[:0], z[:0], 0.3, 0.5).shape == (0, 4)
    assert constrained_reverse_step(torch.zeros(0, 16), 1.0, A, b[:0]).sample().shape == (0, 16)
    with pyro.validation_enabled(False):  # a tuned loop pays no host sync for value checks
        assert torch.isnan(sample_law_marginal(A, b, 1.5)).all()
