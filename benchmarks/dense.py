"""Dense ``A`` with per-item diagonal variances (n = 1024, m = 256, batch 16).

One iteration = ``rsample`` + ``log_prob`` + backward to the per-item means and
variances; ``A`` is shared across the batch and ``b`` differs per item.
Printed as ratios against, in the same process:

* the unavoidable work: the batched product ``A diag(s) A^T`` and its
  Cholesky factor, with backward (target: constrained <= 1.5x of it);
* the hand-written alternative: a ``MultivariateNormal`` on the conditional
  covariance ``Sigma - Sigma A^T (A Sigma A^T)^{-1} A Sigma`` (``n x n`` per
  item, jittered since it is singular) (target: >= 20x slower than ours).

Run: ``python benchmarks/dense.py [--device cuda] [--dtype float64]``.
"""

import argparse

import pyro.distributions as dist
import torch
from _timing import median_time, paired_ratio, paired_times

import pyro_linconstr as plc


def make_problem(n, m, batch, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=dtype).to(device) / n**0.5
    b = torch.randn(batch, m, generator=g, dtype=dtype).to(device)
    loc = torch.randn(batch, n, generator=g, dtype=dtype).to(device).requires_grad_()
    raw = torch.randn(batch, n, generator=g, dtype=dtype).to(device).requires_grad_()
    return A, b, loc, raw


def ours(A, b, loc, raw):
    var = torch.nn.functional.softplus(raw)
    d = plc.constrain(dist.Normal(loc, var.sqrt()).to_event(1), A, b)
    x = d.rsample()
    (d.log_prob(x).sum() + x.square().sum()).backward()


def unavoidable(A, b, loc, raw):
    var = torch.nn.functional.softplus(raw)
    S = (A * var.unsqueeze(-2)) @ A.T
    L = torch.linalg.cholesky(S)
    L.diagonal(dim1=-2, dim2=-1).log().sum().backward()


def handwritten(A, b, loc, raw):
    var = torch.nn.functional.softplus(raw)
    cov = torch.diag_embed(var)
    K = var.unsqueeze(-1) * A.T  # (batch, n, m)
    S = A @ K
    mean = loc + (K @ torch.linalg.solve(S, (b - loc @ A.T).unsqueeze(-1))).squeeze(-1)
    cond_cov = cov - K @ torch.linalg.solve(S, K.transpose(-1, -2))
    n = loc.shape[-1]
    jitter = 1e-4 * torch.eye(n, dtype=loc.dtype, device=loc.device)
    d = dist.MultivariateNormal(mean, cond_cov + jitter)
    x = d.rsample()
    (d.log_prob(x).sum() + x.square().sum()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    prob = make_problem(args.n, args.m, args.batch, torch.device(args.device), dtype)
    t_u, t_o = paired_times(lambda: unavoidable(*prob), lambda: ours(*prob), args.repeats)
    t_h = median_time(lambda: handwritten(*prob), max(3, args.repeats // 2), warmup=1)
    print(
        f"Dense A benchmark: n = {args.n}, m = {args.m}, batch = {args.batch}, "
        f"{args.dtype}, device {args.device}"
    )
    print(f"{'':44s}{'seconds':>10s}{'ratio':>9s}")
    print(f"{'unavoidable: A diag(s) A^T + Cholesky + bwd':44s}{t_u:10.4f}{1.0:9.2f}")
    ratio, q1, q3 = paired_ratio()
    print(f"{'plc.constrain: rsample + log_prob + bwd':44s}{t_o:10.4f}{ratio:9.2f}   (<= 1.5)")
    print(f"{'hand-written MVN on conditional covariance':44s}{t_h:10.4f}{t_h / t_u:9.2f}")
    print(f"hand-written / plc.constrain: {t_h / t_o:.1f}x   (target >= 20)")


if __name__ == "__main__":
    main()
