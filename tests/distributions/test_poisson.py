"""ConstrainedPoisson against brute-force enumeration, chi-square goodness of fit and gradcheck."""

import itertools
import math

import pyro.distributions as dist
import pytest
import scipy.stats
import torch

import pyro_linconstr as plc
from pyro_linconstr.distributions import ConstrainedPoisson


def compositions(k: int, parts: int) -> list[tuple[int, ...]]:
    """Every vector of ``parts`` non-negative integers summing to ``k``."""
    return [c for c in itertools.product(range(k + 1), repeat=parts) if sum(c) == k]


def enumerate_support(groups: list[int], totals: list[int], n: int) -> torch.Tensor:
    """All x (covered entries only) with the given group sums; ``groups[i] = -1`` -> 0."""
    per_group = []
    for g, k in enumerate(totals):
        idx = [i for i in range(n) if groups[i] == g]
        per_group.append([(idx, c) for c in compositions(k, len(idx))])
    rows = []
    for combo in itertools.product(*per_group):
        x = [0] * n
        for idx, c in combo:
            for i, v in zip(idx, c):
                x[i] = v
        rows.append(x)
    return torch.tensor(rows, dtype=torch.float64)


def test_log_prob_mean_variance_match_enumeration():
    rate = torch.tensor([0.3, 1.7, 2.0, 0.5, 4.0, 1.1], dtype=torch.float64)
    groups = [0, 1, 0, 1, 1, 0]
    totals = [3, 4]
    A = plc.GroupSum(torch.tensor(groups), 2)
    d = plc.constrain(dist.Poisson(rate).to_event(1), A, torch.tensor(totals).double())
    assert isinstance(d, ConstrainedPoisson)
    xs = enumerate_support(groups, totals, 6)
    base_lp = dist.Poisson(rate).to_event(1).log_prob(xs)
    oracle = base_lp - base_lp.logsumexp(0)
    torch.testing.assert_close(d.log_prob(xs), oracle)
    w = oracle.exp().unsqueeze(-1)
    mean = (w * xs).sum(0)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, (w * xs**2).sum(0) - mean**2)


def test_dense_A_with_uncovered_entry_matches_enumeration():
    rate = torch.tensor([0.5, 1.5, 2.5, 0.7], dtype=torch.float64)
    # entry 2 is in no row: it keeps its Poisson law, independent of the rest.
    A = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([3.0, 2.0], dtype=torch.float64)
    d = plc.constrain(dist.Poisson(rate).to_event(1), A, b)
    cov = enumerate_support([0, 1, -1, 0], [3, 2], 4)
    cov_lp = dist.Poisson(rate).to_event(1).log_prob(cov)
    cov_lp = cov_lp - cov_lp.logsumexp(0)
    for free in range(4):
        x = cov.clone()
        x[:, 2] = free
        oracle = cov_lp + dist.Poisson(rate[2]).log_prob(torch.tensor(float(free)).double())
        torch.testing.assert_close(d.log_prob(x), oracle)
    w = cov_lp.exp().unsqueeze(-1)
    expected_mean = (w * cov).sum(0)
    expected_mean[2] = rate[2]
    torch.testing.assert_close(d.mean, expected_mean)
    assert d.variance[2] == rate[2]


def test_mean_closed_form_and_batched_totals():
    rate = torch.rand(3, 8, dtype=torch.float64) + 0.1
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    b = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0], [7.0, 0.0, 2.0]], dtype=torch.float64)
    d = plc.constrain(dist.Poisson(rate).to_event(1), plc.GroupSum(groups, 3), b)
    lam = torch.zeros(3, 3, dtype=torch.float64).index_add(-1, groups, rate)
    expected = b[:, groups] * rate / lam[:, groups]
    torch.testing.assert_close(d.mean, expected)
    x = d.sample((50,))
    assert x.shape == (50, 3, 8)
    sums = torch.zeros(50, 3, 3, dtype=torch.float64).index_add(-1, groups, x)
    assert torch.equal(sums, b.expand(50, 3, 3))


@pytest.mark.parametrize("k", [3, 5])
def test_sampling_chi_square(k):
    # group sizes 3 and 5 (not powers of two) exercise the padded splitting tree;
    # two batch elements with different totals exercise batched totals.
    rate = torch.tensor([[0.2, 1.0, 3.0, 0.5, 0.5, 1.0, 2.0, 0.1]]).expand(2, 8)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    b = torch.tensor([[k, 2.0], [1.0, k]])
    d = plc.constrain(dist.Poisson(rate).to_event(1), plc.GroupSum(groups, 2), b)
    num = 20000
    x = d.sample((num,))
    for batch in range(2):
        for g in range(2):
            idx = (groups == g).nonzero().squeeze(-1)
            total = int(b[batch, g])
            configs = compositions(total, idx.numel())
            p = rate[batch, idx].double() / rate[batch, idx].double().sum()
            probs = torch.stack(
                [
                    torch.distributions.Multinomial(total, p).log_prob(torch.tensor(c).double())
                    for c in configs
                ]
            ).exp()
            lookup = {c: j for j, c in enumerate(configs)}
            observed = torch.zeros(len(configs))
            for row in x[:, batch, idx].long().tolist():
                observed[lookup[tuple(row)]] += 1
            expected = probs * num
            keep = expected >= 5  # pool rare cells (chi-square validity)
            obs = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
            exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
            obs, exp = obs[exp > 0], exp[exp > 0]
            exp = exp * obs.sum() / exp.sum()
            pvalue = scipy.stats.chisquare(obs.numpy(), exp.numpy()).pvalue
            assert pvalue > 1e-3, (batch, g, pvalue)


