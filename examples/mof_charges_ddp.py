r"""Data-parallel training of the MOF charge model with ``DistributedDataParallel``.

The network and the law of ``tutorials/mof_charges.py`` (a gated graph network
predicts a Gaussian per atom; ``plc.LinearConstraint`` conditions it on every
crystal's charges summing to zero), trained with ``torchrun`` on several
processes. What changes against one process:

* every process gets whole crystals: :class:`~pyro_linconstr.infer.DistributedGroupSampler`
  splits each *global* batch of ``--batch`` crystals between the processes
  (balanced by atoms), so the training does not depend on the number of
  processes;
* the objective is wrapped as a module: ``objective(model, guide)`` is Pyro's
  ``ELBOModule`` (its ``forward`` is the differentiable loss), and
  ``DistributedDataParallel`` around it all-reduces the gradients;
* DDP *averages* gradients over processes, so the loss of a process is its sum
  over atoms times ``world_size / atoms in the global batch``: the gradient is
  then that of the per-atom mean over the global batch, as with one process;
* every process draws its own randomness (``seed + rank``); the initial
  network is the same everywhere (DDP broadcasts rank 0's anyway).

Run (``PLC_DATA_DIR`` as for the tutorials)::

    python examples/mof_charges_ddp.py                        # one process
    torchrun --standalone --nproc_per_node 2 examples/mof_charges_ddp.py
    python examples/mof_charges_ddp.py --measure              # 1 vs 2 processes, alpha-beta model

``--objective`` picks ``closed_form`` (default, deterministic: one and several
processes agree up to reduction order), ``marginal``, ``reparam``, ``score``
(the :class:`~pyro_linconstr.infer.ExpectedLoss` estimators) or
``likelihood`` (:class:`~pyro_linconstr.infer.ConstrainedTrace_ELBO`, the
exact likelihood). ``--measure`` launches ``torchrun`` with 1 and 2 processes
(alternately, ``--repeats`` times), compares their results, measures the
all-reduce cost of this machine, and prints the scaling model of the docs page
"Training on several processes or machines"; ``--out`` saves that report.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pyro_linconstr as plc
from pyro_linconstr.datasets import load_mof_charges, split_crystals
from pyro_linconstr.infer import DistributedGroupSampler

CHANNELS, STEPS, LR, INIT_LOG_VARIANCE = 32, 4, 0.005, -7.0  # as in the tutorial


class GatedGraphNet(nn.Module):
    """The tutorial's network: element embedding, gated graph convolution, two heads."""

    def __init__(self, num_elements: int = 74, channels: int = CHANNELS, steps: int = STEPS):
        super().__init__()
        self.embed = nn.Embedding(num_elements, channels)
        self.message = nn.Linear(channels, channels, bias=False)
        self.gru = nn.GRUCell(channels, channels)
        self.mu_head = nn.Linear(channels, 1)
        self.s_head = nn.Linear(channels, 1)
        self.steps = steps
        nn.init.constant_(self.s_head.bias, INIT_LOG_VARIANCE)

    def forward(self, element, edge_index):
        h = torch.sigmoid(self.embed(element))
        src, dst = edge_index
        for _ in range(self.steps):
            m = torch.zeros_like(h).index_add(0, dst, self.message(h)[src])
            h = self.gru(m, h)
        h = torch.relu(h)
        return self.mu_head(h).squeeze(-1), torch.exp(self.s_head(h).squeeze(-1))


class ChargeModel(nn.Module):
    """The Pyro model as a module: the charges ``q`` of a batch of crystals, neutral per crystal."""

    def __init__(self):
        super().__init__()
        self.net = GatedGraphNet()

    def forward(self, bt, y):
        mu, s = self.net(bt["element"], bt["edge_index"])
        G = int(bt["num_groups"])
        law = plc.LinearConstraint(plc.GroupSum(bt["group"], G), mu.new_zeros(G), site="q")
        with law:
            pyro.sample("q", dist.Normal(mu, s.sqrt()).to_event(1), obs=y)


class NoGuide(nn.Module):
    def forward(self, bt, y):
        pass


def make_objective(name: str):
    if name == "likelihood":
        return plc.infer.ConstrainedTrace_ELBO()
    return plc.infer.ExpectedLoss("l1", estimator=name)


