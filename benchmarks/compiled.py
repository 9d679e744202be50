"""torch.compile of a constrained Gaussian's rsample + log_prob, against eager.

The distribution is built eagerly (its factorization and checks synchronise with the host by
design: an inconsistent law must raise); the work repeated on a built distribution, drawing
samples and scoring them (a posterior predictive, a sampler's proposals), is compiled with
``fullgraph=True``: it traces into one graph, with no graph break and no host
synchronisation. Printed: compiled / eager time per call (paired, same process) for a GroupSum
law (n = 300,000, 2,300 groups, 8 draws) and a dense law (n = 1024, m = 256, batch 16, 8 draws),
with argument validation off.

Training differs: parameters change every step, so the distribution is rebuilt every step and
its construction (which checks the law) stays eager; see docs/results for what that means.

Run: ``python benchmarks/compiled.py [--backend inductor]``.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from _timing import paired_ratio, paired_times

import pyro_linconstr as plc


def problems():
    g = torch.Generator().manual_seed(0)
    n, m = 300_000, 2_300
    ids = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=g)])
    A = plc.GroupSum(torch.sort(ids).values, m)
    yield "GroupSum n=300,000 m=2,300", torch.randn(n, generator=g), A, torch.zeros(m)
    n, m, batch = 1024, 256, 16
    A = torch.randn(m, n, generator=g) / n**0.5
    yield (
        "dense n=1024 m=256 batch 16",
        torch.randn(batch, n, generator=g),
        A,
        torch.randn(batch, m),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    pyro.enable_validation(False)
    print(f"compiled ({args.backend}, fullgraph) / eager time of rsample((8,)) + log_prob")
    for name, loc0, A, b in problems():
        scale = torch.rand_like(loc0) + 0.5
        d = plc.constrain(dist.Normal(loc0, scale).to_event(1), A, b)

        def eager(d=d):
            x = d.rsample((8,))
            return d.log_prob(x)

        compiled = torch.compile(eager, backend=args.backend, fullgraph=True)
        compiled()  # compile outside the timing (dynamo binds the default argument d)
        paired_times(eager, compiled, args.repeats)
        ratio, q1, q3 = paired_ratio()
        print(f"  {name:32s} {ratio:6.2f}  (quartiles {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main()
