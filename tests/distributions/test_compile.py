"""rsample and log_prob of the Gaussian family trace into one graph (torch.compile, no graph
breaks, hence no host synchronisation such as .item() or data-dependent branching) once the
distribution is built, with argument validation off."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_linconstr as plc


def _case(kind):
    g = torch.Generator().manual_seed(0)
    n, m = 60, 4
    loc = torch.randn(n, generator=g)
    scale = torch.rand(n, generator=g) + 0.5
    if kind == "groups":
        groups = torch.sort(
            torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=g)])
        )
        return dist.Normal(loc, scale).to_event(1), plc.GroupSum(groups.values, m), torch.zeros(m)
    A, b = torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    if kind == "ill":  # orthonormalized in float64: three fixed refinement steps
        A = torch.cat([A, 2 * A[:1]])
        b = torch.cat([b, 2 * b[:1]])
    if kind == "lowrank":
        W = torch.randn(n, 2, generator=g)
        return dist.LowRankMultivariateNormal(loc, W, scale**2), A, b
    return dist.Normal(loc, scale).to_event(1), A, b


@pytest.mark.parametrize("kind", ["groups", "dense", "ill", "lowrank"])
def test_rsample_and_log_prob_have_no_graph_break(kind):
    base, A, b = _case(kind)
    with pyro.validation_enabled(False):
        d = plc.constrain(base, A, b)

        def step():
            x = d.rsample((3,))
            return x, d.log_prob(x)

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_step_matches_eager():
    base, A, b = _case("groups")
    with pyro.validation_enabled(False):
        d = plc.constrain(base, A, b)

        def step():
            x = d.rsample((2,))
            return x, d.log_prob(x)

        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        torch.manual_seed(3)
        x1, lp1 = compiled()
        torch.manual_seed(3)
        x2, lp2 = step()
    assert torch.allclose(x1, x2, atol=1e-6) and torch.allclose(lp1, lp2, rtol=1e-5)
    assert torch.allclose(A.matvec(x1), b, atol=1e-5)