# ------------------------------------------------------------------ training
def setup() -> tuple[int, int]:
    """Join the process group torchrun describes (or a group of one); ``(rank, world)``."""
    if "RANK" not in os.environ:  # plain ``python``: a group of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return tdist.get_rank(), tdist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args) -> dict:
    rank, world = setup()
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    torch.distributions.Distribution.set_default_validate_args(False)
    data = load_mof_charges()
    labels = data.neutral_charge().to(dtype)
    sizes = torch.diff(data.node_ptr)  # atoms per crystal
    tr, va, te = split_crystals(data.num_crystals, seed=args.split)
    if args.max_crystals:
        tr, va, te = (
            tr[: args.max_crystals],
            va[: args.max_crystals // 4],
            te[: args.max_crystals // 4],
        )

    def to_device(bt, y):
        if device is None:
            return bt, y
        return {k: v.to(device) for k, v in bt.items()}, y.to(device)

    torch.manual_seed(1000 + args.split)  # the same initial network on every process
    module = make_objective(args.objective)(ChargeModel(), NoGuide())  # ELBOModule
    if device is not None:
        module = module.to(device)
    ddp = DDP(module)
    pyro.set_rng_seed(args.seed + rank)  # every process draws its own noise
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    sampler = DistributedGroupSampler(tr, args.batch, sizes=sizes, seed=args.split)
    epoch_seconds = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        tdist.barrier()
        t0 = time.perf_counter()
        for ids, batch in zip(sampler, sampler.global_batches()):
            bt = data.batch(ids)
            bt, y = to_device(bt, labels[bt["atom"]])
            atoms = int(sizes[batch].sum())  # of the global batch: known without communication
            loss = ddp(bt, y) * (world / atoms)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        # the slowest process sets the pace
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        epoch_seconds.append(float(t))
    net = module.model.net
    result = {
        "world": world,
        "objective": args.objective,
        "dtype": args.dtype,
        "epochs": args.epochs,
        "batch": args.batch,
        "train_crystals": len(tr),
        "steps_per_epoch": len(sampler),
        "epoch_seconds": epoch_seconds,
        "parameters": sum(p.numel() for p in net.parameters()),
        "val": evaluate(net, data, labels, va, rank, world, device),
        "test": evaluate(net, data, labels, te, rank, world, device),
    }
    if args.comm:
        result["allreduce"] = allreduce_seconds(result["parameters"], device)
    if rank == 0 and args.save:
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, args.save)
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(result))
    if rank == 0 and not args.json:
        print(json.dumps(result, indent=1))
    tdist.destroy_process_group()
    return result


@torch.no_grad()
def evaluate(net, data, labels, crystals, rank, world, device) -> dict:
    """MAD and max |net charge| of the conditional mean over ``crystals``, summed over processes."""
    mine = crystals[rank::world]
    sums = torch.zeros(2, dtype=torch.float64)  # |error| sum, atoms
    worst = torch.zeros(1, dtype=torch.float64)  # max |net charge|
    for i in range(0, len(mine), 64):
        bt = data.batch(mine[i : i + 64])
        y = labels[bt["atom"]]
        if device is not None:
            bt = {k: v.to(device) for k, v in bt.items()}
        mu, s = net(bt["element"], bt["edge_index"])
        mu, s = mu.double(), s.double()  # neutral to float64 rounding
        g, G = bt["group"], int(bt["num_groups"])
        A = plc.GroupSum(g, G)
        pred = plc.constrain(dist.Normal(mu, s.sqrt()).to_event(1), A, mu.new_zeros(G)).mean
        pred = pred.double().cpu()
        sums += torch.tensor([float((pred - y.double()).abs().sum()), y.numel()])
        net_charge = torch.zeros(G, dtype=torch.float64).index_add(0, g.cpu(), pred)
        worst = torch.maximum(worst, net_charge.abs().max())
    sums, worst = sums.to(device), worst.to(device)
    tdist.all_reduce(sums)
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
    return {"mad": float(sums[0] / sums[1]), "max_net_charge": float(worst)}


