"""Merging across processes: the parameters of a plan shared out between the ranks of ``torch.distributed``.

Launch the ordinary ``drm-lightning merge`` (or any script calling ``merge_task_vectors_distributed``) under the
launchers users already have; the ranks and rendezvous come from their environment variables::

    torchrun --standalone --nproc_per_node 8 -m drm_lightning.cli merge ...           # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank 0 --master_addr node0 --master_port 29500 \\
        --nproc_per_node 8 -m drm_lightning.cli merge ...                              # and node_rank 1 on node1
    srun --nodes 2 --ntasks-per-node 8 drm-lightning merge ...                         # SLURM (Lightning's detection)

How: global rank 0 validates every input once (``prepare_merge``: headers, fingerprints, the base model, the plan
with per-parameter costs) and broadcasts the plan; the parameters are assigned to ranks by greedy
longest-processing-time on their cost (deterministic: the same plan and world size give the same assignment); each
rank merges its share on its own device (``cuda:LOCAL_RANK`` with NCCL when CUDA is there, else CPU with gloo) into
shard files of its own in a staging folder beside the output; rank 0 then assembles ONE output folder atomically.

What "identical" means: the merged deltas are the same tensors, bit for bit, under the same names as a
single-process ``merge_task_vectors`` of the same inputs run on the same kind of device with the same number of
intra-op threads (float64 eigendecompositions round differently when BLAS splits work differently; ``torchrun``
sets ``OMP_NUM_THREADS=1`` per rank). With ``layout="canonical"`` (default) rank 0 rewrites the rank shards in
plan order with the single-process shard size, so even the shard files and index are byte-identical; with
``layout="per_rank"`` the rank shards are moved in as they are (no second copy of the merged delta, which counts for
large models) and only the index ties them together. ``merge.json`` differs by design: it records timings and a
``distributed`` section (world size, backend, each rank's parameters, cost and timings).

Requirements: every rank must see the task vectors and the output's parent folder at the same paths (a shared
filesystem across nodes); rank 0 checks that every rank's shards arrived and says so otherwise.

No rank ever leaves a collective early: each phase ends with an exchange of every rank's outcome, so an error on one
rank (a NaN in a task vector, a full disk) is raised on all ranks, naming the rank and its message, instead of
leaving the others waiting for a timeout.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from drm_lightning.io.atomic import atomic_dir, remove_stale_temporaries, temporary_prefix
from drm_lightning.io.merged_delta import INDEX_FILE, MERGED_DIR, SHARD_PREFIX, delta_writer
from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, check_max_shard_bytes, write_index
from drm_lightning.merging.engine.merger import MergeResult, merge_parameters, merge_task_vectors
from drm_lightning.merging.engine.plan import MergePlan, PlanEntry
from drm_lightning.merging.engine.reader import TaskVectorReader
from drm_lightning.merging.engine.record import copy_heads, write_merge_record
from drm_lightning.merging.engine.setup import MergeSetup, prepare_merge
from drm_lightning.merging.engine.space import check_merge_space
from drm_lightning.merging.methods.registry import get_method
from drm_lightning.world import (
    DEFAULT_TIMEOUT_S,
    WorldInfo,
    detect_world,
    failure_status,
    group_broadcast_json,
    group_exchange,
    init_default_group,
    raise_failures,
    rank_device,
)

Layout = Literal["canonical", "per_rank"]
LAYOUTS: tuple[str, ...] = ("canonical", "per_rank")


def assign_entries(entries: Sequence[PlanEntry], world_size: int) -> list[list[PlanEntry]]:
    """Share plan entries out between ``world_size`` ranks, balanced by cost (greedy longest processing time).

    Entries are taken by decreasing cost (ties: plan order) and each goes to the rank with the least cost so far
    (ties: the lowest rank), which is within 4/3 of the best possible makespan. Skipped entries cost nothing and
    are left out. Each rank's share is returned in plan order. Deterministic: a pure function of the arguments.

    Raises:
        ValueError: ``world_size`` below 1.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected a positive integer")
    work = [(i, e) for i, e in enumerate(entries) if e.rule != "skip"]
    loads = [0.0] * world_size
    shares: list[list[tuple[int, PlanEntry]]] = [[] for _ in range(world_size)]
    for index, entry in sorted(work, key=lambda item: (-item[1].cost, item[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += entry.cost
        shares[rank].append((index, entry))
    return [[e for _, e in sorted(share, key=lambda item: item[0])] for share in shares]


def _init_group(world: WorldInfo, device: torch.device, timeout: timedelta) -> Any:
    """Join (or create) the process group; return a new gloo group of all ranks for this merge's CPU collectives.

    Why a group of its own: the default group may be NCCL-only (one a Lightning fit on GPUs created), and its
    timeout (Lightning's 30 minutes) need not cover a rank waiting for the slowest rank's whole share.
    """
    init_default_group(world, device, timeout)
    return dist.new_group(backend="gloo", timeout=timeout)


# The merge
# ---------------------------------------------------------------------------------------------------------------


def _check_options(layout: str, timeout_s: float, max_shard_bytes: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {list(LAYOUTS)}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
    check_max_shard_bytes(max_shard_bytes)


def _entries_to_json(entries: Sequence[PlanEntry]) -> list[list[Any]]:
    return [[e.name, list(e.shape), e.rule, e.cost] for e in entries]


def _entries_from_json(rows: Sequence[Sequence[Any]]) -> list[PlanEntry]:
    return [PlanEntry(str(n), tuple(int(s) for s in shape), rule, float(cost)) for n, shape, rule, cost in rows]


def _rank_setup(
    shared: Mapping[str, Any],
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    params: Mapping[str, Any] | None,
    plan: MergePlan | None,
    device: torch.device,
) -> MergeSetup:
    """A rank's ``MergeSetup`` from rank 0's validated plan: only cheap work here (method check, file headers).

    Why not ``prepare_merge`` on every rank: it loads the base model, and eight ranks of a node loading an 8B model
    at once would need eight times its host memory for nothing but the shapes rank 0 already has.
    """
    merge_method = get_method(method)
    entries = _entries_from_json(shared["entries"])
    return MergeSetup(
        method=merge_method,
        params=dict(merge_method.check(dict(params or {}))),
        coefficients=shared["coefficients"],
        readers=[TaskVectorReader(f) for f in task_vectors],
        base=shared["base"],
        family=shared["family"],
        base_fingerprint=shared["base_fingerprint"],
        shapes={e.name: e.shape for e in entries},
        plan=plan if plan is not None else MergePlan(),
        entries=entries,
        device=device,
    )


def _merge_share(
    setup: MergeSetup, share: Sequence[PlanEntry], part: Path, rank: int, max_shard_bytes: int, progress: bool
) -> dict[str, Any]:
    """Merge this rank's entries into its own shards under ``part``; return what rank 0 needs to assemble."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    writer = ShardWriter(part, max_shard_bytes, prefix=f"{SHARD_PREFIX}-rank{rank:05d}")
    write = 0.0
    stream = merge_parameters(
        share, setup.readers, setup.method, setup.params, setup.coefficients,
        device=setup.device, progress=progress, timings=timings,
    )  # fmt: skip
    for name, delta in stream:
        t1 = time.perf_counter()
        writer.add(name, delta)
        del delta
        write += time.perf_counter() - t1
    t1 = time.perf_counter()
    weight_map = writer.close()
    timings["write"] = write + time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    return {
        "weight_map": weight_map,
        "total_size": writer.total_size,
        "parameters": len(weight_map),
        "cost": sum(e.cost for e in share),
        "device": str(setup.device),
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }


def _assemble(
    setup: MergeSetup,
    parts: Sequence[Mapping[str, Any]],
    staging: Path,
    target: Path,
    layout: str,
    max_shard_bytes: int,
) -> int:
    """Rank 0: write ``target/merged_delta`` from every rank's shards; return the number of merged parameters."""
    located: dict[str, Path] = {}
    for rank, part in enumerate(parts):
        folder = staging / _part_name(rank)
        for name, shard in part["weight_map"].items():
            path = folder / shard
            if not path.is_file():
                raise ValueError(
                    f"{path}: rank {rank}'s shard is not visible to rank 0; the output's parent folder "
                    f"{staging.parent} must be on a filesystem shared by all ranks"
                )
            located[name] = path
    out = target / MERGED_DIR
    if layout == "per_rank":
        out.mkdir(parents=True)
        weight_map: dict[str, str] = {}
        for name, path in located.items():
            if not (out / path.name).exists():
                os.replace(path, out / path.name)
            weight_map[name] = path.name
        write_index(out / INDEX_FILE, weight_map, sum(int(p["total_size"]) for p in parts))
        return len(weight_map)
    writer = delta_writer(target, max_shard_bytes)
    for entry in setup.entries:  # plan order: the order a single process adds them in
        path = located.get(entry.name)
        if path is None:
            continue
        with open_safetensors(path) as f:
            writer.add(entry.name, f.get_tensor(entry.name))
    writer.close()
    return len(located)


def _part_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def distributed_merge(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
    coefficients: Sequence[float] | None = None,
    *,
    base: str | None = None,
    family: str | None = None,
    plan: MergePlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layout: Layout = "canonical",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    world: WorldInfo | None = None,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> MergeResult:
    """``merge_task_vectors`` with the parameters shared out between the ranks of ``torch.distributed``.

    Every rank calls it with the same arguments (as a launcher running one command on every rank does). It joins
    the existing process group or creates one from the environment (``detect_world``), which then stays up until
    the process exits; nothing after the merge needs it (rank 0 writes the merged model alone).

    Args:
        task_vectors, method, output, params, coefficients, base, family, plan, max_shard_bytes: as for
            ``merge_task_vectors``.
        device: ``None``/``"cuda"``: ``cuda:LOCAL_RANK`` when CUDA is there, else CPU (see ``rank_device``).
        progress: a progress bar on rank 0 (its own share).
        layout: ``"canonical"`` (rank 0 rewrites the shards as one process would: byte-identical files) or
            ``"per_rank"`` (rank shards moved in as they are; same tensors and names, no second copy).
        timeout_s: how long a collective waits for the other ranks (the slowest rank's whole share).
        world: this process's place (default: ``detect_world()``).
        torch_dtype, gguf_file: how rank 0 loads the base (default: as the task vectors' meta.json records it).

    Returns:
        A ``MergeResult`` on every rank (``device``: this rank's; timings: rank 0's load and write, the slowest
        rank's read/matrix/elementwise).

    Raises:
        ValueError: bad input on any rank (raised on every rank, naming the rank, file and key).
    """
    _check_options(layout, timeout_s, max_shard_bytes)
    world = world if world is not None else detect_world()
    dev = rank_device(device, world.local_rank)
    t_start = time.perf_counter()
    group = _init_group(world, dev, timedelta(seconds=float(timeout_s)))
    rank, size = world.rank, world.world_size
    output = Path(output)
    staging: Path | None = None
    try:
        # Phase 1: rank 0 validates everything and plans; the others wait for its verdict.
        shared: dict[str, Any] = {}
        error: BaseException | None = None
        setup: MergeSetup | None = None
        if rank == 0:
            try:
                if layout == "canonical":  # rank shards staged beside the output, then rewritten into it: 2 copies
                    check_merge_space(task_vectors, output, plan, copies=2)
                setup = prepare_merge(
                    task_vectors, method, params, coefficients,
                    base=base, family=family, plan=plan, device=dev, output=output,
                    torch_dtype=torch_dtype, gguf_file=gguf_file,
                )  # fmt: skip
                output.parent.mkdir(parents=True, exist_ok=True)
                # named as an atomic_dir temporary of rank 0: a killed merge's staging is removed by the next one
                remove_stale_temporaries(output)
                staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(output) + "parts-", dir=output.parent))
                shared = {
                    "ok": True,
                    "entries": _entries_to_json(setup.entries),
                    "coefficients": setup.coefficients,
                    "base": setup.base,
                    "family": setup.family,
                    "base_fingerprint": setup.base_fingerprint,
                    "staging": str(staging),
                }
            except Exception as err:  # noqa: BLE001 - every rank must hear of it, then it is re-raised
                error, shared = err, failure_status(err)
        shared = group_broadcast_json(shared, rank, group)
        if error is not None:
            raise error
        if not shared["ok"]:
            raise_failures([shared], None)
        staging = Path(shared["staging"])

        # Phase 2: every rank merges its share into its own shards.
        own: BaseException | None = None
        result: dict[str, Any] = {}
        try:
            if setup is None:
                setup = _rank_setup(shared, task_vectors, method, params, plan, dev)
            share = assign_entries(setup.entries, size)[rank]
            result = _merge_share(
                setup, share, staging / _part_name(rank), rank, max_shard_bytes, progress and rank == 0
            )
        except Exception as err:  # noqa: BLE001
            own = err
        parts = group_exchange(own, result, size, group)
        assert setup is not None

        # Phase 3: rank 0 assembles one output folder atomically; every rank hears how it went.
        timings = dict(setup.timings)
        for key in ("read", "matrix", "elementwise"):
            timings[key] = max(float(p["timings"].get(key, 0.0)) for p in parts)
        timings["merge"] = time.perf_counter() - t_start - timings.get("load", 0.0)
        merged_count = sum(int(p["parameters"]) for p in parts)
        own = None
        if rank == 0:
            try:
                t0 = time.perf_counter()
                with atomic_dir(output) as tmp:
                    merged_count = _assemble(setup, parts, staging, tmp, layout, max_shard_bytes)
                    copy_heads(setup.readers, tmp)
                    timings["write"] = time.perf_counter() - t0
                    timings["total"] = time.perf_counter() - t_start
                    write_merge_record(
                        tmp, setup.record(), timings, merged_count, lam=None,
                        distributed=_record(world, layout, parts, setup.entries),
                    )  # fmt: skip
            except Exception as err:  # noqa: BLE001
                own = err
        final = group_exchange(own, {"timings": timings} if rank == 0 else {}, size, group)
        timings = {k: float(v) for k, v in final[0]["timings"].items()}
        return MergeResult.from_setup(setup, output, timings, merged_count, str(dev))
    finally:
        if rank == 0 and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        dist.destroy_process_group(group)


def _record(
    world: WorldInfo, layout: str, parts: Sequence[Mapping[str, Any]], entries: Sequence[PlanEntry]
) -> dict[str, Any]:
    """The ``distributed`` section of ``merge.json``: enough to see whether the ranks were balanced."""
    total = sum(e.cost for e in entries if e.rule != "skip") or 1.0
    return {
        "world_size": world.world_size,
        "launcher": world.source,
        "backend": str(dist.get_backend()),  # the default group's; this merge's own collectives use gloo
        "layout": layout,
        "ranks": [
            {
                "rank": r,
                "device": p["device"],
                "parameters": p["parameters"],
                "cost_share": round(float(p["cost"]) / total, 6),
                "timings": p["timings"],
            }
            for r, p in enumerate(parts)
        ],
    }


def merge_task_vectors_distributed(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
    coefficients: Sequence[float] | None = None,
    *,
    base: str | None = None,
    family: str | None = None,
    plan: MergePlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layout: Layout = "canonical",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> MergeResult:
    """A drop-in for ``merge_task_vectors``: distributed when launched on several ranks, else exactly it.

    Why one entry point: the CLI calls this unconditionally; ``drm-lightning merge`` then scales out simply by
    being started under torchrun or srun, and a plain run takes the single-process path unchanged.
    """
    _check_options(layout, timeout_s, max_shard_bytes)
    world = detect_world()
    if world.world_size == 1 and world.source != "initialized":
        return merge_task_vectors(
            task_vectors, method, output, params, coefficients,
            base=base, family=family, plan=plan, device=device, progress=progress, max_shard_bytes=max_shard_bytes,
            torch_dtype=torch_dtype, gguf_file=gguf_file,
        )  # fmt: skip
    return distributed_merge(
        task_vectors, method, output, params, coefficients,
        base=base, family=family, plan=plan, device=device, progress=progress, max_shard_bytes=max_shard_bytes,
        layout=layout, timeout_s=timeout_s, world=world, torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip


__all__ = [
    "LAYOUTS",
    "assign_entries",
    "distributed_merge",
    "merge_task_vectors_distributed",
]
