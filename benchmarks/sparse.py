"""A sparse network law: flows on the edges of a grid graph balance at every node.

A ``rows x cols`` grid (default 60 x 60: m = 3,600 nodes, n = 7,080 edges) with
flows ``x ~ N(loc, diag(s))`` on its edges, conditioned on the node balances
``A x = b`` (``A`` the node-edge incidence matrix, one source and one sink).
The law is redundant (the balances sum to zero), so the conditioning drops one
row, found by the pivoted Cholesky of ``A A^T`` (cached on the operator for the
sparse ``A``; recomputed on every call for a dense ``A``, which has no cache).

One iteration = ``plc.constrain`` + ``rsample`` + ``log_prob`` + backward to the
means and variances. Printed as ratios measured in this process, paired
(alternating runs, median of the per-pair ratios):

* sparse ``A`` (``torch.sparse_csr``) against the unconstrained ``Normal``
  (the same iteration without the law: what the law costs);
* dense ``A`` against sparse ``A`` (what sparsity saves);
* the first call with a sparse ``A`` (set-up and analysis of the redundant
  rows, cached afterwards) against a later call.

Run: ``python benchmarks/sparse.py [--rows 60 --cols 60] [--dtype float64]
[--device cuda] [--threads 1]``.
"""

import argparse
import time
import warnings

import pyro.distributions as dist
import torch
from _timing import paired_ratio, paired_times

import pyro_linconstr as plc


def grid_incidence(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """Node-edge incidence matrix of a grid graph, sparse COO (edge leaves -1, enters +1)."""
    nodes = torch.arange(rows * cols).reshape(rows, cols)
    right = torch.stack([nodes[:, :-1].reshape(-1), nodes[:, 1:].reshape(-1)], 1)
    down = torch.stack([nodes[:-1, :].reshape(-1), nodes[1:, :].reshape(-1)], 1)
    edges = torch.cat([right, down])
    n = edges.shape[0]
    idx = torch.stack([torch.cat([edges[:, 0], edges[:, 1]]), torch.arange(n).repeat(2)])
    vals = torch.cat([-torch.ones(n), torch.ones(n)]).to(dtype)
    A = torch.sparse_coo_tensor(idx, vals, (rows * cols, n), check_invariants=True)
    return A.coalesce().to(device)


def make_problem(rows, cols, dtype, device, seed=0):
    A = grid_incidence(rows, cols, dtype, device)
    m, n = A.shape
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(m, dtype=dtype)
    b[0], b[-1] = 5.0, -5.0  # a source in one corner, a sink in the other
    loc = torch.randn(n, generator=g, dtype=dtype).to(device).requires_grad_()
    raw = torch.randn(n, generator=g, dtype=dtype).to(device).requires_grad_()
    return A, b.to(device), loc, raw


def iteration(A, b, loc, raw):
    s = torch.nn.functional.softplus(raw)
    d = plc.constrain(dist.Normal(loc, s.sqrt()).to_event(1), A, b)
    x = d.rsample()
    (d.log_prob(x) + x.square().sum()).backward()


def unconstrained(A, b, loc, raw):
    s = torch.nn.functional.softplus(raw)
    d = dist.Normal(loc, s.sqrt()).to_event(1)
    x = d.rsample()
    (d.log_prob(x) + x.square().sum()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--cols", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    A, b, loc, raw = make_problem(args.rows, args.cols, dtype, device)
    csr = A.to_sparse_csr()
    m, n = A.shape

    # first call with a fresh tensor: set-up + analysis of the redundant rows (then cached)
    t0 = time.perf_counter()
    iteration(csr, b, loc, raw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_first = time.perf_counter() - t0

    t_u, t_s = paired_times(
        lambda: unconstrained(csr, b, loc, raw),
        lambda: iteration(csr, b, loc, raw),
        args.repeats,
        warmup=1,
    )
    r_su, q1_su, q3_su = paired_ratio()

    dense = A.to_dense()
    t_s2, t_d = paired_times(
        lambda: iteration(csr, b, loc, raw),
        lambda: iteration(dense, b, loc, raw),
        args.dense_repeats,
        warmup=1,
    )
    r_ds, q1_ds, q3_ds = paired_ratio()

    print(
        f"Sparse network law: {args.rows} x {args.cols} grid, m = {m} node balances, "
        f"n = {n} edge flows, nnz = {A._nnz()}, {args.dtype}, device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print("one iteration = constrain + rsample + log_prob + backward (paired medians)")
    print(f"{'':52s}{'seconds':>10s}{'ratio':>9s}{'quartiles':>17s}")
    print(f"{'unconstrained Normal':52s}{t_u:10.4f}{1.0:9.2f}")
    print(
        f"{'sparse A (CSR) / unconstrained':52s}{t_s:10.4f}{r_su:9.1f}   [{q1_su:.1f}, {q3_su:.1f}]"
    )
    print(f"{'dense A / sparse A':52s}{t_d:10.4f}{r_ds:9.2f}   [{q1_ds:.2f}, {q3_ds:.2f}]")
    print(
        f"{'sparse A, first call (set-up + redundant rows) / later':52s}{t_first:10.4f}"
        f"{t_first / t_s2:9.2f}"
    )


if __name__ == "__main__":
    main()
