"""Data-parallel training with torch.distributed: 2 processes, gloo, CPU.

One spawn of two processes runs every scenario (``_worker``) and saves what each
rank saw; the tests below read those results. The oracles are computed in one
process without DistributedDataParallel: the full-batch gradient (deterministic
objectives) or the sum of the shards' gradients with the very draws of each rank
(stochastic estimators).
"""

import copy
import datetime
import os
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pyro_linconstr as plc
from pyro_linconstr.infer import DistributedGroupSampler, check_whole_groups

WORLD = 2
SIZES = torch.tensor([3, 5, 2, 4, 3, 6, 2, 5])  # entries per group
STEPS = 3
CONFIGS = [
    ("expected_loss", "closed_form"),
    ("expected_loss", "reparam"),
    ("expected_loss", "marginal"),
    ("expected_loss", "score"),
    ("elbo", "reparam"),
    ("elbo", "marginal"),
    ("elbo", "score"),
]
DETERMINISTIC = [("expected_loss", "closed_form")]


# ----------------------------------------------------------------- the problem
def problem():
    """Entries in groups; features, per-group totals b, observations on the law."""
    g = torch.Generator().manual_seed(0)
    G = SIZES.numel()
    group = torch.repeat_interleave(torch.arange(G), SIZES)
    feat = torch.randn(group.numel(), 3, generator=g, dtype=torch.float64)
    b = torch.randn(G, generator=g, dtype=torch.float64)
    raw = torch.randn(group.numel(), generator=g, dtype=torch.float64)
    y = plc.project(raw, plc.GroupSum(group, G), b)
    return {"group": group, "feat": feat, "b": b, "y": y}


def shard(data, ids):
    """The entries of groups ``ids`` (global ids), with local group indices."""
    ids = torch.as_tensor(ids)
    where = (data["group"].unsqueeze(-1) == ids).any(-1)
    local = torch.full((ids.max() + 1,), -1).index_put_((ids,), torch.arange(ids.numel()))
    return {
        "ids": ids,
        "group": local[data["group"][where]],
        "G": ids.numel(),
        "feat": data["feat"][where],
        "b": data["b"][ids],
        "y": data["y"][where],
    }


