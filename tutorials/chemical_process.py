"""
Mass-balance-consistent surrogates of chemical processes
========================================================

A surrogate model ``y = f(x)`` of a steady-state process simulation must
respect the mass balance ``A x + B y = 0``: for every input ``x`` the outputs
lie on the affine subspace ``B y = -A x``. Unlike the charge tutorial, the
right-hand side ``b = -A x`` is **different for every data point**; with
``plc.constrain`` this is just a batch of ``b`` vectors, ``(N, m)``, against
one matrix ``B`` ``(m, ny)``.

Three Aspen Plus benchmarks published with KKT-hPINN (Chen, Constante Flores &
Li, *Comput. Chem. Eng.* 189 (2024) 108764): a CSTR, a DME/DEE plant and a
distillation train. We compare

* **NN**: an MLP trained by mean squared error (MSE), unconstrained;
* **PINN**: MSE plus a soft penalty ``lambda |B y + A x|^2``;
* **KKT-hPINN**: the MLP output orthogonally projected onto ``B y = -A x``
  (a differentiable projection layer), trained by MSE;
* **constrained reparametrization**: the MLP outputs a heteroscedastic
  Gaussian ``N(mu(x), diag s(x))``, conditioned on ``B y = -A x``; trained by
  the squared error of an exact constrained sample (pathwise gradients);
* **constrained distribution** (the method), same model, trained either by the
  closed-form expected squared error ``sum_i (m_i - y_i)^2 + v_i`` under the
  conditional marginals, or by the exact constrained likelihood
  ``-log p(y | B y = -A x)``.

Every constrained model predicts with the conditional mean
``E[y | B y = -A x]``, which satisfies the mass balance exactly. Every method
gets the same budget in **optimiser steps** (not epochs: the benchmarks have
different numbers of training rows) and the same stopping rule on the
validation MSE, so that each is trained to convergence. Test MSE on
MaxAbs-scaled outputs (x 1e-4), mean ± std over runs (one random 60/20/20
split and initialisation per run, shared by all methods), beside the paper's
table, and paired differences against KKT-hPINN. ``PLC_SMOKE=1`` runs a short
version.
"""

# %%
# Setup
# -----
# Environment switches (all optional): ``PLC_CHEM_BENCHMARKS=plant,cstr`` and
# ``PLC_CHEM_METHODS=kkt,expected_l2`` run subsets; ``PLC_CHEM_RUNS`` runs
# (default 10) starting at run ``PLC_CHEM_FIRST_RUN`` (default 0);
# ``PLC_CHEM_STEPS`` the step budget (default 15,000), ``PLC_CHEM_EVAL_EVERY``
# (100), ``PLC_CHEM_PATIENCE`` (10) and ``PLC_CHEM_LR_DROPS`` (2) the stopping
# rule (below); ``PLC_TAG`` a suffix of the output files. The runs of each
# method are appended to ``output/chemical_process_converged_<mode><tag>.jsonl``
# as soon as they finish, so a long run can be split into pieces (one tag
# each, e.g. one benchmark each); ``PLC_CHEM_MERGE=1`` trains nothing and
# reports on all ``chemical_process_converged_full*.jsonl`` files in
# ``output/`` (copy the pieces there), refusing pieces run with other settings
# and runs recorded twice.

import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_linconstr as plc
from pyro_linconstr._tutorial import env_flag, env_int, env_subset, output_dir, smoke_mode
from pyro_linconstr.datasets import load_chemprocess, split_rows

