r"""Data-parallel training of constrained models with ``torch.distributed``.

A linear law on disjoint groups (:class:`~pyro_linconstr.GroupSum`: the atoms
of one crystal, the nodes of one graph) couples the entries of a group and
nothing else, so data-parallel training splits the data *by group*: every
group of a step lives whole on one process, each process conditions its own
groups, and ``DistributedDataParallel`` sums the gradients. Two names:

* :class:`DistributedGroupSampler`: the batches of group ids of one process,
  the process's share of a global batch that does not depend on the number of
  processes (seeded, epoch-aware, like ``DistributedSampler``);
* :func:`check_whole_groups`: a collective check that no group is split
  between processes (a split group would be conditioned on a partial sum,
  silently the wrong law).

The score-function baseline
(:class:`~pyro_linconstr.infer.estimators.ScoreBaseline`) averages its running
statistic over all processes by itself when ``torch.distributed`` is
initialised. See the docs page "Training on several processes or machines".
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistributedGroupSampler", "check_whole_groups"]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _require_initialised(who: str, extra: str = "") -> None:
    if not _initialised():
        raise RuntimeError(
            f"{who}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(backend) first (torchrun sets the "
            f"environment it reads: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT){extra}."
        )


def all_reduce_mean(value: torch.Tensor, process_group=None) -> torch.Tensor:
    """The mean of the elements of ``value`` over all processes' elements (a 0-dim tensor).

    Sums ``[value.sum(), value.numel()]`` over the processes of ``process_group``
    in float64 with one ``all_reduce``, so every process gets the same bits.
    Zero elements in all processes give ``0``. Collective: every process of the
    group must call it, in the same order.
    """
    stat = torch.stack(
        [
            value.detach().sum(dtype=torch.float64),
            torch.tensor(float(value.numel()), dtype=torch.float64, device=value.device),
        ]
    )
    dist.all_reduce(stat, op=dist.ReduceOp.SUM, group=process_group)
    mean = torch.where(stat[1] > 0, stat[0] / stat[1].clamp_min(1.0), torch.zeros_like(stat[0]))
    return mean.to(value.dtype)


def distributed_active(process_group=None) -> bool:
    """Whether a process group is given or ``torch.distributed`` is initialised."""
    return process_group is not None or _initialised()


class DistributedGroupSampler(Sampler[list[int]]):
    r"""Batches of whole groups for data-parallel training, one share per process.

    Every epoch the group ids are shuffled (seed ``seed + epoch``, the same on
    every process) and cut into *global* batches of ``batch_size`` groups;
    each global batch is split between the ``num_replicas`` processes, and
    this process (``rank``) gets its share, a list of group ids. So every group
    of a step lives whole on one process, every process takes the same number
    of steps (``len(sampler)``), and the global batches, hence the training,
    do not depend on the number of processes: one process with ``batch_size``
    groups per step sees exactly the batches that ``N`` processes see together.

    The split of a global batch: contiguous, near-equal numbers of groups, or,
    with ``sizes`` (e.g. the number of atoms of each crystal), balanced by
    size (largest group first to the least-loaded process), which evens out the
    time of a step (the slowest process sets it). Every process gets at least
    one group.

    The last global batch, when shorter than ``batch_size``, is kept if it has
    at least ``num_replicas`` groups (``drop_last=False``) and dropped
    otherwise: a process without a group could not take the step. With
    ``drop_last=True`` it is always dropped.

    Use it as a DataLoader's ``batch_sampler`` (the dataset indexed by group
    id), or loop over it directly; call :meth:`set_epoch` at the start of
    every epoch, as for ``DistributedSampler``.

    :param groups: the number of groups ``G`` (ids ``0 .. G-1``) or a 1-d
        integer tensor / sequence of distinct group ids (a training split).
    :param int batch_size: groups per **global** batch (summed over processes),
        at least ``num_replicas``.
    :param sizes: optional per-group sizes indexed by group id (length greater
        than the largest id), used to balance the processes' shares.
    :param bool shuffle: reshuffle every epoch (else the order of ``groups``).
    :param int seed: seed of the shuffle; the same on every process.
    :param bool drop_last: drop a last global batch shorter than ``batch_size``.
    :param int num_replicas: number of processes (default: the world size of
        the initialised ``torch.distributed``).
    :param int rank: this process (default: its rank in ``torch.distributed``).
    :raises RuntimeError: ``num_replicas`` or ``rank`` left out while
        ``torch.distributed`` is not initialised.
    :raises ValueError: repeated group ids, ``batch_size < num_replicas``, a
        rank outside ``[0, num_replicas)``, sizes that do not cover the ids.

    Example::

        >>> from pyro_linconstr.infer import DistributedGroupSampler
        >>> shares = [DistributedGroupSampler(10, batch_size=4, shuffle=False,
        ...                                   num_replicas=2, rank=r) for r in (0, 1)]
        >>> [list(s) for s in shares]  # the last 2 groups: one for each process
        [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]
        >>> balanced = DistributedGroupSampler(4, 4, sizes=[9, 1, 1, 1], shuffle=False,
        ...                                    num_replicas=2, rank=1)
        >>> list(balanced)  # group 0 (9 atoms) alone on rank 0
        [[1, 2, 3]]
    """

    def __init__(
        self,
        groups: int | torch.Tensor | Sequence[int],
        batch_size: int,
        *,
        sizes: torch.Tensor | Sequence[float] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        who = "DistributedGroupSampler"
        if num_replicas is None or rank is None:
            _require_initialised(who, ", or pass num_replicas and rank")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"{who}: num_replicas must be an int >= 1, got {num_replicas!r}.")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"{who}: rank must lie in [0, {num_replicas}), got {rank!r}.")
        if isinstance(groups, int) and not isinstance(groups, bool):
            ids = torch.arange(groups)
        else:
            ids = torch.as_tensor(groups)
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(
                    f"{who}: groups must be a number of groups or a 1-d integer tensor of "
                    f"group ids, got {ids.dtype} of shape {tuple(ids.shape)}."
                )
            ids = ids.long().cpu()
            if ids.unique().numel() != ids.numel():
                raise ValueError(
                    f"{who}: repeated group ids; every group must occur once (a repeated "
                    "group would be trained twice per epoch, possibly on two processes)."
                )
        if ids.numel() == 0:
            raise ValueError(f"{who}: there are no groups.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"{who}: batch_size must be an int, got {batch_size!r}.")
        if batch_size < num_replicas:
            raise ValueError(
                f"{who}: batch_size={batch_size} groups per global batch cannot give each of "
                f"the {num_replicas} processes a group; use batch_size >= {num_replicas} "
                "(batch_size counts the groups of all processes together)."
            )
        if sizes is not None:
            sizes = torch.as_tensor(sizes, dtype=torch.float64).cpu()
            if sizes.dim() != 1 or sizes.numel() <= int(ids.max()):
                raise ValueError(
                    f"{who}: sizes must be 1-d and indexed by group id (length > "
                    f"{int(ids.max())}), got shape {tuple(sizes.shape)}."
                )
            if not bool((sizes >= 0).all()) or not bool(sizes.isfinite().all()):
                raise ValueError(f"{who}: sizes must be finite and >= 0.")
        self.ids = ids
        self.batch_size = batch_size
        self.sizes = sizes
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle with seed ``seed + epoch`` from now on (call it before every epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Steps per epoch, the same on every process."""
        full, tail = divmod(self.ids.numel(), self.batch_size)
        return full + int(not self.drop_last and tail >= self.num_replicas)

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's global batches (group ids of all processes), the same on every process."""
        ids = self.ids
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            ids = ids[torch.randperm(ids.numel(), generator=g)]
        return list(ids.split(self.batch_size))[: len(self)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield self._share(batch).tolist()

    def _share(self, batch: torch.Tensor) -> torch.Tensor:
        if self.sizes is None:
            return batch.tensor_split(self.num_replicas)[self.rank]
        weight = self.sizes[batch].tolist()
        order = sorted(range(len(weight)), key=lambda i: -weight[i])  # stable: ties keep order
        heap = [(0.0, 0, r) for r in range(self.num_replicas)]
        mine = []
        for i in order:
            load, count, r = heapq.heappop(heap)
            if r == self.rank:
                mine.append(i)
            heapq.heappush(heap, (load + weight[i], count + 1, r))
        return batch[sorted(mine)]


def check_whole_groups(group_ids: torch.Tensor, process_group=None) -> None:
    """Raise on every process if a group has entries on two processes.

    A linear law on a group (a crystal's charges sum to its net charge)
    holds for the whole group: a process that holds part of a group and
    conditions it on the group's total imposes a different, wrong law, without
    any error. This collective gathers the distinct group ids of every process
    (``all_gather_object``, a few bytes per group) and compares them; call it
    on the first batches, or while debugging a data pipeline.

    :param torch.Tensor group_ids: the *global* group id of every entry this
        process holds (e.g. the crystal index of each atom of its batch).
    :param process_group: the processes to compare (default: all).
    :raises RuntimeError: ``torch.distributed`` is not initialised.
    :raises ValueError: on every process, naming the split groups and their ranks.
    """
    _require_initialised("check_whole_groups")
    local = torch.as_tensor(group_ids).reshape(-1).unique().cpu().tolist()
    gathered: list = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(gathered, local, group=process_group)
    owners: dict[int, list[int]] = {}
    for rank, ids in enumerate(gathered):
        for g in ids:
            owners.setdefault(g, []).append(rank)
    split = sorted((g, r) for g, r in owners.items() if len(r) > 1)
    if split:
        shown = "; ".join(f"group {g} on ranks {', '.join(map(str, r))}" for g, r in split[:5])
        more = f" and {len(split) - 5} more" if len(split) > 5 else ""
        raise ValueError(
            f"check_whole_groups: {len(split)} group(s) are split across processes "
            f"({shown}{more}). A linear law on a group needs all its entries on one process; "
            "batch whole groups, e.g. with plc.infer.DistributedGroupSampler."
        )
