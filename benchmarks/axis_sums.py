"""AxisSums: a grid whose rows and columns all sum to zero (or to given margins).

One iteration = ``plc.constrain`` + ``rsample`` + ``log_prob`` + backward to
the Normal's per-entry means and scales, on a ``r x c`` grid with
``AxisSums((r, c), axes=(0, 1))`` (``m = r + c - 1`` independent margins).
Printed as ratios against, in the same process:

* an unconstrained ``Normal`` on the same ``r c`` entries (rsample +
  log_prob + backward);
* the dense-``A`` path: the same constraint as a dense ``m x n`` tensor (the
  independent rows, ``A.to_dense()``; a dense ``A`` of all ``r + c`` margins
  would first need an SVD to drop the redundant row), where it fits in
  memory (``--dense-limit`` entries of ``A``).

Also printed: the memory allocated per entry (CPU), the same at two sizes
(no ``m x n`` or ``n x n`` matrix).

Run: ``python benchmarks/axis_sums.py [--sizes 80 300] [--device cuda]``.
"""

import argparse

import pyro.distributions as dist
import torch
from _timing import median_time, paired_ratio, paired_times

import pyro_linconstr as plc


def make_problem(r, c, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(r, c, generator=g, dtype=dtype).to(device).requires_grad_()
    raw = torch.randn(r, c, generator=g, dtype=dtype).to(device).requires_grad_()
    return loc, raw


def step(loc, raw, A=None, b=None):
    base = dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(2)
    d = base if A is None else plc.constrain(base, A, b)
    x = d.rsample()
    (d.log_prob(x) + x.square().sum()).backward()


def allocated_per_entry(r, c, dtype) -> float:
    loc, raw = make_problem(r, c, "cpu", dtype)
    A = plc.AxisSums((r, c), (0, 1))
    b = torch.zeros(A.num_rows, dtype=dtype)
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        step(loc, raw, A, b)
    mem = sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0)
    return mem / (r * c)


def table_row(r, dtype, dev, repeats, dense_limit) -> str:
    loc, raw = make_problem(r, r, dev, dtype)
    A = plc.AxisSums((r, r), (0, 1), device=dev)
    b = torch.zeros(A.num_rows, dtype=dtype, device=dev)
    t_u, t_c = paired_times(lambda: step(loc, raw), lambda: step(loc, raw, A, b), repeats)
    ratio, q1, q3 = paired_ratio()
    dense_cell = f"{'-':>11s}{'(too big)':>12s}"
    if A.num_rows * A.num_cols <= dense_limit:
        Ad = A.to_dense().to(dtype)
        t_d = median_time(lambda: step(loc, raw, Ad, b), max(3, repeats // 3), warmup=1)
        dense_cell = f"{t_d:11.4f}{t_d / t_c:12.1f}"
    return (
        f"{f'{r} x {r}':>10s}{A.num_rows:6d}{t_u:13.5f}{t_c:12.5f}{ratio:8.2f}"
        f"{f'{q1:.2f}-{q3:.2f}':>14s}{dense_cell}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[80, 300])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dense-limit", type=float, default=6e7, help="max entries of dense A")
    args = parser.parse_args()
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    print(f"AxisSums benchmark: r x r grid, both axes zero-sum, {args.dtype}, {dev}")
    print("one iteration = constrain + rsample + log_prob + backward (eager)")
    print(
        f"{'r x c':>10s}{'m':>6s}{'unconstr. s':>13s}{'AxisSums s':>12s}{'ratio':>8s}"
        f"{'(quartiles)':>14s}{'dense A s':>11s}{'dense/ours':>12s}"
    )
    for r in args.sizes:
        print(table_row(r, dtype, dev, args.repeats, args.dense_limit))
    if dev.type == "cpu":
        for r in args.sizes:
            per_entry = allocated_per_entry(r, r, dtype)
            print(f"allocated bytes per entry at {r} x {r}: {per_entry:8.1f}")


if __name__ == "__main__":
    main()
