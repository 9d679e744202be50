"""ConstrainedBernoulli (Bernoulli and Binomial bases) against brute-force enumeration."""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.special
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


# ------------------------------------------------------------------ reliability
def _bases(probs: torch.Tensor):
    """A Bernoulli base and a Binomial(3) base with the given probabilities."""
    return [
        dist.Bernoulli(probs=probs).to_event(1),
        dist.Binomial(torch.full_like(probs, 3.0), probs=probs).to_event(1),
    ]


@pytest.mark.parametrize("family", [0, 1])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("empty_base", [True, False])
def test_empty_batch(family, dense, empty_base):
    groups = torch.tensor([0, 0, 1, 1])
    A = plc.GroupSum(groups, 2).to_dense() if dense else plc.GroupSum(groups, 2)
    probs = torch.full((0, 4) if empty_base else (4,), 0.3)
    d = plc.constrain(_bases(probs)[family], A, torch.ones(0, 2))
    assert d.batch_shape == (0,) and d.event_shape == (4,)
    assert d.sample().shape == (0, 4) and d.sample((3,)).shape == (3, 0, 4)
    assert d.log_prob(torch.ones(0, 4)).shape == (0,)
    assert d.log_prob(torch.ones(3, 0, 4)).shape == (3, 0)
    assert d.mean.shape == d.variance.shape == (0, 4)
    assert d.support.check(torch.ones(0, 4)).shape == (0,)
    assert d.marginal_pmf().shape[:2] == (0, 4)
    assert d.expand((2, 0)).sample().shape == (2, 0, 4)


@pytest.mark.parametrize("family", [0, 1])
@pytest.mark.parametrize("b_shape", [(0,), (3, 0)])
def test_zero_constraint_rows_is_the_base_law(family, b_shape):
    probs = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    base = _bases(probs)[family]
    d = plc.constrain(base, torch.zeros(0, 3, dtype=torch.float64), torch.zeros(b_shape))
    batch = b_shape[:-1]
    assert d.batch_shape == batch
    x = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    xb = x.reshape((2,) + (1,) * len(batch) + (3,))
    torch.testing.assert_close(d.log_prob(xb), base.log_prob(xb).expand((2,) + batch))
    N = 1.0 if family == 0 else 3.0
    torch.testing.assert_close(d.mean, (N * probs).expand(batch + (3,)))
    torch.testing.assert_close(d.variance, (N * probs * (1 - probs)).expand(batch + (3,)))
    samples = d.sample((4000,))
    assert samples.shape == (4000,) + batch + (3,)
    se = (N * probs * (1 - probs) / 4000).sqrt()
    assert bool(((samples.mean(0) - N * probs).abs() < 5 * se).all())


def _convolve_all(pmfs):
    """The pmf of a sum of independent counts with the given pmfs (float64)."""
    out = np.array([1.0])
    for p in pmfs:
        out = np.convolve(out, p)
    return out


def test_binomial_large_total_count_float32_against_scipy():
    # torch's float32 Binomial log-pmf loses about eps N log N to cancellation (1e-4 here)
    counts = [300, 200, 150, 100]
    N = torch.tensor(counts, dtype=torch.float32)
    logits = torch.tensor([0.3, -0.2, 1.0, -1.5])
    p = scipy.special.expit(logits.double().numpy())
    pmfs = [scipy.stats.binom.pmf(np.arange(c + 1), c, q) for c, q in zip(counts, p)]
    total = _convolve_all(pmfs)
    rest = _convolve_all(pmfs[1:])  # for E[x_0 | sum]
    eps, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    for k in [350, 600]:
        base = dist.Binomial(N, logits=logits).to_event(1)
        d = plc.constrain(base, torch.ones(1, 4), torch.tensor([float(k)]))
        x = d.sample((3,))
        assert torch.equal(x.sum(-1), torch.full((3,), float(k)))
        lp = d.log_prob(x)
        for j in range(3):
            xs = x[j].double().numpy()
            num = sum(scipy.stats.binom.logpmf(xs[i], counts[i], p[i]) for i in range(4))
            exact = num - np.log(total[k])
            # the documented bound
            tol = 2 * eps * (abs(exact) + 4 * math.log(1 + 300))
            tol += 4 * eps64 * sum(c * math.log(1 + c) for c in counts)
            assert abs(float(lp[j]) - exact) <= tol, (k, float(lp[j]), exact, tol)
        x0 = np.arange(counts[0] + 1)
        ok = (k - x0 >= 0) & (k - x0 < len(rest))
        w = pmfs[0][ok] * rest[(k - x0)[ok]]
        mean0 = float((x0[ok] * w).sum() / w.sum())
        assert abs(float(d.mean[0]) - mean0) <= 16 * eps * 300