def allreduce_seconds(num_params: int, device, repeats: int = 200) -> dict:
    """Median seconds of an all_reduce of 1 float and of the gradient (``num_params`` floats)."""
    out = {}
    for name, numel in (("latency_1_float", 1), ("gradient", num_params), ("4MB", 1 << 20)):
        x = torch.ones(numel, dtype=torch.float32, device=device)
        times = []
        for i in range(repeats + 10):
            tdist.barrier()
            t0 = time.perf_counter()
            tdist.all_reduce(x)
            if device is not None:
                torch.cuda.synchronize()
            if i >= 10:
                times.append(time.perf_counter() - t0)
        t = torch.tensor([statistics.median(times)], dtype=torch.float64)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        out[name] = {"floats": numel, "seconds": float(t)}
    return out


# ------------------------------------------------------------ the measurement
def command(args, json_path: str, save: str, nproc: int | None = None, comm: bool = False):
    """This script as a command: under ``torchrun`` with ``nproc`` processes, or plain python."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [__file__, "--json", json_path, "--save", save, "--epochs", str(args.epochs)]
    cmd += ["--batch", str(args.batch), "--objective", args.objective, "--dtype", args.dtype]
    if args.max_crystals:
        cmd += ["--max-crystals", str(args.max_crystals)]
    if comm:
        cmd.append("--comm")
    return cmd


def run_all(cmds: list[list[str]]) -> None:
    """Run the commands at the same time (one thread each) and wait for all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in cmds]
    for p, c in zip(procs, cmds):
        if p.wait() != 0:
            raise RuntimeError(f"failed ({p.returncode}): {' '.join(c)}")


