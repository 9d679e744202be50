"""ConstrainedPoisson against brute-force enumeration, chi-square goodness of fit and gradcheck."""

import itertools
import math

import pyro
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


# ------------------------------------------------------------------ reliability
def _multinomial_oracle(x, rate, groups, totals) -> float:
    """Exact log p(x | group sums) by scipy.stats.multinomial in float64 (one call per group)."""
    out = 0.0
    for g, k in enumerate(totals):
        idx = [i for i in range(len(groups)) if groups[i] == g]
        p = rate[idx].double() / rate[idx].double().sum()
        out += scipy.stats.multinomial.logpmf(x[idx].double().numpy(), int(k), p.numpy())
    return float(out)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("empty_base", [True, False])
def test_empty_batch(dense, empty_base):
    groups = torch.tensor([0, 0, 1, 1])
    A = plc.GroupSum(groups, 2).to_dense() if dense else plc.GroupSum(groups, 2)
    rate = torch.ones(0, 4) if empty_base else torch.ones(4)
    d = plc.constrain(dist.Poisson(rate).to_event(1), A, torch.ones(0, 2))
    assert d.batch_shape == (0,) and d.event_shape == (4,)
    assert d.sample().shape == (0, 4) and d.sample((3,)).shape == (3, 0, 4)
    assert d.log_prob(torch.ones(0, 4)).shape == (0,)
    assert d.log_prob(torch.ones(3, 0, 4)).shape == (3, 0)
    assert d.mean.shape == d.variance.shape == (0, 4)
    assert d.support.check(torch.ones(0, 4)).shape == (0,)
    assert d.expand((2, 0)).sample().shape == (2, 0, 4)


@pytest.mark.parametrize("b_shape", [(0,), (3, 0)])
def test_zero_constraint_rows_is_the_base_law(b_shape):
    rate = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    base = dist.Poisson(rate).to_event(1)
    d = plc.constrain(base, torch.zeros(0, 3, dtype=torch.float64), torch.zeros(b_shape))
    batch = b_shape[:-1]
    assert d.batch_shape == batch
    x = torch.tensor([[0.0, 1.0, 7.0], [2.0, 0.0, 3.0]], dtype=torch.float64)
    xb = x.reshape((2,) + (1,) * len(batch) + (3,))
    torch.testing.assert_close(d.log_prob(xb), base.log_prob(xb).expand((2,) + batch))
    torch.testing.assert_close(d.mean, rate.expand(batch + (3,)))
    torch.testing.assert_close(d.variance, rate.expand(batch + (3,)))
    samples = d.sample((4000,))
    assert samples.shape == (4000,) + batch + (3,)
    se = (rate / 4000).sqrt()
    assert bool(((samples.mean(0) - rate).abs() < 5 * se).all())


def test_log_prob_float32_large_totals_against_mpmath_and_scipy():
    mpmath = pytest.importorskip("mpmath")
    rate = torch.tensor([0.3, 1.7, 2.0, 0.5, 4.0, 1.1])
    groups = [0, 0, 0, 1, 1, 1]
    A = plc.GroupSum(torch.tensor(groups), 2)
    for k in [1e7, 2.0**24]:  # 2^24: the largest total exact in float32
        b = torch.tensor([k, 1000.0])
        d = plc.constrain(dist.Poisson(rate).to_event(1), A, b)
        x = d.sample((3,))
        assert torch.equal(A.matvec(x.double()), b.double().expand(3, 2))
        lp = d.log_prob(x)
        assert lp.dtype == torch.float32
        for j in range(3):
            exact = mpmath.mpf(0)
            for g, total in enumerate(b.tolist()):
                idx = [i for i in range(6) if groups[i] == g]
                lam = sum(mpmath.mpf(float(rate[i])) for i in idx)
                exact += mpmath.loggamma(mpmath.mpf(total) + 1)
                for i in idx:
                    xi = mpmath.mpf(float(x[j, i]))
                    exact += xi * mpmath.log(mpmath.mpf(float(rate[i])) / lam)
                    exact -= mpmath.loggamma(xi + 1)
            exact = float(exact)
            # the documented float32 bound: eps * |log p| + 1e-6
            tol = torch.finfo(torch.float32).eps * abs(exact) + 1e-6
            assert abs(float(lp[j]) - exact) <= tol, (k, float(lp[j]), exact)
            assert abs(_multinomial_oracle(x[j], rate, groups, b.tolist()) - exact) <= tol
    with pytest.raises(ValueError, match="2\\^24"):
        plc.constrain(
            dist.Poisson(rate).to_event(1), A, torch.tensor([2.0**24 + 1, 0.0], dtype=torch.float64)
        )


