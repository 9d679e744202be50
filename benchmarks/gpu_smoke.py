"""Correctness on a GPU: every family and operator runs on the device, stays on it, and is exact.

Run: ``python benchmarks/gpu_smoke.py`` (skips with a message when no GPU is present).
"""

import math

import pyro
import pyro.distributions as dist
import torch

import pyro_linconstr as plc


def check_gaussians(dev: torch.device) -> None:
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator(device="cpu").manual_seed(0)
        n, m, batch = 300, 40, 8
        A = torch.randn(m, n, generator=g, dtype=dtype).to(dev)
        b = torch.randn(batch, m, generator=g, dtype=dtype).to(dev)
        loc = torch.randn(batch, n, generator=g, dtype=dtype).to(dev).requires_grad_()
        W = torch.randn(n, 3, generator=g, dtype=dtype).to(dev)
        s = (torch.rand(batch, n, generator=g, dtype=dtype) + 0.1).to(dev)
        groups = torch.randint(0, 30, (n,), generator=g).to(dev)
        groups[:30] = torch.arange(30, device=dev)
        G = plc.GroupSum(groups, 30)
        bases = {
            "diag": dist.Normal(loc, s.sqrt()).to_event(1),
            "lowrank": dist.LowRankMultivariateNormal(loc, W, s),
            "full": dist.MultivariateNormal(loc, W @ W.T + torch.diag_embed(s)),
        }
        for (name, base), (opname, op, rhs) in (
            ((k, v), o)
            for k, v in bases.items()
            for o in (("dense", A, b), ("groupsum", G, b[:, :30].clone()))
        ):
            d = plc.constrain(base, op, rhs)
            x = d.rsample((4,))
            assert x.device.type == dev.type and x.dtype == dtype, (name, opname, x.device)
            dense = op.to_dense().to(dtype) if opname == "groupsum" else op
            A64, x64, b64 = dense.double(), x.detach().double(), rhs.double()
            resid = ((A64 @ x64.unsqueeze(-1)).squeeze(-1) - b64).abs()
            scale = (A64.abs() @ x64.abs().unsqueeze(-1)).squeeze(-1) + b64.abs()
            worst = float((resid / scale).max()) / torch.finfo(dtype).eps / math.sqrt(n)
            assert worst <= 8, (name, opname, dtype, worst)
            lp = d.log_prob(x)
            (lp.sum() + x.square().sum() + d.variance.sum()).backward()
            assert torch.isfinite(lp).all() and torch.isfinite(loc.grad).all()
            loc.grad = None
            print(f"  {name:8s} {opname:9s} {str(dtype):14s} exact (c/sqrt(n) = {worst:.2f})")


def check_discrete(dev: torch.device) -> None:
    groups = torch.arange(12, device=dev) // 4
    G = plc.GroupSum(groups, 3)
    k = torch.tensor([3.0, 5.0, 0.0], device=dev)
    p = plc.constrain(dist.Poisson(torch.rand(12, device=dev) + 0.5).to_event(1), G, k)
    xp = p.sample((5,))
    assert xp.device.type == dev.type and torch.equal(G.matvec(xp), k.expand(5, 3))
    assert torch.isfinite(p.log_prob(xp)).all()
    logits = torch.randn(12, device=dev, requires_grad=True)
    kb = torch.tensor([2.0, 1.0, 4.0], device=dev)
    q = plc.constrain(dist.Bernoulli(logits=logits).to_event(1), G, kb)
    xb = q.sample((5,))
    assert xb.device.type == dev.type and torch.equal(G.matvec(xb), kb.expand(5, 3))
    q.mean.sum().backward()
    assert torch.isfinite(logits.grad).all()
    print("  Poisson and Bernoulli under GroupSum: exact, on device")


def check_pyro(dev: torch.device) -> None:
    pyro.clear_param_store()
    A, b = torch.ones(1, 5, device=dev), torch.zeros(1, device=dev)

    def model():
        mu = pyro.param("mu", torch.zeros(5, device=dev))
        return pyro.sample("x", dist.Normal(mu, 1.0).to_event(1))

    with plc.LinearConstraint(A, b, site="x"):
        x = model()
    assert x.device.type == dev.type and float(x.sum().abs()) < 1e-5
    print("  LinearConstraint handler: sample on device")


def main() -> None:
    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return
    dev = torch.device("cuda")
    print(f"GPU smoke test on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    check_gaussians(dev)
    check_discrete(dev)
    check_pyro(dev)
    print("GPU smoke test passed")


if __name__ == "__main__":
    main()