def measure(args) -> str:
    """1 process, 2 DDP processes, and 2 independent 1-process runs at once, alternately."""
    load_before = os.getloadavg()
    runs: dict[str, list] = {"1": [], "2": [], "pair": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for kind in ("1", "2", "pair"):  # alternate: a busy spell of the machine hits all
                f = [f"{tmp}/{kind}_{rep}_{k}" for k in "ab"]
                if kind == "pair":
                    run_all([command(args, x + ".json", x + ".pt") for x in f])
                else:
                    comm = kind == "2" and rep == 0
                    run_all([command(args, f[0] + ".json", f[0] + ".pt", int(kind), comm)])
                for x in f[: 2 if kind == "pair" else 1]:
                    runs[kind].append((json.loads(Path(x + ".json").read_text()), x + ".pt"))
        state = {k: [torch.load(pt) for _, pt in v] for k, v in runs.items()}
    load_after = os.getloadavg()
    r1, r2 = runs["1"][0][0], runs["2"][0][0]

    def epoch_time(kind):  # median seconds per epoch; the first epoch of every run is warm-up
        return statistics.median(t for r, _ in runs[kind] for t in r["epoch_seconds"][1:])

    t1, t2, tp = epoch_time("1"), epoch_time("2"), epoch_time("pair")
    p1, p2 = state["1"][0], state["2"][0]
    diff = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    scale = max(float(p1[k].abs().max()) for k in p1)
    same1 = all(torch.equal(p1[k], q[k]) for q in state["1"] + state["pair"] for k in p1)
    same2 = all(torch.equal(p2[k], q[k]) for q in state["2"] for k in p2)
    P = r1["parameters"]
    comm = r2["allreduce"]
    grad_s = comm["gradient"]["seconds"]
    lines = [
        "MOF charges under DistributedDataParallel (examples/mof_charges_ddp.py --measure)",
        f"objective {r1['objective']}, {r1['dtype']}, {r1['train_crystals']} training crystals, "
        f"global batch {r1['batch']} crystals, {r1['steps_per_epoch']} steps per epoch, "
        f"{r1['epochs']} epochs per run, gloo on CPU, 1 thread per process",
        f"machine: {os.cpu_count()} cores shared with other jobs, load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after; {args.repeats} rounds of "
        "(1 process, 2 DDP processes, 2 independent 1-process runs at once)",
        "",
        "same results, one process vs two (the same global batches):",
        f"  parameters after training: max |difference| {diff:.2e} (largest |parameter| "
        f"{scale:.2f}); every 1-process run bit-identical: {same1}; every 2-process run "
        f"bit-identical: {same2}",
        f"  validation MAD  {r1['val']['mad']:.6f} (1 process)  {r2['val']['mad']:.6f} (2)",
        f"  test MAD        {r1['test']['mad']:.6f} (1 process)  {r2['test']['mad']:.6f} (2)",
        f"  max |net charge| of a predicted test crystal {r1['test']['max_net_charge']:.1e} / "
        f"{r2['test']['max_net_charge']:.1e} e",
        "",
        "time per training epoch (median over epochs 2.. of every run):",
        f"  1 process                                 {t1:.3f} s",
        f"  2 processes, DDP                          {t2:.3f} s   ratio 2 / 1 = {t2 / t1:.3f}, "
        f"speed-up {t1 / t2:.2f}x",
        f"  2 independent 1-process runs at once      {tp:.3f} s each: this machine does two "
        f"epochs in {tp:.3f} s,",
        f"      so the best 2 processes can do here is {tp / 2:.3f} s per epoch (speed-up "
        f"{t1 / (tp / 2):.2f}x); DDP reaches {100 * (tp / 2) / t2:.0f}% of it",
        f"  gradient all-reduce: {r1['steps_per_epoch']} steps x {grad_s * 1e6:.0f} us = "
        f"{r1['steps_per_epoch'] * grad_s:.3f} s per epoch if none of it overlapped the backward",
        "",
        "communication per step:",
        f"  DDP all-reduces the gradient: {P} parameters x 4 bytes = {4 * P} bytes "
        f"({4 * P / 1024:.1f} KiB, one bucket); the atom count of the global batch comes "
        "from the sampler, without communication",
        f"  a ring all-reduce sends and receives 2 (W - 1) / W x {4 * P} bytes per process "
        f"({4 * P} bytes at W = 2)",
        "  measured gloo all_reduce on this machine (2 processes, median of 200): "
        + ", ".join(
            f"{k} ({v['floats']} floats) {v['seconds'] * 1e6:.0f} us" for k, v in comm.items()
        ),
    ]
    lines += scaling_model(t1, r1, P, comm)
    return "\n".join(lines)


def scaling_model(t1: float, r1: dict, P: int, comm: dict) -> list[str]:
    """The alpha-beta model of an epoch on W processes, from the one-process epoch."""
    per_crystal = t1 / r1["train_crystals"]
    M = 4 * P
    # this machine: a 4 MB all-reduce is bandwidth-bound, a 1-float one latency-bound
    a_here = comm["latency_1_float"]["seconds"] / 2  # ring, W = 2: 2 (W - 1) = 2 latencies
    b_here = max(comm["4MB"]["seconds"] - 2 * a_here, 1e-12) / (4 << 20)  # 2 (W-1)/W = 1
    nets = [  # label, alpha (s), beta (s/byte), algorithm
        ("gloo here, ring", a_here, b_here, "ring"),
        ("10GbE, ring", 50e-6, 1 / 1.0e9, "ring"),
        ("10GbE, tree", 50e-6, 1 / 1.0e9, "tree"),
        ("IB 200G, ring", 5e-6, 1 / 20e9, "ring"),
    ]

    def allreduce(W, a, b, algorithm):
        if W == 1:
            return 0.0
        if algorithm == "tree":
            return 2 * math.log2(W) * a + 2 * M * b
        return 2 * (W - 1) * a + 2 * (W - 1) / W * M * b

    out = [
        "",
        "scaling model (alpha-beta; the inputs below, nothing measured at W > 2):",
        f"  t_c = compute per crystal = (one-process epoch) / (training crystals) = "
        f"{per_crystal * 1e3:.3f} ms (this CPU, 1 thread, batching and optimizer included)",
        "  global batch B = max(32, 16 W) crystals: kept at 32 while every process has >= 16,",
        "  then 16 per process (steps per epoch N / B fall as 1 / W)",
        f"  epoch = (N / B) x [ (B / W) t_c x imbalance + T_allreduce(W, M) ],  M = {M} bytes",
        "  ring: T = 2 (W - 1) alpha + 2 (W - 1) / W M beta;  tree: T = 2 log2(W) alpha + 2 M beta",
        f"  alpha, beta: gloo here = measured ({a_here * 1e6:.0f} us, "
        f"{1 / b_here / 1e9:.2f} GB/s); 10GbE assumed 50 us, 1 GB/s; "
        "InfiniBand 200 Gb/s assumed 5 us, 20 GB/s",
        "  imbalance = mean over steps of (atoms of the fullest process) / (mean atoms per "
        "process),",
        "  from the MOF crystal sizes: size-balanced shares (the sampler's rule, used) and "
        "plain equal counts",
        "  efficiency = (N t_c / W) / modelled epoch",
    ]
    sizes = _mof_sizes()
    for N, label in ((r1["train_crystals"], "the MOF training set"), (500_000, "500,000 crystals")):
        out += ["", f"  {label} (N = {N}), seconds per epoch (efficiency):"]
        out.append(
            f"  {'W':>4s} {'B':>5s} {'steps':>6s} {'imbal':>6s} {'plain':>6s} {'compute':>8s} "
            + " ".join(f"{n:>18s}" for n, *_ in nets)
        )
        for W in (1, 2, 8, 64, 512):
            B = max(r1["batch"], 16 * W)
            steps = N / B
            if steps < 1:
                out.append(
                    f"  {W:4d} {B:5d} {steps:6.2f}  fewer than one step per epoch: the data set "
                    "stops the scaling"
                )
                continue
            imb, plain = _imbalance(sizes, B, W, True), _imbalance(sizes, B, W, False)
            compute = steps * (B / W) * per_crystal * imb
            ideal = N * per_crystal / W
            cells = []
            for _, a, b, algorithm in nets:
                total = compute + steps * allreduce(W, a, b, algorithm)
                cells.append(f"{total:8.3g} ({100 * ideal / total:3.0f}%)")
            out.append(
                f"  {W:4d} {B:5d} {steps:6.0f} {imb:6.3f} {plain:6.3f} {compute:8.3g} "
                + " ".join(f"{c:>18s}" for c in cells)
            )
    out += [
        "",
        "  with 16 crystals per process, the ring's latency 2 (W - 1) alpha equals the compute "
        "of a step (16 t_c) at",
        "  W = 1 + 8 t_c / alpha: "
        + "; ".join(f"{n.split(',')[0]} {1 + 8 * per_crystal / a:.0f}" for n, a, _, _ in nets[:2])
        + f"; InfiniBand {1 + 8 * per_crystal / nets[3][1]:.0f}",
    ]
    return out


def _mof_sizes() -> torch.Tensor:
    return torch.diff(load_mof_charges().node_ptr).double()


def _imbalance(
    sizes: torch.Tensor, batch: int, world: int, balanced: bool, steps: int = 20
) -> float:
    """Mean over ``steps`` random global batches of (max atoms of a process) / (mean atoms).

    ``balanced``: DistributedGroupSampler's size-balanced rule (largest crystal first to the
    least-loaded process), computed for all processes at once; else its plain rule
    (contiguous, near-equal numbers of crystals).
    """
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(steps):
        w = sizes[torch.randint(sizes.numel(), (batch,), generator=g)]
        if balanced:
            heap = [(0.0, 0, r) for r in range(world)]
            for x in w.sort(descending=True).values.tolist():
                load, count, r = heapq.heappop(heap)
                heapq.heappush(heap, (load + x, count + 1, r))
            loads = [h[0] for h in heap]
        else:
            loads = [float(part.sum()) for part in w.tensor_split(world)]
        ratios.append(max(loads) / statistics.mean(loads))
    return statistics.mean(ratios)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objective", default="closed_form")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="crystals per global batch")
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--max-crystals", type=int, default=0, help="0: every training crystal")
    p.add_argument("--json", help="write rank 0's result here")
    p.add_argument("--save", help="save the trained network's state here")
    p.add_argument("--comm", action="store_true", help="also time all_reduce")
    p.add_argument("--measure", action="store_true", help="1 vs 2 processes and the model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="--measure: save the report here")
    args = p.parse_args(argv)
    if args.measure:
        report = measure(args)
        print(report)
        if args.out:
            Path(args.out).write_text(report + "\n")
    else:
        train(args)


if __name__ == "__main__":
    main()