def test_log_prob_float64_huge_totals_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rate = torch.tensor([0.3, 1.7, 2.0, 0.5, 4.0], dtype=torch.float64)
    groups = [0, 0, 0, 1, 1]
    A = plc.GroupSum(torch.tensor(groups), 2)
    eps = torch.finfo(torch.float64).eps
    for k in [1e12, 2.0**52]:
        b = torch.tensor([k, 3.0], dtype=torch.float64)
        d = plc.constrain(dist.Poisson(rate).to_event(1), A, b)
        x = d.sample((2,))
        # a value far from the mean too (deviance large): x_0 = k, the rest 0
        x = torch.cat([x, torch.tensor([[k, 0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)])
        assert torch.equal(A.matvec(x), b.expand(3, 2))
        lp = d.log_prob(x)
        mu = d.mean
        for j in range(3):
            exact = mpmath.mpf(0)
            for g, total in enumerate(b.tolist()):
                idx = [i for i in range(5) if groups[i] == g]
                lam = sum(mpmath.mpf(float(rate[i])) for i in idx)
                exact += mpmath.loggamma(mpmath.mpf(total) + 1)
                for i in idx:
                    xi = mpmath.mpf(float(x[j, i]))
                    exact += xi * mpmath.log(mpmath.mpf(float(rate[i])) / lam)
                    exact -= mpmath.loggamma(xi + 1)
            exact = float(exact)
            # the documented float64 bound: 8 eps (|log p| + sum |x - mu| + 20 n)
            tol = 8 * eps * (abs(exact) + float((x[j] - mu).abs().sum()) + 20 * 5)
            assert abs(float(lp[j]) - exact) <= tol, (k, float(lp[j]), exact, tol)


@pytest.mark.parametrize(
    "base_dtype, b, A_dtype",
    [
        (torch.float64, torch.tensor([3.0, 4.0]), torch.float32),  # float64 base, float32 b
        (torch.float32, torch.tensor([3.0, 4.0], dtype=torch.float64), torch.float64),
        (torch.float32, torch.tensor([3, 4]), torch.float32),  # integer totals
        (torch.float32, torch.tensor([3.0, 4.0]), torch.float16),  # half-precision A
    ],
)
def test_mixed_dtypes_follow_the_base(base_dtype, b, A_dtype):
    rate = torch.tensor([0.3, 1.7, 2.0, 0.5, 4.0, 1.1])
    groups = [0, 1, 0, 1, 1, 0]
    A = plc.GroupSum(torch.tensor(groups), 2).to_dense().to(A_dtype)
    d = plc.constrain(dist.Poisson(rate.to(base_dtype)).to_event(1), A, b)
    x = d.sample((4,))
    assert x.dtype == d.mean.dtype == d.variance.dtype == d.log_prob(x).dtype == base_dtype
    # float64 oracle: mean k_g p_i, variance k_g p_i (1 - p_i), scipy's multinomial
    r = rate.double()
    lam = torch.zeros(2, dtype=torch.float64).index_add(0, torch.tensor(groups), r)
    p = r / lam[groups]
    k = b.double()[groups]
    tol = dict(rtol=4 * torch.finfo(base_dtype).eps, atol=0)
    torch.testing.assert_close(d.mean.double(), k * p, **tol)
    torch.testing.assert_close(d.variance.double(), k * p * (1 - p), **tol)
    lp = d.log_prob(x)
    for j in range(4):
        oracle = _multinomial_oracle(x[j], rate, groups, b.tolist())
        assert abs(float(lp[j]) - oracle) <= 4 * torch.finfo(base_dtype).eps * (abs(oracle) + 1)


def test_validate_args_without_global_validation(monkeypatch):
    pyro.enable_validation(False)
    try:
        A = plc.GroupSum(torch.tensor([0, 0, 1, 1]), 2)
        b = torch.tensor([2.0, 3.0])
        for bad in [torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.tensor([1.0, -0.5, 1, 1])]:
            with pytest.raises(ValueError, match="rate"):
                ConstrainedPoisson(dist.Poisson(bad).to_event(1), A, b, validate_args=True)
            ConstrainedPoisson(dist.Poisson(bad).to_event(1), A, b)  # global off: not checked
        base = dist.Poisson(torch.rand(3, 2, 2) + 0.1).to_event(2)
        d = ConstrainedPoisson(base, A, b, validate_args=True)
        with pytest.raises(ValueError):
            d.log_prob(torch.ones(2, 2))  # sums (2, 2): off the support
        off = ConstrainedPoisson(base, A, b)
        assert bool((off.log_prob(torch.ones(2, 2)) == -math.inf).all())
        # torch's own check of arg_constraints runs, on the flattened parameters
        seen = {}

        class Spy(torch.distributions.constraints.Constraint):
            def __init__(self, name, inner):
                self.name, self.inner = name, inner
                super().__init__()

            def check(self, value):
                seen[self.name] = value.shape
                return self.inner.check(value)

        spies = {k: Spy(k, c) for k, c in ConstrainedPoisson.arg_constraints.items()}
        monkeypatch.setattr(ConstrainedPoisson, "arg_constraints", spies)
        ConstrainedPoisson(base, A, b, validate_args=True)
        assert seen == {"rate": (3, 4), "b": (3, 2)}
        seen.clear()
        ConstrainedPoisson(base, A, b)
        assert seen == {}
    finally:
        pyro.enable_validation(True)


def _states(d, x):
    """``d`` fresh, after sample, after mean/variance/log_prob, and expanded."""
    import copy

    yield "fresh", copy.copy(d)
    d.sample((2,))
    yield "sampled", d
    d.mean, d.variance, d.log_prob(x)
    yield "moments", d
    yield "expanded", d.expand((2,) + d.batch_shape)


@pytest.mark.parametrize("dense", [False, True])
def test_pickle_and_deepcopy_in_every_state(dense):
    import copy
    import pickle

    A = plc.GroupSum(torch.tensor([0, 1, 0, 1]), 2)
    A = A.to_dense() if dense else A
    rate = torch.tensor([[0.5, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    d = plc.constrain(dist.Poisson(rate).to_event(1), A, torch.tensor([2.0, 3.0]))
    x = torch.tensor([1.0, 0.0, 1.0, 3.0])
    for state, e in _states(d, x):
        for f in (lambda t: pickle.loads(pickle.dumps(t)), copy.deepcopy):
            c = f(e)
            assert type(c) is ConstrainedPoisson and c.batch_shape == e.batch_shape, state
            torch.testing.assert_close(c.mean, e.mean)
            torch.testing.assert_close(c.variance, e.variance)
            torch.testing.assert_close(c.log_prob(x), e.log_prob(x))
            assert c.sample().shape == e.sample().shape


def test_masked_base_log_prob_is_masked():
    rate = torch.tensor([[0.5, 1.0, 2.0], [1.0, 3.0, 0.2], [2.0, 2.0, 2.0]])
    mask = torch.tensor([True, False, True])
    A, b = torch.ones(1, 3), torch.tensor([4.0])
    d = plc.constrain(dist.Poisson(rate).to_event(1).mask(mask), A, b)
    full = plc.constrain(dist.Poisson(rate).to_event(1), A, b)
    x = torch.tensor([[1.0, 1.0, 2.0], [0.0, 4.0, 0.0]]).unsqueeze(1)
    lp = d.log_prob(x)
    assert lp.shape == (2, 3)
    torch.testing.assert_close(lp, full.log_prob(x) * mask)
    # the oracle for the unmasked entries
    for j in range(2):
        for i in (0, 2):
            oracle = _multinomial_oracle(x[j, 0], rate[i], [0, 0, 0], [4])
            assert abs(float(lp[j, i]) - oracle) < 1e-5
    torch.testing.assert_close(d.mean, full.mean)
    assert d.sample((5,)).shape == (5, 3, 3)


def test_bad_values_and_parameters():
    d = plc.constrain(
        dist.Poisson(torch.ones(2, 3)).to_event(1), torch.ones(1, 3), torch.tensor([2.0])
    )
    with pytest.raises(ValueError, match="value must have shape"):
        d.log_prob(torch.ones(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        d.log_prob(torch.ones(5, 3))
    with pytest.raises(ValueError, match="value must be a torch.Tensor"):
        d.log_prob([1.0, 1.0, 0.0])
    d._validate_args = False  # the shape checks hold without validation too
    with pytest.raises(ValueError, match="value must have shape"):
        d.log_prob(torch.ones(4))
    # non-finite and negative values score -inf without validation, never an error
    lp = d.log_prob(torch.tensor([[float("nan"), 1.0, 1.0], [-1.0, 3.0, 0.0]]))
    assert bool((lp == -math.inf).all())
    for rate in [torch.tensor([1.0, float("inf"), 1.0]), torch.tensor([1.0, -0.5, 1.0])]:
        with pytest.raises(ValueError, match="rate must be finite and >= 0"):
            plc.constrain(
                dist.Poisson(rate, validate_args=False).to_event(1),
                torch.ones(1, 3),
                torch.tensor([2.0]),
            )
    with pytest.raises(ValueError, match="non-finite"):
        plc.constrain(
            dist.Poisson(torch.ones(3)).to_event(1), torch.ones(1, 3), torch.tensor([float("inf")])
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_gradient_at_zero_rates(dtype):
    # entries with rate 0 (in a group, alone in a group with total 0, in no group): the
    # one-sided derivative d/d rate_i = x_i / rate_i - k_g / Lambda_g (x_i / rate_i = 0 at
    # x_i = 0), or x_i / rate_i - 1 in no group; torch.xlogy would give nan there
    A = torch.tensor([[1.0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=dtype)
    b = torch.tensor([3.0, 2.0, 0.0], dtype=dtype)
    rate = torch.tensor([0.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=dtype, requires_grad=True)
    x = torch.tensor([0.0, 3.0, 1.0, 1.0, 0.0, 0.0], dtype=dtype)
    lp = plc.constrain(dist.Poisson(rate).to_event(1), A, b).log_prob(x)
    (grad,) = torch.autograd.grad(lp, rate)
    r, xs = rate.detach().double(), x.double()
    ratio = torch.where(xs > 0, xs / r.clamp_min(1e-300), torch.zeros_like(xs))
    # k_g / Lambda_g per entry: groups (3 / 2, 3 / 2), (2 / 1.5, 2 / 1.5), none (1), (0)
    k_over_lam = torch.tensor([1.5, 1.5, 2 / 1.5, 2 / 1.5, 1.0, 0.0], dtype=torch.float64)
    expected = ratio - k_over_lam
    torch.testing.assert_close(grad.double(), expected)


def test_structured_operator_reads_as_its_dense_matrix():
    # AxisSums over one axis is a disjoint group sum: same law as the GroupSum oracle
    rate = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 2.5]], dtype=torch.float64)
    b = torch.tensor([4.0, 2.0], dtype=torch.float64)
    d = plc.constrain(dist.Poisson(rate).to_event(2), plc.AxisSums((2, 3), axes=1), b)
    ref = plc.constrain(
        dist.Poisson(rate.reshape(6)).to_event(1),
        plc.GroupSum(torch.tensor([0] * 3 + [1] * 3), 2),
        b,
    )
    x = torch.tensor([[1.0, 1.0, 2.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x.reshape(6)))
    torch.testing.assert_close(d.mean.reshape(6), ref.mean)
    assert torch.equal(d.sample((3,)).sum(-1), b.expand(3, 2))
    with pytest.raises(NotImplementedError, match="overlap"):  # two axes: rows overlap
        both = plc.AxisSums((2, 3), axes=(0, 1))
        plc.constrain(dist.Poisson(rate).to_event(2), both, torch.ones(both.num_rows))
