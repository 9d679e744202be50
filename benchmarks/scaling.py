"""The paper's cost table: seconds per iteration of exact sampling + loss + gradient.

n in {256, 1024, 2048}, batch in {16, 64, 256}, m = n / 2 constraints (a dense
``A`` shared across the batch, per-item diagonal variances and right-hand
sides). Printed beside the paper's figures (one NVIDIA A800 GPU) and the
hand-written baseline (a ``MultivariateNormal`` on the ``n x n`` conditional
covariance), which is skipped where it would need more than ``--max-baseline-gb``
of memory for its covariances. Also the paper's second measurement: n = 2048,
batch 64, with 256 and 512 constraints.

Run: ``python benchmarks/scaling.py [--device cuda] [--quick]``.
"""

import argparse

import pyro.distributions as dist
import torch
from _timing import median_time

import pyro_linconstr as plc

PAPER = {  # seconds, one A800 GPU
    (256, 16): 0.0076, (256, 64): 0.0081, (256, 256): 0.0105,
    (1024, 16): 0.048, (1024, 64): 0.091, (1024, 256): 0.237,
    (2048, 16): 0.205, (2048, 64): 0.462, (2048, 256): 1.241,
}  # fmt: skip
PAPER_M = {256: 0.249, 512: 0.329}  # n = 2048, batch 64


def problem(n, m, batch, device, dtype):
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(m, n, generator=g, dtype=dtype) / n**0.5).to(device)
    b = torch.randn(batch, m, generator=g, dtype=dtype).to(device)
    target = torch.randn(batch, n, generator=g, dtype=dtype).to(device)
    loc = torch.zeros(batch, n, dtype=dtype, device=device, requires_grad=True)
    raw = torch.zeros(batch, n, dtype=dtype, device=device, requires_grad=True)
    return A, b, target, loc, raw


def step_ours(A, b, target, loc, raw):
    var = torch.nn.functional.softplus(raw)
    x = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b).rsample()
    (x - target).square().sum().backward()


def step_handwritten(A, b, target, loc, raw):
    var = torch.nn.functional.softplus(raw)
    K = var.unsqueeze(-1) * A.T
    S = A @ K
    mean = loc + (K @ torch.linalg.solve(S, (b - loc @ A.T).unsqueeze(-1))).squeeze(-1)
    cov = torch.diag_embed(var) - K @ torch.linalg.solve(S, K.transpose(-1, -2))
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    x = dist.MultivariateNormal(mean, cov + 1e-4 * eye).rsample()
    (x - target).square().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-baseline-gb", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="n = 256 and 1024 only")
    args = parser.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"Seconds per iteration (sampling + loss + gradient), m = n/2, {args.dtype}, on {name}")
    head = f"{'n':>5s}{'batch':>7s}{'plc':>10s}{'paper (A800)':>14s}"
    print(head + f"{'hand-written':>14s}{'hand/plc':>10s}")
    ns = (256, 1024) if args.quick else (256, 1024, 2048)
    for n in ns:
        for batch in (16, 64, 256):
            prob = problem(n, n // 2, batch, dev, dtype)
            t = median_time(lambda prob=prob: step_ours(*prob), args.repeats, warmup=1)
            gb = batch * n * n * torch.finfo(dtype).bits / 8 / 1e9 * 4
            if gb <= args.max_baseline_gb:
                th = median_time(lambda prob=prob: step_handwritten(*prob), args.repeats, warmup=1)
                hand, ratio = f"{th:14.4f}", f"{th / t:10.1f}"
            else:
                hand, ratio = f"{'skipped':>14s}", f"{'':>10s}"
            print(f"{n:5d}{batch:7d}{t:10.4f}{PAPER[(n, batch)]:14.4f}{hand}{ratio}")
    if not args.quick:
        print("n = 2048, batch 64, fewer constraints:")
        for m in (256, 512):
            prob = problem(2048, m, 64, dev, dtype)
            t = median_time(lambda prob=prob: step_ours(*prob), args.repeats, warmup=1)
            print(f"  m = {m:4d}: plc {t:.4f} s   paper {PAPER_M[m]:.3f} s")


if __name__ == "__main__":
    main()
