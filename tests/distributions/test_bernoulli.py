"""ConstrainedBernoulli (Bernoulli and Binomial bases) against brute-force enumeration."""

import itertools
import math

import pyro.distributions as dist
import pytest
import scipy.stats
import torch

import pyro_linconstr as plc
from pyro_linconstr.distributions import ConstrainedBernoulli


def enumerate_valid(counts: list[int], A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every x with 0 <= x_i <= counts[i] and A x = b (rows of A may leave entries free)."""
    grid = torch.tensor(
        list(itertools.product(*[range(c + 1) for c in counts])), dtype=torch.float64
    )
    return grid[((grid @ A.T.double()) == b.double()).all(-1)]


def oracle(base, xs):
    """Conditional log-pmf over the enumerated valid set, and its marginal moments."""
    lp = base.log_prob(xs)
    lp = lp - lp.logsumexp(-1, keepdim=True)
    w = lp.exp().unsqueeze(-1)
    mean = (w * xs).sum(-2)
    var = (w * xs**2).sum(-2) - mean**2
    return lp, mean, var


def test_bernoulli_matches_enumeration_with_free_entry():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.5, 1.5, -2.5], dtype=torch.float64)
    A = torch.tensor(
        [[1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1, 0]], dtype=torch.float64
    )  # entry 4 is free
    b = torch.tensor([2.0, 1.0], dtype=torch.float64)
    base = dist.Bernoulli(logits=logits).to_event(1)
    d = plc.constrain(base, A, b)
    assert isinstance(d, ConstrainedBernoulli)
    xs = enumerate_valid([1] * 7, A, b)
    lp, mean, var = oracle(base, xs)
    torch.testing.assert_close(d.log_prob(xs), lp)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, var)
    pmf = d.marginal_pmf()
    torch.testing.assert_close(pmf[:, 1], mean)
    torch.testing.assert_close(pmf.sum(-1), torch.ones(7, dtype=torch.float64))


def test_bernoulli_probs_batched_totals_match_enumeration():
    probs = torch.tensor(
        [[0.1, 0.5, 0.9, 0.3, 0.6], [0.7, 0.2, 0.4, 0.4, 0.99]], dtype=torch.float64
    )
    groups = torch.tensor([0, 0, 0, 1, 1])
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    d = plc.constrain(dist.Bernoulli(probs=probs).to_event(1), plc.GroupSum(groups, 2), b)
    d._validate_args = False  # the enumerated values are valid for one batch element only
    A = plc.GroupSum(groups, 2).to_dense().double()
    for i in range(2):
        base = dist.Bernoulli(probs=probs[i]).to_event(1)
        xs = enumerate_valid([1] * 5, A, b[i])
        lp, mean, var = oracle(base, xs)
        torch.testing.assert_close(d.log_prob(xs.unsqueeze(1))[:, i], lp)
        torch.testing.assert_close(d.mean[i], mean)
        torch.testing.assert_close(d.variance[i], var)


def test_binomial_matches_enumeration():
    counts = [2, 3, 0, 1, 4, 2]
    total_count = torch.tensor(counts, dtype=torch.float64)
    logits = torch.tensor([0.4, -0.7, 1.0, 1.3, -0.2, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 0, 1, 1])
    b = torch.tensor([2.0, 5.0], dtype=torch.float64)
    base = dist.Binomial(total_count, logits=logits).to_event(1)
    d = plc.constrain(base, plc.GroupSum(groups, 2), b)
    xs = enumerate_valid(counts, plc.GroupSum(groups, 2).to_dense(), b)
    lp, mean, var = oracle(base, xs)
    torch.testing.assert_close(d.log_prob(xs), lp)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, var)
    assert d.marginal_pmf().shape == (6, 5)


def test_k_subset_uniform():
    # equal probabilities: every k-subset equally likely, marginals k / n
    n, k = 10, 4
    d = plc.constrain(
        dist.Bernoulli(logits=torch.zeros(n)).to_event(1), torch.ones(1, n), torch.tensor([k * 1.0])
    )
    x = torch.zeros(n)
    x[:k] = 1
    torch.testing.assert_close(d.log_prob(x), torch.tensor(-math.log(math.comb(n, k))))
    torch.testing.assert_close(d.mean, torch.full((n,), k / n))


def _chi_square(samples: torch.Tensor, configs: torch.Tensor, log_probs: torch.Tensor) -> float:
    lookup = {tuple(c): j for j, c in enumerate(configs.long().tolist())}
    observed = torch.zeros(len(configs), dtype=torch.float64)
    for row in samples.long().tolist():
        observed[lookup[tuple(row)]] += 1
    expected = log_probs.exp() * samples.shape[0]
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp * obs.sum() / exp.sum()
    return float(scipy.stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_bernoulli_sampling_chi_square():
    logits = torch.tensor([[1.0, -0.5, 0.0, 2.0, -1.5, 0.5]]).expand(2, 6)
    b = torch.tensor([[3.0], [2.0]])
    d = plc.constrain(dist.Bernoulli(logits=logits).to_event(1), torch.ones(1, 6), b)
    d._validate_args = False  # the enumerated values are valid for one batch element only
    x = d.sample((20000,))
    assert x.shape == (20000, 2, 6)
    for i in range(2):
        configs = enumerate_valid([1] * 6, torch.ones(1, 6), b[i])
        lp = d.log_prob(configs.float().unsqueeze(1))[:, i].double()
        torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
        assert _chi_square(x[:, i], configs, lp) > 1e-3
    lp = d.log_prob(torch.tensor([1.0, 1, 1, 0, 0, 0]))  # sum 3: in batch 0's support only
    assert bool(torch.isfinite(lp[0])) and lp[1] == -math.inf


def test_binomial_sampling_chi_square():
    counts = [2, 1, 3, 2]
    total_count = torch.tensor(counts, dtype=torch.float32)
    logits = torch.tensor([0.5, -1.0, 0.2, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    b = torch.tensor([2.0, 3.0])
    d = plc.constrain(
        dist.Binomial(total_count, logits=logits).to_event(1), plc.GroupSum(groups, 2), b
    )
    x = d.sample((20000,))
    configs = enumerate_valid(counts, plc.GroupSum(groups, 2).to_dense(), b)
    lp = d.log_prob(configs.float()).double()
    assert _chi_square(x, configs, lp) > 1e-3


def test_marginals_gradcheck():
    groups = torch.tensor([0, 1, 0, 0, 1, 0])
    b = torch.tensor([2.0, 1.0], dtype=torch.float64)

    def bern_mean(logits):
        base = dist.Bernoulli(logits=logits).to_event(1)
        return plc.constrain(base, plc.GroupSum(groups, 2), b).mean

    logits = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bern_mean, (logits,))

    def binom_mean(logits):
        base = dist.Binomial(torch.tensor([2.0, 1, 3, 1, 2, 1]).double(), logits=logits).to_event(1)
        return plc.constrain(base, plc.GroupSum(groups, 2), b * 2).mean

    assert torch.autograd.gradcheck(binom_mean, (logits,))


def test_marginals_are_grad_of_log_normalizer_by_enumeration():
    # d/dl_i of log sum_{valid x} prod p(x_i) = E[x_i | sum] - sigmoid(l_i); check mean vs
    # the brute-force gradient, and that mean is connected to the logits' graph.
    raw = torch.randn(5, dtype=torch.float64, requires_grad=True)
    logits = 2 * raw
    d = plc.constrain(
        dist.Bernoulli(logits=logits).to_event(1), torch.ones(1, 5).double(), torch.ones(1).double()
    )
    xs = enumerate_valid([1] * 5, torch.ones(1, 5), torch.ones(1))
    logZ = dist.Bernoulli(logits=logits).to_event(1).log_prob(xs).logsumexp(0)
    (g,) = torch.autograd.grad(logZ, logits, retain_graph=True)
    torch.testing.assert_close(d.mean, g + torch.sigmoid(logits))
    assert d.mean.requires_grad
    (d.mean * torch.arange(5.0).double()).sum().backward()
    assert raw.grad is not None and bool(torch.isfinite(raw.grad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stability_large_n(dtype):
    n, k = 5000, 2500
    logits = (3 * torch.randn(n)).to(dtype)
    d = plc.constrain(
        dist.Bernoulli(logits=logits).to_event(1),
        plc.GroupSum(torch.zeros(n, dtype=torch.long), 1),
        torch.tensor([float(k)], dtype=dtype),
    )
    m = d.mean
    assert bool(torch.isfinite(m).all()) and bool(((m >= 0) & (m <= 1)).all())
    torch.testing.assert_close(m.sum().double(), torch.tensor(float(k)).double(), rtol=1e-5, atol=0)
    x = d.sample((2,))
    assert torch.equal(x.sum(-1), torch.full((2,), float(k), dtype=dtype))
    lp = d.log_prob(x)
    assert bool(torch.isfinite(lp).all())


def test_far_tail_total_is_finite():
    # P(sum = k) ~ 1e-1000 under the base: the log-space DP must not underflow.
    n, k = 2000, 1900
    d = plc.constrain(
        dist.Bernoulli(probs=torch.full((n,), 0.05)).to_event(1),
        torch.ones(1, n),
        torch.tensor([float(k)]),
    )
    x = d.sample()
    assert x.sum() == k
    # equal probabilities: the conditional is uniform over k-subsets
    expected = -(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1))
    torch.testing.assert_close(d.log_prob(x), torch.tensor(expected), rtol=1e-4, atol=0)
    torch.testing.assert_close(d.mean, torch.full((n,), k / n), rtol=1e-4, atol=0)


def test_shapes_expand_and_event_shape():
    probs = torch.rand(3, 2, 4) * 0.8 + 0.1  # batch (3,), event (2, 4)
    A = plc.GroupSum(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2)
    d = plc.constrain(dist.Bernoulli(probs=probs).to_event(2), A, torch.tensor([1.0, 3.0]))
    assert d.batch_shape == (3,) and d.event_shape == (2, 4)
    x = d.sample((5,))
    assert x.shape == (5, 3, 2, 4)
    assert torch.equal(x.sum(-1), torch.tensor([1.0, 3.0]).expand(5, 3, 2))
    assert d.log_prob(x).shape == (5, 3)
    assert d.mean.shape == d.variance.shape == (3, 2, 4)
    assert bool(d.support.check(x).all())
    assert d.support.is_discrete
    e = d.expand((6, 3))
    assert e.batch_shape == (6, 3) and e.sample((2,)).shape == (2, 6, 3, 2, 4)
    torch.testing.assert_close(e.log_prob(x[:1]), d.log_prob(x[:1]).expand(6, 3))
    torch.testing.assert_close(e.mean, d.mean.expand(6, 3, 2, 4))


def test_free_entries_are_sampled_from_base():
    A = torch.tensor([[1.0, 1.0, 0.0]])
    d = plc.constrain(
        dist.Binomial(torch.tensor([1.0, 1.0, 5.0]), probs=torch.tensor([0.5, 0.5, 0.3])).to_event(
            1
        ),
        A,
        torch.tensor([1.0]),
    )
    x = d.sample((4000,))
    assert torch.equal(x[:, :2].sum(-1), torch.ones(4000))
    assert abs(float(x[:, 2].mean()) - 1.5) < 4 * math.sqrt(5 * 0.21 / 4000)
    torch.testing.assert_close(d.mean[2], torch.tensor(1.5))
    torch.testing.assert_close(d.variance[2], torch.tensor(1.05))


def test_out_of_support_values():
    base = dist.Bernoulli(probs=torch.full((3,), 0.5)).to_event(1)
    d = plc.constrain(base, torch.ones(1, 3), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([1.0, 1.0, 0.0]))
    d._validate_args = False
    assert d.log_prob(torch.tensor([1.0, 1.0, 0.0])) == -math.inf
    assert d.log_prob(torch.tensor([2.0, -1.0, 0.0])) == -math.inf


@pytest.mark.parametrize(
    "b, match",
    [
        (torch.tensor([1.5, 1.0]), "integer"),
        (torch.tensor([-1.0, 1.0]), "non-negative"),
        (torch.tensor([4.0, 1.0]), "group 0 has 3 entries"),
        (torch.tensor([1.0]), "shape"),
    ],
)
def test_bad_totals_bernoulli(b, match):
    base = dist.Bernoulli(logits=torch.zeros(5)).to_event(1)
    with pytest.raises(ValueError, match=match):
        plc.constrain(base, plc.GroupSum(torch.tensor([0, 0, 0, 1, 1]), 2), b)


def test_bad_totals_binomial():
    base = dist.Binomial(torch.tensor([2.0, 3.0, 1.0]), logits=torch.zeros(3)).to_event(1)
    with pytest.raises(ValueError, match="total_count summing to 5"):
        plc.constrain(base, plc.GroupSum(torch.tensor([0, 0, 1]), 2), torch.tensor([6.0, 1.0]))
    d = plc.constrain(base, plc.GroupSum(torch.tensor([0, 0, 1]), 2), torch.tensor([5.0, 1.0]))
    assert torch.equal(d.sample(), torch.tensor([2.0, 3.0, 1.0]))


def test_bad_constraints_and_bases():
    base = dist.Bernoulli(logits=torch.zeros(4)).to_event(1)
    b = torch.tensor([2.0])
    with pytest.raises(NotImplementedError, match="Supported"):
        plc.constrain(base, torch.tensor([[1.0, -1.0, 0.0, 1.0]]), b)
    with pytest.raises(NotImplementedError, match="overlap"):
        plc.constrain(base, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]), b.repeat(2))
    with pytest.raises(ValueError, match="columns"):
        plc.constrain(base, torch.ones(1, 3), b)
    with pytest.raises(ValueError, match="to_event"):
        plc.constrain(dist.Bernoulli(logits=torch.zeros(4)), torch.ones(1, 4), b)
    with pytest.raises(ValueError, match="broadcast"):
        plc.constrain(
            dist.Bernoulli(logits=torch.zeros(3, 4)).to_event(1), torch.ones(1, 4), torch.ones(2, 1)
        )


def test_mean_jacobian_is_conditional_covariance_at_ties():
    # d E[x_i | sum] / d l_j = Cov(x_i, x_j | sum); zero logits make every DP step a tie.
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    b = torch.tensor([2.0, 1.0], dtype=torch.float64)

    def mean(logits):
        base = dist.Bernoulli(logits=logits).to_event(1)
        return plc.constrain(base, plc.GroupSum(groups, 2), b).mean

    for logits in [torch.zeros(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]:
        jac = torch.autograd.functional.jacobian(mean, logits)
        xs = enumerate_valid([1] * 7, plc.GroupSum(groups, 2).to_dense(), b)
        lp, m, _ = oracle(dist.Bernoulli(logits=logits).to_event(1), xs)
        centred = xs - m
        cov = (lp.exp()[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        torch.testing.assert_close(jac, cov)