def test_large_totals_and_n():
    n = 10_000
    rate = torch.rand(n) + 0.01
    d = plc.constrain(dist.Poisson(rate).to_event(1), torch.ones(1, n), torch.tensor([1e6]))
    x = d.sample((2,))
    assert torch.equal(x.sum(-1), torch.tensor([1e6, 1e6]))
    assert bool(torch.isfinite(d.log_prob(x)).all())
    # the sample mean over entries tracks the conditional mean
    rel = (x.mean(0) - d.mean).abs() / d.mean.sqrt()
    assert float(rel.mean()) < 1.5


def test_mean_gradcheck():
    groups = torch.tensor([0, 1, 0, 1, 0])
    b = torch.tensor([4.0, 2.0], dtype=torch.float64)

    def mean(rate):
        d = plc.constrain(dist.Poisson(rate).to_event(1), plc.GroupSum(groups, 2), b)
        return d.mean

    rate = (torch.rand(5, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(mean, (rate,))

    def log_prob(rate):
        d = plc.constrain(dist.Poisson(rate).to_event(1), plc.GroupSum(groups, 2), b)
        return d.log_prob(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0], dtype=torch.float64))

    assert torch.autograd.gradcheck(log_prob, (rate,))


def test_shapes_expand_and_event_shape():
    rate = torch.rand(4, 2, 3) + 0.1  # batch (4,), event (2, 3)
    base = dist.Poisson(rate).to_event(2)
    A = plc.GroupSum(torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    d = plc.constrain(base, A, torch.tensor([2.0, 5.0]))
    assert d.batch_shape == (4,) and d.event_shape == (2, 3)
    x = d.sample((7,))
    assert x.shape == (7, 4, 2, 3)
    assert torch.equal(x[..., 0, :].sum(-1), torch.full((7, 4), 2.0))
    assert d.log_prob(x).shape == (7, 4)
    assert d.mean.shape == d.variance.shape == (4, 2, 3)
    assert bool(d.support.check(x).all())
    assert d.support.is_discrete and d.support.event_dim == 2
    e = d.expand((5, 4))
    assert e.batch_shape == (5, 4) and e.sample((2,)).shape == (2, 5, 4, 2, 3)
    torch.testing.assert_close(e.log_prob(x[:1]), d.log_prob(x[:1]).expand(5, 4))
    torch.testing.assert_close(e.mean, d.mean.expand(5, 4, 2, 3))


def test_batched_identical_dense_A_and_zero_rate_entries():
    A = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).expand(3, 2, 3)
    rate = torch.tensor([0.0, 2.0, 1.0])
    d = plc.constrain(dist.Poisson(rate).to_event(1), A, torch.tensor([4.0, 1.0]))
    assert d.batch_shape == (3,)
    x = d.sample((10,))
    assert bool((x[..., 0] == 0).all()) and bool((x[..., 1] == 4).all())
    torch.testing.assert_close(d.log_prob(x), torch.zeros(10, 3))


def test_out_of_support_values():
    d = plc.constrain(
        dist.Poisson(torch.ones(3)).to_event(1), torch.ones(1, 3), torch.tensor([2.0])
    )
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.5, 1.5, 0.0]))
    d = plc.constrain(
        dist.Poisson(torch.ones(3), validate_args=False).to_event(1),
        torch.ones(1, 3),
        torch.tensor([2.0]),
    )
    d._validate_args = False
    assert d.log_prob(torch.tensor([1.0, 1.0, 1.0])) == -math.inf


@pytest.mark.parametrize(
    "b, match",
    [
        (torch.tensor([2.5, 1.0]), "integer"),
        (torch.tensor([-1.0, 1.0]), "non-negative"),
        (torch.tensor([1.0, 1.0, 1.0]), "shape"),
        (torch.tensor([1.0, 3.0]), "total rate 0"),
    ],
)
def test_bad_totals(b, match):
    rate = torch.tensor([1.0, 2.0, 0.0, 0.0])
    A = plc.GroupSum(torch.tensor([0, 0, 1, 1]), 2)
    with pytest.raises(ValueError, match=match):
        plc.constrain(dist.Poisson(rate).to_event(1), A, b)


def test_bad_constraints_and_bases():
    base = dist.Poisson(torch.ones(4)).to_event(1)
    b = torch.tensor([2.0])
    with pytest.raises(NotImplementedError, match="disjoint 0/1"):
        plc.constrain(base, torch.tensor([[1.0, 2.0, 0.0, 1.0]]), b)
    with pytest.raises(NotImplementedError, match="overlap"):
        plc.constrain(base, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]), b.repeat(2))
    with pytest.raises(NotImplementedError, match="batch"):
        A = torch.stack([torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1, 1, 0]])])
        plc.constrain(base, A, b)
    with pytest.raises(ValueError, match="columns"):
        plc.constrain(base, torch.ones(1, 5), b)
    with pytest.raises(ValueError, match="group 1"):  # empty group, positive total
        plc.constrain(base, plc.GroupSum(torch.zeros(4, dtype=torch.long), 2), torch.ones(2))
    with pytest.raises(ValueError, match="to_event"):
        plc.constrain(dist.Poisson(torch.ones(4)), torch.ones(1, 4), b)
    with pytest.raises(ValueError, match="broadcast"):
        plc.constrain(
            dist.Poisson(torch.ones(3, 4)).to_event(1), torch.ones(1, 4), torch.ones(2, 1)
        )