class Heads(nn.Module):
    """Features -> (mean, variance) of each entry."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, feat):
        out = self.lin(feat)
        return out[:, 0], nn.functional.softplus(out[:, 1]) + 0.1


class ObservedModel(nn.Module):
    """ExpectedLoss: the constrained Gaussian observed at the data."""

    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, bt):
        mu, s = self.heads(bt["feat"])
        with plc.LinearConstraint(plc.GroupSum(bt["group"], bt["G"]), bt["b"], site="q"):
            pyro.sample("q", dist.Normal(mu, s.sqrt()).to_event(1), obs=bt["y"])


class NoGuide(nn.Module):
    def forward(self, bt):
        pass


class LatentModel(nn.Module):
    """ConstrainedTrace_ELBO: a constrained latent x with a learned prior mean, y ~ N(x, 0.5)."""

    def __init__(self):
        super().__init__()
        self.prior = nn.Linear(3, 1, dtype=torch.float64)

    def forward(self, bt):
        loc = self.prior(bt["feat"]).squeeze(-1)
        with plc.LinearConstraint(plc.GroupSum(bt["group"], bt["G"]), bt["b"], site="x"):
            x = pyro.sample("x", dist.Normal(loc, 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x, 0.5).to_event(1), obs=bt["y"])


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, bt):
        mu, s = self.heads(bt["feat"])
        base = dist.Normal(mu, s.sqrt()).to_event(1)
        return pyro.sample("x", plc.constrain(base, plc.GroupSum(bt["group"], bt["G"]), bt["b"]))


def build(objective, estimator):
    """(model, guide, objective); no plates, so no draws are spent guessing plate nesting."""
    if objective == "expected_loss":
        elbo = plc.infer.ExpectedLoss("l1", estimator=estimator, max_plate_nesting=0)
        return ObservedModel(), NoGuide(), elbo
    elbo = plc.infer.ConstrainedTrace_ELBO(estimator=estimator, max_plate_nesting=0)
    return LatentModel(), Guide(), elbo


def grads(module, loss):
    return [g.detach().clone() for g in torch.autograd.grad(loss, list(module.parameters()))]


# ------------------------------------------------------------------ the worker
def _worker(rank, store, out):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    tdist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    data = problem()
    G = SIZES.numel()
    # one global batch of all groups; the sampler reads rank and world size from the group
    mine = shard(data, next(iter(DistributedGroupSampler(G, G, sizes=SIZES, shuffle=False))))
    # the oracle needs every rank's share
    all_shares = [
        next(
            iter(
                DistributedGroupSampler(
                    G, G, sizes=SIZES, shuffle=False, num_replicas=WORLD, rank=r
                )
            )
        )
        for r in range(WORLD)
    ]
    check_whole_groups(data["group"][(data["group"].unsqueeze(-1) == mine["ids"]).any(-1)])
    results = {"ids": mine["ids"], "configs": {}}
    for objective, estimator in CONFIGS:
        pyro.set_rng_seed(0)  # the same initial modules everywhere (DDP also broadcasts rank 0's)
        model, guide, elbo = build(objective, estimator)
        module = elbo(model, guide)  # pyro.infer.elbo.ELBOModule: forward = differentiable loss
        ddp = DDP(module)
        start = copy.deepcopy(module)
        r = {}
        # step 1: DDP averages the processes' gradients; x WORLD gives the gradient of the sum
        pyro.set_rng_seed(1000 + rank)  # every process draws its own randomness
        value = ddp(mine)
        (value * WORLD).backward()
        r["grad"] = [p.grad.detach().clone() for p in module.parameters()]
        r["value"] = value.detach()
        if estimator == "score":
            r["average_after_1"] = {k: v.clone() for k, v in elbo.baseline._average.items()}
        # oracle: one process, no DDP, every rank's shard with that rank's draws
        total = None
        for r_other, ids in enumerate(all_shares):
            _, _, oracle_elbo = build(objective, estimator)  # each shard's first step: c = 0
            pyro.set_rng_seed(1000 + r_other)
            loss = oracle_elbo.differentiable_loss(start.model, start.guide, shard(data, ids))
            g = grads(start, loss)
            total = g if total is None else [a + c for a, c in zip(total, g)]
        r["oracle_shards"] = total
        if (objective, estimator) in DETERMINISTIC:  # the full batch in one process
            full = shard(data, torch.arange(SIZES.numel()))
            loss = oracle_elbo.differentiable_loss(start.model, start.guide, full)
            r["oracle_full"] = grads(start, loss)
        # a few more steps
        opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
        opt.step()
        for _ in range(STEPS - 1):
            opt.zero_grad()
            (ddp(mine) * WORLD).backward()
            opt.step()
        r["params"] = [p.detach().clone() for p in module.parameters()]
        if rank == 0:  # a log on one process: no collective (it would hang), no update
            r["logged"] = elbo.loss(module.model, module.guide, mine)
        if estimator == "score":
            r["average"] = {k: v.clone() for k, v in elbo.baseline._average.items()}
        if objective == "elbo":  # samples of the trained guide: the law on every rank
            tr = pyro.poutine.trace(module.guide).get_trace(mine)
            x = tr.nodes["x"]["value"]
            A = plc.GroupSum(mine["group"], mine["G"])
            r["residual"] = (A.matvec(x) - mine["b"]).abs().max().detach()
            r["on_support"] = bool(tr.nodes["x"]["fn"].support.check(x).all())
            # the same shard (group ids 0..) on every rank: different draws, same law
            pyro.set_rng_seed(2000 + rank)
            common = shard(data, all_shares[0])
            xc = pyro.poutine.trace(module.guide).get_trace(common).nodes["x"]["value"].detach()
            r["common_sample"] = xc
            A = plc.GroupSum(common["group"], common["G"])
            r["common_residual"] = (A.matvec(xc) - common["b"]).abs().max()
        results["configs"][(objective, estimator)] = r
    # a bad set-up: group 1 has entries on both processes
    held = torch.tensor([0, 0, 1, 1]) if rank == 0 else torch.tensor([1, 2, 2])
    try:
        check_whole_groups(held)
        results["split_error"] = None
    except ValueError as e:
        results["split_error"] = str(e)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Spawn the two processes once; a list of each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(
        _worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish within 120 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close_lists(a, b, rtol=1e-10, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# --------------------------------------------------------- two-process tests
def test_each_rank_holds_whole_disjoint_groups(runs):
    ids = [set(r["ids"].tolist()) for r in runs]
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(SIZES.numel()))
    loads = [int(SIZES[list(s)].sum()) for s in ids]
    assert max(loads) - min(loads) <= int(SIZES.max())  # balanced by size


@pytest.mark.parametrize("config", DETERMINISTIC)
def test_gradient_equals_one_process_full_batch(runs, config):
    for r in runs:
        c = r["configs"][config]
        assert_close_lists(c["grad"], c["oracle_full"])
        assert any(bool(g.abs().max() > 1e-3) for g in c["grad"])  # not trivially zero


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_equals_one_process_gradient_of_the_same_draws(runs, config):
    for r in runs:
        c = r["configs"][config]
        assert_close_lists(c["grad"], c["oracle_shards"])


@pytest.mark.parametrize("config", CONFIGS)
def test_parameters_identical_on_every_rank_after_training(runs, config):
    p0, p1 = (r["configs"][config]["params"] for r in runs)
    assert len(p0) > 0 and all(torch.equal(a, b) for a, b in zip(p0, p1))


@pytest.mark.parametrize("estimator", ["reparam", "marginal", "score"])
def test_samples_satisfy_the_law_on_every_rank(runs, estimator):
    for r in runs:
        c = r["configs"][("elbo", estimator)]
        assert c["on_support"]
        assert float(c["residual"]) < 1e-10
        assert float(c["common_residual"]) < 1e-10
    a, b = (r["configs"][("elbo", estimator)]["common_sample"] for r in runs)
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("objective", ["expected_loss", "elbo"])
def test_score_baseline_is_shared_across_ranks(runs, objective):
    c0, c1 = (r["configs"][(objective, "score")] for r in runs)
    (site,) = c0["average"]
    # equal, although rank 0 alone also evaluated objective.loss (under no_grad) afterwards
    assert torch.equal(c0["average"][site], c1["average"][site])
    assert torch.isfinite(torch.tensor(c0["logged"])) and "logged" not in c1
    assert c0["average"][site].dim() == 0
    # after the first step: the mean over ranks of each rank's cost
    # (ExpectedLoss: the loss; ConstrainedTrace_ELBO: log p - log q = -loss)
    sign = 1.0 if objective == "expected_loss" else -1.0
    expected = sign * (c0["value"] + c1["value"]) / 2
    torch.testing.assert_close(c0["average_after_1"][site], expected, rtol=1e-12, atol=1e-12)


def test_group_split_across_ranks_is_an_error_on_every_rank(runs):
    for r in runs:
        msg = r["split_error"]
        assert msg is not None and "group 1 on ranks 0, 1" in msg
        assert "DistributedGroupSampler" in msg


# ------------------------------------------------------------ one process
def test_backend_not_initialised_is_a_clear_error():
    assert not tdist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        DistributedGroupSampler(10, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        check_whole_groups(torch.tensor([0, 1]))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sizes", [None, SIZES.repeat(4)[:27]])
def test_global_batches_do_not_depend_on_the_number_of_processes(world, sizes):
    groups = torch.arange(3, 27)  # a training split of ids
    kw = dict(batch_size=5, sizes=sizes, seed=7)
    one = DistributedGroupSampler(groups, num_replicas=1, rank=0, **kw)
    shares = [
        DistributedGroupSampler(groups, num_replicas=world, rank=r, **kw) for r in range(world)
    ]
    for epoch in (0, 1):
        for s in [one] + shares:
            s.set_epoch(epoch)
        steps = list(zip(*shares))
        assert len(steps) == len(one) == len(shares[0]) == 5  # 24 ids: 4 full + a tail of 4
        for batch, step in zip(one, steps):
            assert all(len(share) >= 1 for share in step)
            together = [g for share in step for g in share]
            assert sorted(together) == sorted(batch) and len(set(together)) == len(together)
        seen = sorted(g for b in one for g in b)
        assert seen == groups.tolist()
    # seeded: epoch 0 again is a fresh sampler's order, epoch 1 another one
    fresh = [
        DistributedGroupSampler(groups, num_replicas=world, rank=r, **kw) for r in range(world)
    ]
    later = [list(s) for s in shares]
    for s in shares:
        s.set_epoch(0)
    assert [list(s) for s in shares] == [list(s) for s in fresh] != later


def test_shares_are_balanced_by_size():
    sizes = torch.tensor([500, 10, 10, 10, 400, 20, 30, 40])
    shares = [
        next(iter(DistributedGroupSampler(8, 8, sizes=sizes, num_replicas=2, rank=r)))
        for r in (0, 1)
    ]
    loads = [int(sizes[s].sum()) for s in shares]
    assert sorted(loads) == [510, 510]  # the best split of 1020
    plain = [next(iter(DistributedGroupSampler(8, 8, num_replicas=2, rank=r))) for r in (0, 1)]
    assert all(len(s) == 4 for s in plain)


@pytest.mark.parametrize(
    ("n", "drop_last", "steps"), [(11, False, 3), (11, True, 2), (10, False, 2)]
)
def test_short_last_batch(n, drop_last, steps):
    # batch 4 over 3 processes: a tail of 3 groups (n = 11) is kept, one of 2 (n = 10) cannot
    # give each process a group and is dropped
    shares = [
        DistributedGroupSampler(n, 4, drop_last=drop_last, num_replicas=3, rank=r) for r in range(3)
    ]
    assert all(len(s) == steps for s in shares)
    got = [list(s) for s in shares]
    assert all(len(g) == steps for g in got)
    assert all(len(share) >= 1 for g in got for share in g)
    assert sum(len(share) for g in got for share in g) == 4 * (steps - 1) + (3 if steps == 3 else 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size >= 4"):
        DistributedGroupSampler(10, 3, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="rank must lie"):
        DistributedGroupSampler(10, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="repeated group ids"):
        DistributedGroupSampler(torch.tensor([0, 1, 1]), 2, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="indexed by group id"):
        DistributedGroupSampler(torch.tensor([0, 5]), 2, sizes=[1, 2], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="integer"):
        DistributedGroupSampler(torch.tensor([0.0, 1.0]), 2, num_replicas=1, rank=0)
