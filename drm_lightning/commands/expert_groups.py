"""Train the experts of different tasks at the same time: the launched processes split into groups of one node.

A pipeline launched on W processes (``torchrun``, ``srun``) with ``procs_per_expert=K`` forms ``W/K`` groups of K
consecutive ranks of one node; task ``i`` (of those still to fit) goes to group ``i mod (W/K)``, and each group fits
its tasks one after another, data-parallel over its K processes with the recipe's own strategy (DDP, FSDP). Each
group is an ordinary Lightning world of its own: while it trains, its processes see only one another
(``GroupEnvironment``, a Lightning ``ClusterEnvironment``; a process group of K ranks on ``127.0.0.1`` at port
``MASTER_PORT + 1 + group``). Afterwards every process leaves its group and all W meet in one process group
(``drm_lightning.merging.engine.distributed.join_world``) for the distributed merges; a failure in any group is
raised on every rank there.

Why groups stay inside a node: a group's rendezvous is local (no address exchange between nodes is needed), and
data-parallel training is fastest over a node's own links. Ranks must come in node-contiguous blocks, as torchrun
and srun's default block distribution give them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lightning.fabric.plugins.environments import ClusterEnvironment
from typing_extensions import override

from drm_lightning.world import WorldInfo

GROUP_ADDRESS = "127.0.0.1"
#: Launcher variables rewritten to the group's view while it trains (and restored afterwards).
_LAUNCHER_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "TORCHELASTIC_USE_AGENT_STORE",
)


@dataclass(frozen=True)
class ExpertGroup:
    """This process's place in the expert groups.

    Attributes:
        index: the group's global index (``rank // size``); tasks are dealt out by it.
        count: how many groups there are (``world_size // size``).
        rank: this process's rank within its group (0 writes the group's files).
        size: processes per group (``procs_per_expert``).
        local_ranks: the ``LOCAL_RANK`` of each member on this node, in group-rank order (their GPU indices).
        port: the group's rendezvous port on ``127.0.0.1``.
    """

    index: int
    count: int
    rank: int
    size: int
    local_ranks: tuple[int, ...]
    port: int


def local_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Processes per node from the launcher: ``LOCAL_WORLD_SIZE`` (torchrun), ``SLURM_NTASKS_PER_NODE`` or a uniform
    ``SLURM_TASKS_PER_NODE`` (srun, e.g. ``4(x2)``); ``None`` when none says."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    match = re.fullmatch(r"(\d+)(\(x\d+\))?", env.get("SLURM_TASKS_PER_NODE", ""))
    return int(match.group(1)) if match else None


def plan_group(world: WorldInfo, procs_per_expert: int, local_world: int | None, base_port: int) -> ExpertGroup:
    """The group of this process: ranks ``[g·K, (g+1)·K)`` form group ``g``.

    Args:
        world: this process's place among all launched processes.
        procs_per_expert: ``K``, processes that train one expert together.
        local_world: processes per node (``None``: all on one node).
        base_port: the launcher's ``MASTER_PORT``; group ``g`` rendezvouses at ``base_port + 1 + g``.

    Raises:
        ValueError: ``K`` not a positive divisor of the world size or of the processes per node, or ranks that are
            not in node-contiguous blocks; each message names the values.
    """
    k, w = procs_per_expert, world.world_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= w or w % k:
        raise ValueError(f"procs_per_expert={k!r}: expected a divisor of the {w} launched processes")
    local = w if local_world is None else local_world
    if local < 1 or w % local:
        raise ValueError(f"{local} processes per node do not divide the {w} launched processes")
    if local % k:
        raise ValueError(
            f"procs_per_expert={k}: must divide the {local} processes per node (an expert's group stays in one node)"
        )
    if world.rank % local != world.local_rank:
        raise ValueError(
            f"rank {world.rank} has LOCAL_RANK {world.local_rank}, expected {world.rank % local}: expert groups need "
            "node-contiguous ranks (torchrun; srun with --distribution=block)"
        )
    index, rank = divmod(world.rank, k)
    first = world.local_rank - rank
    return ExpertGroup(index, w // k, rank, k, tuple(range(first, first + k)), base_port + 1 + index)


def assign_tasks(tasks: Sequence[str], groups: int) -> list[list[str]]:
    """Deal tasks out to groups in order: task ``i`` to group ``i mod groups`` (deterministic on every rank)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r}: expected a positive integer")
    return [list(tasks[g::groups]) for g in range(groups)]