def _log_poisson_binomial_at(p: np.ndarray, k: int) -> tuple[float, float]:
    """``log P(sum = k)`` of independent Bernoulli(p_i), and ``E[x_0 | sum = k]``, in float64.

    A convolution in the probability domain of tilted probabilities ``q_i = p_i e^t /
    (1 - p_i + p_i e^t)``, with ``t`` (on a grid of 2^-10, so that ``t k`` is exact) making
    ``k`` typical: ``P(sum = k) = P_q(sum = k) prod_i (1 - p_i + p_i e^t) e^(-t k)``, and
    nothing underflows however far ``k`` lies in the tail of ``p``.
    """
    n = len(p)
    logits = np.log(p) - np.log1p(-p)

    def logit_frac(a):
        return math.log((a + 0.5) / (n + 0.5 - a))

    t = round((logit_frac(k) - logit_frac(p.sum())) * 1024) / 1024
    q = 1 / (1 + np.exp(-(logits + t)))
    rest = _convolve_all([np.array([1 - qi, qi]) for qi in q[1:]])
    total = np.convolve(rest, [1 - q[0], q[0]])
    terms = list(np.log1p(-p) + np.logaddexp(0, logits + t)) + [math.log(total[k]), -t * k]
    return math.fsum(terms), float(q[0] * rest[k - 1] / total[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_far_tail_against_convolution(dtype):
    # a batch of three totals: typical, 20 and 35 standard deviations into the tail
    # (P(sum = k) ~ 1e-330); the DP runs in the base's dtype (more than SMALL_DP_STEP cells)
    n = 800
    g = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    p = scipy.special.expit(logits.double().numpy())
    sd = math.sqrt((p * (1 - p)).sum())
    ks = [int(p.sum() + s * sd) for s in (0, 20, 35)]
    oracles = [_log_poisson_binomial_at(p, k) for k in ks]
    assert oracles[-1][0] < -700
    b = torch.tensor([[float(k)] for k in ks], dtype=dtype)
    d = plc.constrain(dist.Bernoulli(logits=logits).to_event(1), torch.ones(1, n, dtype=dtype), b)
    assert d._dp_dtype == dtype
    x = d.sample((2,))
    assert torch.equal(x.sum(-1), b.squeeze(-1).expand(2, 3))
    lp = d.log_prob(x)
    eps = torch.finfo(dtype).eps
    for i, (log_total, mean0) in enumerate(oracles):
        for j in range(2):
            xs = x[j, i].double().numpy()
            exact = math.fsum(xs * np.log(p) + (1 - xs) * np.log1p(-p)) - log_total
            tol = 2 * eps * (abs(exact) + n * math.log(2))  # the documented bound
            assert abs(float(lp[j, i]) - exact) <= tol, (ks[i], float(lp[j, i]), exact, tol)
        assert abs(float(d.mean[i, 0]) - mean0) <= 16 * eps


@pytest.mark.parametrize("family", [0, 1])
@pytest.mark.parametrize(
    "base_dtype, b, A_dtype",
    [
        (torch.float64, torch.tensor([2.0, 1.0]), torch.float32),  # float64 base, float32 b
        (torch.float32, torch.tensor([2.0, 1.0], dtype=torch.float64), torch.float64),
        (torch.float32, torch.tensor([2, 1]), torch.float32),  # integer totals
        (torch.float32, torch.tensor([2.0, 1.0]), torch.float16),  # half-precision A
    ],
)
def test_mixed_dtypes_follow_the_base(family, base_dtype, b, A_dtype):
    probs = torch.tensor([0.3, 0.6, 0.5, 0.8, 0.1])
    groups = torch.tensor([0, 1, 0, 0, 1])
    A = plc.GroupSum(groups, 2).to_dense()
    d = plc.constrain(_bases(probs.to(base_dtype))[family], A.to(A_dtype), b)
    x = d.sample((4,))
    assert x.dtype == d.mean.dtype == d.variance.dtype == d.log_prob(x).dtype == base_dtype
    assert d.marginal_pmf().dtype == base_dtype
    # the float64 oracle: brute-force enumeration
    base64 = _bases(probs.double())[family]
    xs = enumerate_valid([1 if family == 0 else 3] * 5, A, b.double())
    lp, mean, var = oracle(base64, xs)
    tol = dict(rtol=0, atol=16 * torch.finfo(base_dtype).eps)
    torch.testing.assert_close(d.log_prob(xs.to(base_dtype)).double(), lp, **tol)
    torch.testing.assert_close(d.mean.double(), mean, **tol)
    torch.testing.assert_close(d.variance.double(), var, **tol)


def test_validate_args_without_global_validation(monkeypatch):
    pyro.enable_validation(False)
    try:
        A = plc.GroupSum(torch.tensor([0, 0, 1, 1]), 2)
        b = torch.tensor([1.0, 2.0])
        nan_logits = torch.tensor([0.0, float("nan"), 0.0, 0.0])
        bad_count = [torch.tensor([1.0, 2.0, -1.0, 3.0]), torch.tensor([1.0, 2.5, 1.0, 3.0])]
        cases = [(dist.Bernoulli(logits=nan_logits).to_event(1), "logits")]
        cases += [
            (dist.Binomial(c, logits=torch.zeros(4)).to_event(1), "total_count") for c in bad_count
        ]
        for base, name in cases:
            with pytest.raises(ValueError, match=name):
                ConstrainedBernoulli(base, A, b, validate_args=True)
        ConstrainedBernoulli(cases[0][0], A, b)  # global validation off: not checked
        base = dist.Binomial(torch.full((3, 2, 2), 2.0), logits=torch.zeros(3, 2, 2)).to_event(2)
        d = ConstrainedBernoulli(base, A, b, validate_args=True)
        with pytest.raises(ValueError):
            d.log_prob(torch.ones(2, 2))  # sums (2, 2): off the support
        assert bool(
            (ConstrainedBernoulli(base, A, b).log_prob(torch.ones(2, 2)) == -math.inf).all()
        )
        # torch's own check of arg_constraints runs, on the flattened parameters
        seen = {}

        class Spy(torch.distributions.constraints.Constraint):
            def __init__(self, name, inner):
                self.name, self.inner = name, inner
                super().__init__()

            def check(self, value):
                seen[self.name] = value.shape
                return self.inner.check(value)

        spies = {k: Spy(k, c) for k, c in ConstrainedBernoulli.arg_constraints.items()}
        monkeypatch.setattr(ConstrainedBernoulli, "arg_constraints", spies)
        ConstrainedBernoulli(base, A, b, validate_args=True)
        assert seen == {"logits": (3, 4), "total_count": (3, 4), "b": (3, 2)}
        seen.clear()
        ConstrainedBernoulli(base, A, b)
        assert seen == {}
    finally:
        pyro.enable_validation(True)


@pytest.mark.parametrize("family", [0, 1])
@pytest.mark.parametrize("dense", [False, True])
def test_pickle_and_deepcopy_in_every_state(family, dense):
    import copy
    import pickle

    A = plc.GroupSum(torch.tensor([0, 1, 0, 1]), 2)
    A = A.to_dense() if dense else A
    probs = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.5, 0.5, 0.5, 0.5]])
    d = plc.constrain(_bases(probs)[family], A, torch.tensor([1.0, 1.0]))
    x = torch.tensor([1.0, 0.0, 0.0, 1.0])
    states = [("fresh", copy.copy(d))]
    d.sample((2,))
    states.append(("sampled", d))
    d.mean, d.variance, d.log_prob(x)
    states.append(("moments", d))
    states.append(("expanded", d.expand((3, 2))))
    for state, e in states:
        for f in (lambda t: pickle.loads(pickle.dumps(t)), copy.deepcopy):
            c = f(e)
            assert type(c) is ConstrainedBernoulli and c.batch_shape == e.batch_shape, state
            torch.testing.assert_close(c.mean, e.mean)
            torch.testing.assert_close(c.variance, e.variance)
            torch.testing.assert_close(c.log_prob(x), e.log_prob(x))
            assert c.sample().shape == e.sample().shape


