"""GroupSum at scale: a batch of molecules whose charges sum to zero per molecule.

300,000 entries in 2,300 groups. One iteration = ``rsample`` + ``log_prob`` +
backward to the Gaussian's parameters. Printed: the constrained distribution's
time as a ratio of an unconstrained ``Normal`` on the same entries (target <= 2x),
and its peak extra memory per entry (O(n): no m x n matrix is formed).

Run: ``python benchmarks/groupsum.py [--device cuda]``.
"""

import argparse

import pyro.distributions as dist
import torch
from _timing import paired_ratio, paired_times

import pyro_linconstr as plc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--groups", type=int, default=2_300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--shuffle", action="store_true", help="unsorted group ids")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    n, m = args.n, args.groups
    # atoms of a molecule are stored together: sorted ids, every group non-empty
    ids = torch.cat([torch.arange(m, device=dev), torch.randint(0, m, (n - m,), device=dev)])
    groups = torch.sort(ids).values
    if args.shuffle:
        groups = groups[torch.randperm(n, device=dev)]
    A = plc.GroupSum(groups, m)
    b = torch.zeros(m, device=dev)
    loc = torch.randn(n, device=dev, requires_grad=True)
    raw = torch.randn(n, device=dev, requires_grad=True)

    def unconstrained():
        d = dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1)
        x = d.rsample()
        loss = d.log_prob(x) + x.square().sum()
        loss.backward()

    def constrained():
        d = plc.constrain(dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1), A, b)
        x = d.rsample()
        loss = d.log_prob(x) + x.square().sum()
        loss.backward()

    t_u, t_c = paired_times(unconstrained, constrained, args.repeats)
    order = "shuffled" if args.shuffle else "contiguous"
    print(f"GroupSum benchmark: n = {n:,} entries, {m:,} {order} groups, {dev}, float32")
    print(f"{'':32s}{'seconds':>10s}{'ratio':>8s}")
    print(f"{'unconstrained Normal':32s}{t_u:10.4f}{1.0:8.2f}")
    ratio, q1, q3 = paired_ratio()
    print(f"{'constrained (GroupSum)':32s}{t_c:10.4f}{ratio:8.2f}   (target <= 2)")
    print(f"ratio per adjacent pair: median {ratio:.2f}, quartiles {q1:.2f}-{q3:.2f}")
    if dev.type == "cpu":  # allocations grow linearly in n: O(n) memory
        for size in (n // 4, n // 2, n):
            sub = plc.GroupSum(groups[:size], m)
            torch.manual_seed(0)
            with torch.autograd.profiler.profile(profile_memory=True) as prof:
                d = plc.constrain(dist.Normal(loc[:size].detach(), 1.0).to_event(1), sub, b)
                d.log_prob(d.rsample())
            mem = sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0)
            print(f"allocated bytes per entry at n = {size:>7,}: {mem / size:8.1f}")


if __name__ == "__main__":
    main()