class GroupEnvironment(ClusterEnvironment):
    """A Lightning cluster environment of one expert group: K processes on this node, launched externally."""

    def __init__(self, group: ExpertGroup) -> None:
        super().__init__()
        self.group = group
        self._world_size = group.size
        self._global_rank = group.rank

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        return GROUP_ADDRESS

    @property
    @override
    def main_port(self) -> int:
        return self.group.port

    @staticmethod
    @override
    def detect() -> bool:
        return False  # never picked by Lightning on its own: only passed explicitly

    @override
    def world_size(self) -> int:
        return self._world_size

    @override
    def set_world_size(self, size: int) -> None:
        self._world_size = size

    @override
    def global_rank(self) -> int:
        return self._global_rank

    @override
    def set_global_rank(self, rank: int) -> None:
        self._global_rank = rank

    @override
    def local_rank(self) -> int:
        return self.group.rank

    @override
    def node_rank(self) -> int:
        return 0


def uses_cuda(accelerator: str | None) -> bool:
    """Whether a Trainer with this ``accelerator`` runs on CUDA (``auto``/unset: when a GPU is visible)."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())


def group_devices(group: ExpertGroup, accelerator: str | None) -> int | list[int]:
    """The Trainer's ``devices`` for the group: its members' GPUs (by LOCAL_RANK, modulo the visible GPUs), or K CPU
    processes.

    Raises:
        ValueError: two members of the group would share one GPU (fewer visible GPUs than the group needs).
    """
    import torch

    if not uses_cuda(accelerator):
        return group.size
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"trainer.accelerator={accelerator!r} but no CUDA device is visible")
    devices = [r % count for r in group.local_ranks]
    if len(set(devices)) < len(devices):
        raise ValueError(f"procs_per_expert={group.size}: the group needs {group.size} GPUs, {count} are visible")
    return devices


@contextmanager
def expert_group(group: ExpertGroup, accelerator: str | None = None) -> Iterator[dict[str, Any]]:
    """Within the block this process belongs to its group's world only; yields the Trainer arguments for it.

    The launcher's variables are rewritten to the group's view (torchrun's agent store is switched off, as the
    group's rank 0 hosts its own rendezvous) and Lightning's ``rank_zero_only`` follows the group rank, so group
    rank 0 writes each of the group's experts. On leaving, the group's process group is destroyed and everything is
    restored.

    Raises:
        RuntimeError: a process group already exists (the processes cannot split after they have joined).
    """
    import torch.distributed as dist
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("expert groups must form before any process group exists; one already does")
    saved = {key: os.environ.get(key) for key in _LAUNCHER_VARS}
    saved_rank = getattr(rank_zero_only, "rank", 0)
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(
        MASTER_ADDR=GROUP_ADDRESS,
        MASTER_PORT=str(group.port),
        WORLD_SIZE=str(group.size),
        RANK=str(group.rank),
        LOCAL_RANK=str(group.rank),
        LOCAL_WORLD_SIZE=str(group.size),
        NODE_RANK="0",
        GROUP_RANK="0",
    )
    rank_zero_only.rank = group.rank
    try:
        yield {"plugins": [GroupEnvironment(group)], "devices": group_devices(group, accelerator), "num_nodes": 1}
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        rank_zero_only.rank = saved_rank


__all__ = [
    "ExpertGroup",
    "GroupEnvironment",
    "assign_tasks",
    "expert_group",
    "group_devices",
    "local_world_size",
    "plan_group",
    "uses_cuda",
]