SMOKE = smoke_mode()  # PLC_SMOKE=1 (or true/yes/on): a quick run
MERGE = env_flag("PLC_CHEM_MERGE")  # report on the pieces' records, train nothing
RUNS = env_int("PLC_CHEM_RUNS", 2 if SMOKE else 10, minimum=1)
FIRST_RUN = env_int("PLC_CHEM_FIRST_RUN", 0)
STEPS = env_int("PLC_CHEM_STEPS", 400 if SMOKE else 15_000, minimum=1)
EVAL_EVERY = env_int("PLC_CHEM_EVAL_EVERY", 25 if SMOKE else 100, minimum=1)
PATIENCE = env_int("PLC_CHEM_PATIENCE", 3 if SMOKE else 10, minimum=1)
LR_DROPS = env_int("PLC_CHEM_LR_DROPS", 2)
BATCH, LR, HIDDEN, PENALTY = 64, 1e-3, 64, 1.0
MIN_DELTA = 0.01  # an evaluation improves on the best by at least 1 %
INIT_LOG_VARIANCE = -9.2  # about log 1e-4; see the models below
OUT = output_dir(globals().get("__file__"))  # tutorials/output/
MODE = ("smoke" if SMOKE else "full") + os.environ.get("PLC_TAG", "")
CONFIG = {  # what makes runs comparable: pieces are merged only if these agree
    "steps": STEPS,
    "eval_every": EVAL_EVERY,
    "patience": PATIENCE,
    "lr_drops": LR_DROPS,
    "min_delta": MIN_DELTA,
    "batch": BATCH,
    "lr": LR,
    "hidden": HIDDEN,
    "penalty": PENALTY,
}
# process-wide settings, restored at the end (sphinx-gallery runs every
# tutorial in one process)
_saved = (
    torch.get_num_threads(),
    torch.get_default_dtype(),
    torch.distributions.Distribution._validate_args,
)
torch.set_num_threads(env_int("PLC_THREADS", 1, minimum=1))
torch.set_default_dtype(torch.float64)
torch.distributions.Distribution.set_default_validate_args(False)

# %%
# The data and the law on scaled columns
# --------------------------------------
# Each column is divided by its largest absolute value (MaxAbs scaling over the
# whole file, ``x = Dx x'``, ``y = Dy y'``); the law stays linear,
# ``(B Dy) y' = -(A Dx) x'``. The loader gives both matrices.

ALL_BENCHMARKS = ["cstr", "plant", "distillation"]
BENCHMARKS = env_subset("PLC_CHEM_BENCHMARKS", ALL_BENCHMARKS)
data = {} if MERGE else {name: load_chemprocess(name) for name in BENCHMARKS}
for name, d in data.items():
    print(
        f"{name:12s} rows {d.x.shape[0]:5d}  nx {d.x.shape[1]}  ny {d.y.shape[1]}  "
        f"constraints {d.A.shape[0]}  "
        f"max relative residual {float(d.relative_residual().max()):.1e}"
    )

# %%
# Models
# ------
# One MLP body (two hidden layers of 64 ReLU units) with a mean head and, for
# the probabilistic models, a log-variance head ``s = exp(.)``.
#
# The conditional mean depends on the *ratios* of the variances, and the
# closed-form expected squared error ``(m_i - y_i)^2 + v_i`` keeps shrinking
# their overall scale. A floored head such as ``softplus(.) + 1e-8`` lets the
# scale sink to the floor, where the ratios are lost; ``exp`` keeps them at any
# scale. The head's bias starts at ``log 1e-4`` (about -9.2), the squared
# error a trained surrogate reaches on the scaled outputs, not at
# ``exp(0) = 1``, far above it.


