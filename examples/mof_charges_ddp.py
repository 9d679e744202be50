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
def launch(nproc: int, args, json_path: str, save: str, comm: bool) -> dict:
    """Run this script under ``torchrun --standalone --nproc_per_node nproc``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", __file__, "--json", json_path, "--save", save]
    cmd += ["--epochs", str(args.epochs), "--batch", str(args.batch)]
    cmd += ["--objective", args.objective, "--dtype", args.dtype]
    if args.max_crystals:
        cmd += ["--max-crystals", str(args.max_crystals)]
    if comm:
        cmd.append("--comm")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(Path(json_path).read_text())


def measure(args) -> str:
    runs = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for w in (1, 2):  # alternate, so that a busy spell of the machine hits both
                j, s = f"{tmp}/{w}_{rep}.json", f"{tmp}/{w}_{rep}.pt"
                runs[w].append((launch(w, args, j, s, comm=(w == 2 and rep == 0)), s))
        p1 = torch.load(runs[1][0][1])
        p2 = torch.load(runs[2][0][1])
        rerun = torch.load(runs[1][1][1]) if args.repeats > 1 else None
    r1, r2 = runs[1][0][0], runs[2][0][0]
    # per-epoch seconds, the first epoch of every run left out (warm-up)
    e1 = [t for r, _ in runs[1] for t in r["epoch_seconds"][1:]]
    e2 = [t for r, _ in runs[2] for t in r["epoch_seconds"][1:]]
    t1, t2 = statistics.median(e1), statistics.median(e2)
    diff = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    scale = max(float(p1[k].abs().max()) for k in p1)
    same = rerun is not None and all(torch.equal(p1[k], rerun[k]) for k in p1)
    P = r1["parameters"]
    comm = r2["allreduce"]
    lines = [
        "MOF charges under DistributedDataParallel (examples/mof_charges_ddp.py --measure)",
        f"objective {r1['objective']}, {r1['dtype']}, {r1['train_crystals']} training crystals, "
        f"global batch {r1['batch']} crystals, {r1['steps_per_epoch']} steps per epoch, "
        f"{r1['epochs']} epochs, gloo on CPU, 1 thread per process, "
        f"{os.cpu_count()} cores, {args.repeats} alternating runs per process count",
        "",
        "same results, one process vs two (the same global batches):",
        f"  parameters: max |difference| {diff:.2e} (largest |parameter| {scale:.2f}); "
        f"one process run twice: {'bit-identical' if same else 'not compared'}",
        f"  validation MAD  {r1['val']['mad']:.6f} (1 process)  {r2['val']['mad']:.6f} (2)",
        f"  test MAD        {r1['test']['mad']:.6f} (1 process)  {r2['test']['mad']:.6f} (2)",
        f"  max |net charge| of a predicted test crystal {r1['test']['max_net_charge']:.1e} / "
        f"{r2['test']['max_net_charge']:.1e}",
        "",
        "time per training epoch (median over epochs 2.. of every run):",
        f"  1 process {t1:.3f} s, 2 processes {t2:.3f} s: ratio 2 / 1 = {t2 / t1:.3f} "
        f"(speed-up {t1 / t2:.2f}x)",
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
    steps1 = r1["steps_per_epoch"]
    compute_step = t1 / steps1  # one process, a whole global batch
    per_crystal = compute_step / r1["batch"]
    M = 4 * P
    # this machine: a 4 MB all-reduce is bandwidth-bound, a 1-float one latency-bound
    a_here = comm["latency_1_float"]["seconds"] / 2  # ring, W = 2: 2 (W - 1) = 2 latencies
    b_here = max(comm["4MB"]["seconds"] - 2 * a_here, 1e-12) / (4 << 20)  # 2 (W-1)/W = 1
    nets = [
        ("this machine (gloo, shared memory)", a_here, b_here),
        ("assumed 10 Gb/s Ethernet (gloo/TCP)", 50e-6, 1 / 1.0e9),
        ("assumed 200 Gb/s InfiniBand (nccl)", 5e-6, 1 / 20e9),
    ]
    out = [
        "",
        "scaling model (alpha-beta, ring all-reduce; assumptions stated, not measured at W > 2):",
        f"  compute per crystal t_c = (one-process epoch) / (training crystals) = "
        f"{per_crystal * 1e3:.3f} ms (this CPU, 1 thread); per-process work divides by W,",
        "  the global batch is kept (strong scaling) while every process has >= 16 crystals,",
        "  then grows as 16 W crystals per step (weak scaling; steps per epoch = N / (16 W));",
        "  ring all-reduce of M bytes on W processes: T = 2 (W - 1) alpha + 2 (W - 1) / W M beta,",
        f"  M = {M} bytes; a tree (nccl's choice for small messages) pays 2 log2(W) alpha instead;",
        "  load imbalance: the slowest process of a step (max/mean of its atoms) from the sampler,",
        "  measured on the MOF sizes; data loading and the optimizer step are in t_c.",
    ]
    sizes = _mof_sizes()
    for N, label in ((r1["train_crystals"], "the MOF training set"), (500_000, "500,000 crystals")):
        out += ["", f"  {label} (N = {N}):"]
        out += [
            f"  {'W':>5s} {'batch':>7s} {'steps':>7s} {'imbal':>6s} {'compute s':>10s} "
            + " ".join(f"{n.split(' (')[0][:24]:>26s}" for n, _, _ in nets)
        ]
        for W in (1, 2, 8, 64, 512):
            B = max(r1["batch"], 16 * W)
            steps = N / B
            if steps < 1:
                out.append(
                    f"  {W:5d} {B:7d} {steps:7.2f}  global batch > data set: stops scaling here"
                )
                continue
            imb = _imbalance(sizes, B, W)
            compute = steps * (B / W) * per_crystal * imb
            cells = []
            for _, a, b in nets:
                ring = 2 * (W - 1) * a + 2 * (W - 1) / W * M * b if W > 1 else 0.0
                total = compute + steps * ring
                ideal = N * per_crystal / W
                cells.append(f"{total:9.3g} s ({100 * ideal / total:3.0f}% eff)")
            out.append(
                f"  {W:5d} {B:7d} {steps:7.0f} {imb:6.2f} {compute:10.3g} "
                + " ".join(f"{c:>26s}" for c in cells)
            )
    stop = {}
    for name, a, _ in nets:
        # per step: compute of 16 crystals vs ring latency: 2 (W - 1) a = 16 t_c  (50% efficiency)
        stop[name] = 1 + 16 * per_crystal / (2 * a)
    out += [
        "",
        "  efficiency = (N t_c / W) / modelled time. With 16 crystals per process the ring's "
        "latency",
        "  equals the compute of a step at W = 1 + 16 t_c / (2 alpha): "
        + "; ".join(f"{n.split(' (')[0]} W = {w:.0f}" for n, w in stop.items()),
    ]
    return out


def _mof_sizes() -> torch.Tensor:
    return torch.diff(load_mof_charges().node_ptr).double()


def _imbalance(sizes: torch.Tensor, batch: int, world: int, steps: int = 20) -> float:
    """Mean over ``steps`` random global batches of (max atoms of a process) / (mean atoms).

    The shares follow DistributedGroupSampler's size-balanced rule (largest crystal first
    to the least-loaded process), computed for all processes at once.
    """
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(steps):
        w = sizes[torch.randint(sizes.numel(), (batch,), generator=g)].sort(descending=True)
        heap = [(0.0, 0, r) for r in range(world)]
        for x in w.values.tolist():
            load, count, r = heapq.heappop(heap)
            heapq.heappush(heap, (load + x, count + 1, r))
        loads = [h[0] for h in heap]
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
    p.add_argument("--repeats", type=int, default=2)
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