@pytest.mark.parametrize("family", [0, 1])
def test_masked_base_log_prob_is_masked(family):
    probs = torch.tensor([[0.2, 0.5, 0.7], [0.9, 0.1, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    A, b = torch.ones(1, 3, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    d = plc.constrain(_bases(probs)[family].mask(mask), A, b)
    full = plc.constrain(_bases(probs)[family], A, b)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64).unsqueeze(1)
    lp = d.log_prob(x)
    assert lp.shape == (2, 3)
    torch.testing.assert_close(lp, full.log_prob(x) * mask)
    counts = [1 if family == 0 else 3] * 3
    xs = enumerate_valid(counts, A, b)
    for i in (0, 2):  # the oracle for the unmasked rows
        ref, _, _ = oracle(_bases(probs[i])[family], xs)
        for j in range(2):
            row = (xs == x[j, 0]).all(-1).nonzero().item()
            torch.testing.assert_close(lp[j, i], ref[row])
    torch.testing.assert_close(d.mean, full.mean)
    assert d.sample((5,)).shape == (5, 3, 3)


def test_bad_values_and_parameters():
    base = dist.Binomial(torch.full((2, 3), 2.0), probs=torch.full((2, 3), 0.5)).to_event(1)
    d = plc.constrain(base, torch.ones(1, 3), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="value must have shape"):
        d.log_prob(torch.ones(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        d.log_prob(torch.ones(5, 3))
    d._validate_args = False  # shape checks hold without validation too; bad values: -inf
    with pytest.raises(ValueError, match="value must have shape"):
        d.log_prob(torch.ones(3, 1))
    bad = torch.tensor([[float("nan"), 1.0, 1.0], [3.0, -1.0, 0.0], [0.5, 1.5, 0.0]])
    assert bool((d.log_prob(bad.unsqueeze(1)) == -math.inf).all())
    with pytest.raises(ValueError, match="logits"):
        plc.constrain(
            dist.Bernoulli(
                logits=torch.tensor([0.0, float("inf"), 0.0]), validate_args=False
            ).to_event(1),
            torch.ones(1, 3),
            torch.tensor([1.0]),
        )
    with pytest.raises(ValueError, match="total_count"):
        plc.constrain(
            dist.Binomial(
                torch.tensor([1.0, -2.0, 1.0]), logits=torch.zeros(3), validate_args=False
            ).to_event(1),
            torch.ones(1, 3),
            torch.tensor([1.0]),
        )


def test_structured_operator_reads_as_its_dense_matrix():
    # AxisSums over one axis is a disjoint group sum: the enumeration oracle of its dense A
    logits = torch.tensor([[0.3, -1.0, 2.0], [0.0, 1.5, -0.5]], dtype=torch.float64)
    A = plc.AxisSums((2, 3), axes=1)
    b = torch.tensor([2.0, 1.0], dtype=torch.float64)
    d = plc.constrain(dist.Bernoulli(logits=logits).to_event(2), A, b)
    xs = enumerate_valid([1] * 6, A.to_dense().double(), b)
    lp, mean, var = oracle(dist.Bernoulli(logits=logits.reshape(6)).to_event(1), xs)
    torch.testing.assert_close(d.log_prob(xs.reshape(-1, 2, 3)), lp)
    torch.testing.assert_close(d.mean.reshape(6), mean)
    torch.testing.assert_close(d.variance.reshape(6), var)