class Surrogate(nn.Module):
    def __init__(self, nx: int, ny: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(nx, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.mu = nn.Linear(HIDDEN, ny)
        self.s = nn.Linear(HIDDEN, ny)
        nn.init.constant_(self.s.bias, INIT_LOG_VARIANCE)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), torch.exp(self.s(h))


# %%
# The runs are trained side by side: ``Runs`` holds ``R`` independent
# surrogates, each weight with a leading run dimension, and maps inputs
# ``(R, N, nx)`` to ``(R, N, ny)`` with batched matrix products. The loss is
# the sum of the runs' losses, so every run gets exactly its own gradient; on
# one CPU thread a step of ten small networks costs little more than a step of
# one (the cost is per-call overhead, not arithmetic).


class Runs(nn.Module):
    def __init__(self, nets: list[Surrogate]):
        super().__init__()
        layers = [[n.body[0], n.body[2], n.mu, n.s] for n in nets]
        self.w = nn.ParameterList(
            nn.Parameter(torch.stack([ls[j].weight.detach().T for ls in layers])) for j in range(4)
        )
        self.b = nn.ParameterList(
            nn.Parameter(torch.stack([ls[j].bias.detach() for ls in layers]).unsqueeze(1))
            for j in range(4)
        )

    def forward(self, x):
        h = torch.relu(torch.baddbmm(self.b[0], x, self.w[0]))
        h = torch.relu(torch.baddbmm(self.b[1], h, self.w[1]))
        mu = torch.baddbmm(self.b[2], h, self.w[2])
        return mu, torch.exp(torch.baddbmm(self.b[3], h, self.w[3]))


# %%
# The surrogate as a Pyro model with a per-row law
# ------------------------------------------------
# Each row ``i`` of a mini-batch gets its own right-hand side
# ``b_i = -A x_i``: ``b`` has shape ``(R, N, m)`` (runs, rows) against one
# ``B`` ``(m, ny)``, and ``plc.LinearConstraint`` broadcasts it against the
# plates of runs and rows. The observed site's distribution becomes
# ``N(mu(x), diag s(x))`` conditioned on ``B y = b_i``.

net = None  # the networks of the current runs


def surrogate_model(x, B, b, y=None):
    pyro.module("mlp", net)
    mu, s = net(x)
    with (
        pyro.plate("runs", x.shape[0], dim=-2),
        pyro.plate("rows", x.shape[1], dim=-1),
        plc.LinearConstraint(B, b, site="y"),
    ):
        return pyro.sample("y", dist.Normal(mu, s.sqrt()).to_event(1), obs=y)


def no_guide(x, B, b, y=None):
    pass


def constrained(mu, s, B, b):
    """``N(mu, diag s)`` conditioned on ``B y = b``, one ``b`` per row: batch (R, N)."""
    return plc.constrain(dist.Normal(mu, s.sqrt()).to_event(1), B, b)


OBJECTIVES = {  # summed over runs and rows; divided by the batch size below
    "cr": plc.infer.ExpectedLoss("l2", estimator="reparam"),
    "expected_l2": plc.infer.ExpectedLoss("l2", estimator="closed_form"),
    "likelihood": pyro.infer.Trace_ELBO(),
}


def training_loss(method, x, y, B, b):
    """The sum over runs of each run's mean loss over its mini-batch of rows."""
    rows = x.shape[1]
    if method in OBJECTIVES:
        return OBJECTIVES[method].differentiable_loss(surrogate_model, no_guide, x, B, b, y) / rows
    mu, _ = net(x)
    if method == "nn":
        return ((mu - y) ** 2).sum() / rows
    if method == "pinn":
        penalty = ((mu @ B.T - b) ** 2).sum()
        return (((mu - y) ** 2).sum() + PENALTY * penalty) / rows
    if method == "kkt":  # a differentiable projection layer
        return ((plc.project(mu, B, b) - y) ** 2).sum() / rows
    raise ValueError(method)


def predict(method, mu, s, B, b):
    if method in ("nn", "pinn"):
        return mu
    if method == "kkt":
        return plc.project(mu, B, b)
    return constrained(mu, s, B, b).mean


LABELS = {
    "nn": "NN (unconstrained)",
    "pinn": "PINN (soft penalty)",
    "kkt": "KKT-hPINN (orthogonal projection)",
    "cr": "constrained reparametrization",
    "expected_l2": "constrained distribution, closed-form E[MSE]",
    "likelihood": "constrained distribution, exact likelihood",
}
PAPER = {  # test MSE x 1e-4, mean ± std over 10 runs (the paper's Table 20)
    "nn": ("18.3 ± 20.8", "0.34 ± 0.64", "1.99 ± 0.67"),
    "pinn": ("260.8 ± 20.4", "3.62 ± 1.94", "40.9 ± 10.7"),
    "kkt": ("11.7 ± 20.3", "0.11 ± 0.04", "2.02 ± 0.94"),
    "cr": ("7.13 ± 3.22", "0.14 ± 0.07", "2.22 ± 0.94"),
    "expected_l2": ("4.31 ± 1.58", "0.09 ± 0.05", "1.73 ± 0.70"),
    "likelihood": ("4.31 ± 1.58", "0.09 ± 0.05", "1.73 ± 0.70"),
}
# PLC_CHEM_METHODS=kkt,likelihood runs a subset
METHODS = env_subset("PLC_CHEM_METHODS", LABELS)


# %%
# Training to convergence with a budget in steps
# ----------------------------------------------
# Adam (learning rate 1e-3), mini-batches of 64 rows, at most ``STEPS``
# optimiser steps for every method and benchmark. Every ``EVAL_EVERY`` steps
# the validation MSE is measured and the best parameters so far are kept. An
# evaluation *improves* if it is at least 1 % below the best so far; after
# ``PATIENCE`` evaluations without improvement the learning rate is divided by
# 10 (at most ``LR_DROPS`` times), and after the next such plateau the run
# stops: further steps no longer lower the validation error, the run has
# converged. A run that reaches ``STEPS`` first stops there (reported as
# "budget"). The test MSE is that of the kept parameters. Run ``k`` uses split
# seed ``k`` and the same initial network for every method, so that methods
# can be compared run by run.


def batches(rows, gen):
    """Mini-batches of ``rows``, reshuffled every epoch, without end."""
    while True:
        perm = rows[torch.randperm(len(rows), generator=gen)]
        yield from perm.split(BATCH)


def train(name, method, seeds):
    """Train run ``k`` for every ``k`` in ``seeds`` (side by side); one record per run."""
    d = data[name]
    xs, ys = d.x_scaled, d.y_scaled
    B = d.B_scaled
    b = d.rhs(xs)  # (N, m): B y' = -A x' for every row
    # the CSVs are rounded (relative residual up to 4e-7): the observed site of a
    # constrained model needs targets on the subspace, so train on their
    # orthogonal projection (a change far below the test errors); test on raw y'
    ys_train = plc.project(ys, B, b)
    splits = [split_rows(xs.shape[0], seed=k) for k in seeds]
    tr, va, te = (torch.stack(rows) for rows in zip(*splits))  # (R, rows) each
    nets = []
    for k in seeds:  # run k: the same initial network for every method
        torch.manual_seed(k)
        nets.append(Surrogate(xs.shape[1], ys.shape[1]))
    global net
    pyro.clear_param_store()
    net = model = Runs(nets)
    params = list(model.parameters())
    # Adam with learning rate 1 gives each step's direction; the step of run r
    # is that direction times run r's own learning rate (Adam is elementwise,
    # so this is one Adam per run; a run that has stopped gets rate 0)
    opt = torch.optim.Adam(params, lr=1.0)
    lr = torch.full((len(seeds), 1, 1), LR)
    streams = [batches(tr[r], torch.Generator().manual_seed(k)) for r, k in enumerate(seeds)]

    def mse(rows):
        with torch.no_grad():
            mu, s = model(xs[rows])
            pred = predict(method, mu, s, B, b[rows])
        return ((pred - ys[rows]) ** 2).mean((-2, -1)), pred

    R = len(seeds)
    best = torch.full((R,), math.inf)
    best_params = [p.detach().clone() for p in params]
    best_step, stop_step = [0] * R, [0] * R
    waited, stop = [0] * R, ["budget"] * R
    curves, drop_steps = [[] for _ in range(R)], [[] for _ in range(R)]
    running = torch.ones(R, dtype=torch.bool)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(1, STEPS + 1):
        idx = torch.stack([next(stream) for stream in streams])  # (R, rows of a batch)
        loss = training_loss(method, xs[idx], ys_train[idx], B, b[idx])
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, p0 in zip(params, before):
                p.copy_(torch.lerp(p0, p, lr))  # p0 + lr (p - p0)
        if step % EVAL_EVERY and step < STEPS:
            continue
        val, _ = mse(va)
        for r in running.nonzero().flatten().tolist():
            v = float(val[r])
            curves[r].append(v)
            waited[r] = 0 if v < (1 - MIN_DELTA) * float(best[r]) else waited[r] + 1
            if v < best[r]:
                best[r], best_step[r] = v, step
                for p, q in zip(params, best_params):
                    q[r] = p.detach()[r]
            stop_step[r] = step
            if waited[r] == PATIENCE:
                if len(drop_steps[r]) == LR_DROPS:
                    stop[r], running[r], lr[r] = "plateau", False, 0.0
                else:
                    drop_steps[r].append(step)
                    waited[r], lr[r] = 0, lr[r] / 10
        if not running.any():
            break
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    with torch.no_grad():
        for p, q in zip(params, best_params):
            p.copy_(q)
    test, pred = mse(te)
    viol = (pred @ B.T - b[te]).abs().amax((-2, -1))
    return [
        {
            "benchmark": name,
            "method": method,
            "run": k,
            "test_mse": float(test[r]),
            "violation": float(viol[r]),
            "best_step": best_step[r],
            "stop_step": stop_step[r],
            "stop": stop[r],
            "lr_drop_steps": drop_steps[r],
            "curve": curves[r],
            "runs_together": R,
            "steps_together": step,
            "seconds_together": seconds,
            "cpu_seconds_together": cpu_seconds,
            "config": CONFIG,
        }
        for r, k in enumerate(seeds)
    ]


# %%
# Run
# ---
# The runs of a method are written as JSON lines as soon as they finish, so an
# interrupted piece keeps what it finished.


def load_records(files):
    """The runs recorded in ``files``; one configuration, no run twice."""
    records, seen = [], {}
    for path in files:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r["config"] != CONFIG:
                raise ValueError(
                    f"{path.name} was run with {r['config']}, not with this run's {CONFIG}: "
                    "set PLC_CHEM_STEPS / PLC_CHEM_EVAL_EVERY / PLC_CHEM_PATIENCE / "
                    "PLC_CHEM_LR_DROPS as in that piece, or move the file out of "
                    f"{OUT}."
                )
            key = (r["benchmark"], r["method"], r["run"])
            if key in seen:
                raise ValueError(
                    f"run {key} is in both {seen[key].name} and {path.name}: "
                    f"move one of them out of {OUT}."
                )
            seen[key] = path
            records.append(r)
    return records


if MERGE:
    files = sorted(OUT.glob("chemical_process_converged_full*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"PLC_CHEM_MERGE=1 found no chemical_process_converged_full*.jsonl in {OUT}: "
            "run the pieces first, or copy their records there (docs/results has them)."
        )
    print("merging", ", ".join(p.name for p in files))
    records = load_records(files)
else:
    records_file = OUT / f"chemical_process_converged_{MODE}.jsonl"
    records_file.write_text("")
    records = []
    t0 = time.time()
    # KKT-hPINN and the closed form first: an interrupted piece has the pair
    order = sorted(METHODS, key=["kkt", "expected_l2", "nn", "cr", "likelihood", "pinn"].index)
    for name in BENCHMARKS:
        for method in order:
            done = train(name, method, list(range(FIRST_RUN, FIRST_RUN + RUNS)))
            records += done
            with records_file.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in done)
            for r in done:
                print(
                    f"{name:12s} {method:12s} run {r['run']}: test MSE x1e-4 "
                    f"{1e4 * r['test_mse']:8.4f}  best step {r['best_step']:6d}  "
                    f"stopped at {r['stop_step']:6d} ({r['stop']}; learning rate cut at "
                    f"{r['lr_drop_steps']})"
                )
            print(
                f"{name:12s} {method:12s} {r['runs_together']} runs side by side: "
                f"{r['steps_together']} steps in {r['seconds_together']:.0f} s "
                f"(CPU {1e3 * r['cpu_seconds_together'] / r['steps_together']:.2f} ms/step)",
                flush=True,
            )
    print(f"total {time.time() - t0:.0f} s")

# %%
# Results beside the paper
# ------------------------
# Test MSE x 1e-4 on the scaled outputs, mean ± std over the runs. The
# paper's "constrained distribution" row is repeated for both of our training
# objectives (the paper does not say which one its row used). "viol" is the
# largest ``|B y + A x|`` (scaled units) of any test prediction.

by = {}
for r in records:
    by.setdefault((r["benchmark"], r["method"]), {})[r["run"]] = r
names = [n for n in ALL_BENCHMARKS if any(k[0] == n for k in by)]
methods = [m for m in LABELS if any(k[1] == m for k in by)]
runs = sorted({r["run"] for r in records})


def cell(vals):
    t = 1e4 * torch.tensor(vals)
    sd = float(t.std()) if len(vals) > 1 else float("nan")
    return f"{float(t.mean()):.3g} ± {sd:.2g}"


def median(vals):
    return float(torch.tensor(vals, dtype=torch.float64).median())


head = (
    f"Chemical-process surrogates ({MODE}: runs {runs[0]}-{runs[-1]}, at most {STEPS:,} "
    f"Adam steps of {BATCH} rows, validation every {EVAL_EVERY} steps, patience {PATIENCE}, "
    f"{LR_DROPS} learning-rate drops, float64)"
)
lines = [
    head,
    "test MSE x 1e-4, mean ± std over runs: ours | paper",
    f"{'method':46s}" + "".join(f" {n:>31s}" for n in names) + f" {'max viol':>9s}",
]
for k in methods:
    row = f"{LABELS[k]:46s}"
    for n in names:
        rs = list(by.get((n, k), {}).values())
        ours = cell([r["test_mse"] for r in rs]) if rs else "-"
        row += f" {ours:>16s} |{PAPER[k][ALL_BENCHMARKS.index(n)]:>13s}"
    viol = max(r["violation"] for n in names for r in by.get((n, k), {}).values())
    lines.append(row + f" {viol:9.1e}")

lines += [
    "",
    "convergence: median step of the kept (best) model / median stopping step, "
    "runs stopped by the plateau rule (not the budget), runs",
    f"{'method':46s}" + "".join(f" {n:>31s}" for n in names),
]
for k in methods:
    row = f"{LABELS[k]:46s}"
    for n in names:
        rs = list(by.get((n, k), {}).values())
        if not rs:
            row += f" {'-':>31s}"
            continue
        best = median([r["best_step"] for r in rs])
        stop = median([r["stop_step"] for r in rs])
        plateau = sum(r["stop"] == "plateau" for r in rs)
        row += f" {f'{best:,.0f} / {stop:,.0f}, {plateau}/{len(rs)}':>31s}"
    lines.append(row)

if "kkt" in methods:
    lines += [
        "",
        "paired against KKT-hPINN, same split and initialisation: test MSE x 1e-4 of the "
        "method minus KKT-hPINN's, mean ± standard error, wins = runs where the method is lower",
        f"{'method':46s}" + "".join(f" {n:>31s}" for n in names),
    ]
    for k in methods:
        if k == "kkt":
            continue
        row = f"{LABELS[k]:46s}"
        for n in names:
            ours, ref = by.get((n, k), {}), by.get((n, "kkt"), {})
            common = sorted(set(ours) & set(ref))
            if not common:
                row += f" {'-':>31s}"
                continue
            diff = 1e4 * torch.tensor([ours[i]["test_mse"] - ref[i]["test_mse"] for i in common])
            se = float(diff.std()) / math.sqrt(len(common)) if len(common) > 1 else math.nan
            wins = int((diff < 0).sum())
            row += f" {f'{float(diff.mean()):+.3g} ± {se:.2g}, {wins}/{len(common)}':>31s}"
        lines.append(row)

table = "\n".join(lines)
print(table)
(OUT / f"chemical_process_converged_{MODE}.txt").write_text(table + "\n")

# %%
# Learning curves
# ---------------
# Validation MSE against optimiser steps, the median over runs of each method.
# After a run stops it holds its kept (best) model, so its value from then on
# is its best validation MSE; a dot marks the median stopping step.

for n in names:
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in methods:
        rs = list(by.get((n, k), {}).values())
        if not rs:
            continue
        length = max(len(r["curve"]) for r in rs)
        held = torch.tensor(
            [r["curve"] + [min(r["curve"])] * (length - len(r["curve"])) for r in rs]
        )
        steps = [min(EVAL_EVERY * (j + 1), STEPS) for j in range(length)]
        med = held.median(0).values
        (line,) = ax.plot(steps, med, label=f"{LABELS[k]} ({len(rs)} runs)", lw=1)
        stop = median([r["stop_step"] for r in rs])
        j = min(max(int(stop) // EVAL_EVERY - 1, 0), length - 1)
        ax.plot(steps[j], float(med[j]), "o", color=line.get_color(), ms=4)
    ax.set_yscale("log")
    ax.set_title(f"{n}: validation MSE, median over runs")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation MSE (scaled)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / f"chemical_process_converged_curves_{n}_{MODE}.png", dpi=120)
print(f"figures and table in {OUT}")

torch.set_num_threads(_saved[0])
torch.set_default_dtype(_saved[1])
torch.distributions.Distribution.set_default_validate_args(_saved[2])
