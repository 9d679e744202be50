"""enumerate_support of the conditional Bernoulli/Binomial family, and TraceEnum_ELBO summing a
cardinality-constrained latent out exactly (oracle: brute force over all binary vectors)."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate

import pyro_linconstr as plc


def _brute_support(counts, groups, totals):
    """All x with 0 <= x_i <= counts_i and per-group sums = totals (groups[i] = -1: free)."""
    pts = []
    for x in itertools.product(*[range(int(c) + 1) for c in counts]):
        sums = [0] * len(totals)
        for xi, g in zip(x, groups):
            if g >= 0:
                sums[g] += xi
        if sums == list(totals):
            pts.append(x)
    return torch.tensor(pts, dtype=torch.float64)


@pytest.mark.parametrize(
    "counts,groups,totals",
    [
        ([1] * 5, [0] * 5, [2]),
        ([1] * 6, [0, 0, 1, 1, 1, -1], [1, 2]),
        ([2, 1, 3, 2], [0, 0, 1, 1], [2, 3]),
    ],
)
def test_support_is_every_point_and_sums_to_one(counts, groups, totals):
    n, m = len(counts), len(totals)
    A = torch.zeros(m, n, dtype=torch.float64)
    for i, g in enumerate(groups):
        if g >= 0:
            A[g, i] = 1.0
    logits = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = dist.Binomial(torch.tensor(counts, dtype=torch.float64), logits=logits).to_event(1)
    d = plc.constrain(base, A, torch.tensor(totals, dtype=torch.float64))
    values = d.enumerate_support()
    oracle = _brute_support(counts, groups, totals)
    assert values.shape == oracle.shape
    assert {tuple(v) for v in values.tolist()} == {tuple(v) for v in oracle.tolist()}
    assert math.isclose(float(d.log_prob(values).exp().sum()), 1.0, rel_tol=1e-12)


def test_expand_and_batch_rules():
    probs = torch.rand(3, 5, generator=torch.Generator().manual_seed(2))
    d = plc.constrain(
        dist.Bernoulli(probs=probs).to_event(1), torch.ones(1, 5), torch.tensor([2.0])
    )
    assert d.enumerate_support().shape == (10, 3, 5)
    v = d.enumerate_support(expand=False)
    assert v.shape == (10, 1, 5)
    assert torch.allclose(d.log_prob(v).exp().sum(0), torch.ones(3))
    varying = plc.constrain(
        dist.Bernoulli(probs=probs).to_event(1),
        torch.ones(1, 5),
        torch.tensor([[1.0], [2.0], [2.0]]),
    )
    with pytest.raises(ValueError, match="differ across the batch"):
        varying.enumerate_support()
    big = plc.constrain(
        dist.Bernoulli(probs=torch.full((40,), 0.5)).to_event(1),
        torch.ones(1, 40),
        torch.tensor([20.0]),
    )
    with pytest.raises(ValueError, match="max_enumeration"):
        big.enumerate_support()


def _model(y, probs, w, k):
    with plc.LinearConstraint(torch.ones(1, probs.shape[-1]), torch.tensor([float(k)]), site="z"):
        z = pyro.sample("z", dist.Bernoulli(probs=probs).to_event(1))
    pyro.sample("y", dist.Normal((w * z).sum(-1), 0.5), obs=y)


def _brute_log_evidence(y, probs, w, k):
    n = probs.shape[-1]
    total = []
    for idx in itertools.combinations(range(n), k):
        z = torch.zeros(n, dtype=probs.dtype)
        z[list(idx)] = 1.0
        lp = dist.Bernoulli(probs=probs).log_prob(z).sum()
        total.append(lp + dist.Normal((w * z).sum(), 0.5).log_prob(y))
    total = torch.stack(total)
    # p(z | sum = k) = p(z) / P(sum = k)
    norm = []
    for idx in itertools.combinations(range(n), k):
        z = torch.zeros(n, dtype=probs.dtype)
        z[list(idx)] = 1.0
        norm.append(dist.Bernoulli(probs=probs).log_prob(z).sum())
    return torch.logsumexp(total, 0) - torch.logsumexp(torch.stack(norm), 0)


def test_trace_enum_elbo_sums_the_selection_out_exactly():
    g = torch.Generator().manual_seed(3)
    probs = (torch.rand(6, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64)
    y = torch.tensor(1.3, dtype=torch.float64)
    model = config_enumerate(_model, default="parallel")
    elbo = TraceEnum_ELBO(max_plate_nesting=0)
    loss = elbo.differentiable_loss(model, lambda *a: None, y, probs, w, 3)
    oracle = -_brute_log_evidence(y, probs, w, 3)
    assert torch.allclose(loss, oracle, rtol=1e-10)
    (g1,) = torch.autograd.grad(loss, probs)
    (g2,) = torch.autograd.grad(oracle, probs)
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-10)


def test_svi_with_an_enumerated_selection_learns_the_probabilities():
    """Maximum likelihood of which 2 of 5 features are on: SVI with TraceEnum_ELBO lowers
    the exact negative log evidence."""
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, generator=g)
    ys = torch.randn(50, generator=g) + (w[0] + w[1])

    def model(ys):
        logits = pyro.param("logits", torch.zeros(5))
        with pyro.plate("data", len(ys)):
            with plc.LinearConstraint(torch.ones(1, 5), torch.tensor([2.0]), site="z"):
                z = pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))
            pyro.sample("y", dist.Normal((w * z).sum(-1), 0.5), obs=ys)

    model = config_enumerate(model, default="parallel")
    svi = SVI(
        model, lambda ys: None, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1)
    )
    first = svi.evaluate_loss(ys)
    for _ in range(60):
        svi.step(ys)
    assert svi.evaluate_loss(ys) < first - 1.0
