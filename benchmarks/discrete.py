"""Throughput of the constrained discrete families against their unconstrained base.

Prints, for n = 100,000 entries, the throughput ratio (constrained / unconstrained,
both timed in this process; 1.0 = as fast as the base, 0.1 = ten times slower) of
``sample`` and ``log_prob`` for:

* ``Poisson(rate).to_event(1)`` under one global sum and under 1,000 group sums
  (product of multinomials, binary splitting sampler);
* ``Bernoulli(logits).to_event(1)`` and ``Binomial(3, logits).to_event(1)`` under
  group sums (conditional Bernoulli by the log-space DP, ``O(n k)``; the DP runs
  over the largest group sequentially, so groups of 100 and of 1,000 are shown).

``log_prob`` of the Bernoulli family recomputes the normaliser on every call (it
is differentiable in the logits). Run: ``python benchmarks/discrete.py``.
"""

from __future__ import annotations

import time

import pyro.distributions as dist
import torch

import pyro_linconstr as plc

N = 100_000
BATCH = 4  # sample_shape of each call


def best_time(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name: str, base, A, b) -> tuple[str, float, float]:
    d = plc.constrain(base, A, b)
    x_base = base.sample((BATCH,))
    x_con = d.sample((BATCH,))
    t_sample_base = best_time(lambda: base.sample((BATCH,)))
    t_sample_con = best_time(lambda: d.sample((BATCH,)))
    t_lp_base = best_time(lambda: base.log_prob(x_base))
    t_lp_con = best_time(lambda: d.log_prob(x_con))
    return name, t_sample_base / t_sample_con, t_lp_base / t_lp_con


def main() -> None:
    torch.manual_seed(0)
    # One intra-op thread: on a shared machine, thread-pool contention swamps the small
    # per-step kernels of the DP and the timings; both sides use the same setting.
    torch.set_num_threads(1)
    rows = []
    rate = torch.rand(N) * 5 + 0.1
    poisson = dist.Poisson(rate).to_event(1)
    rows.append(
        measure("Poisson, 1 sum (k = 300,000)", poisson, torch.ones(1, N), torch.tensor([3e5]))
    )
    groups = torch.arange(N) // 100
    k = torch.full((N // 100,), 300.0)
    rows.append(measure("Poisson, 1,000 group sums", poisson, plc.GroupSum(groups, N // 100), k))

    logits = torch.randn(N)
    bern = dist.Bernoulli(logits=logits).to_event(1)
    rows.append(
        measure(
            "Bernoulli, 1,000 groups of 100 (k = 30)",
            bern,
            plc.GroupSum(groups, N // 100),
            torch.full((N // 100,), 30.0),
        )
    )
    g1000 = torch.arange(N) // 1000
    rows.append(
        measure(
            "Bernoulli, 100 groups of 1,000 (k = 50)",
            bern,
            plc.GroupSum(g1000, N // 1000),
            torch.full((N // 1000,), 50.0),
        )
    )
    binom = dist.Binomial(torch.full((N,), 3.0), logits=logits).to_event(1)
    rows.append(
        measure(
            "Binomial(3), 1,000 groups of 100 (k = 60)",
            binom,
            plc.GroupSum(groups, N // 100),
            torch.full((N // 100,), 60.0),
        )
    )

    print(f"n = {N:,}, sample_shape = ({BATCH},), {torch.get_num_threads()} thread(s)")
    print("throughput ratio = constrained / unconstrained (same process; higher is better)")
    print(f"{'case':<44} {'sample':>10} {'log_prob':>10}")
    for name, r_sample, r_lp in rows:
        print(f"{name:<44} {r_sample:>10.3f} {r_lp:>10.3f}")


if __name__ == "__main__":
    main()
