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

import atexit
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from drm_lightning.merging.merger import (
    DEFAULT_MAX_SHARD_BYTES,
    MERGED_DIR,
    MergeResult,
    MergeSetup,
    ShardWriter,
    check_max_shard_bytes,
    check_merge_space,
    copy_heads,
    merge_parameters,
    merge_task_vectors,
    prepare_merge,
    resolve_device,
    write_index,
    write_merge_record,
)
from drm_lightning.merging.plan import MergePlan, PlanEntry
from drm_lightning.merging.reader import TaskVectorReader
from drm_lightning.merging.registry import get_method
from drm_lightning.task_vectors.format import (
    atomic_dir,
    open_safetensors,
    remove_stale_temporaries,
    temporary_prefix,
)

Layout = Literal["canonical", "per_rank"]
LAYOUTS: tuple[str, ...] = ("canonical", "per_rank")
#: Collectives wait for the slowest rank's whole share of the merge, so the timeout must cover a long merge.
DEFAULT_TIMEOUT_S = 4 * 3600.0


@dataclass(frozen=True)
class WorldInfo:
    """Where this process stands among the merge processes.

    Attributes:
        world_size: number of processes.
        rank: this process's global rank.
        local_rank: its rank on its node (picks ``cuda:LOCAL_RANK``).
        source: what said so: ``"initialized"`` (a process group already exists), ``"torchrun"`` (WORLD_SIZE/RANK
            environment, as torchrun and ``torch.distributed.launch`` set), ``"slurm"`` (srun), ``"single"``.
        main_address: the rendezvous host (``None``: taken from ``MASTER_ADDR`` by ``env://``).
        main_port: the rendezvous port (``None``: from ``MASTER_PORT``).
    """

    world_size: int
    rank: int
    local_rank: int
    source: str
    main_address: str | None = None
    main_port: int | None = None

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0


def _env_int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r}: expected an integer") from None


def detect_world(environ: Mapping[str, str] | None = None) -> WorldInfo:
    """This process's rank and world size, from an existing process group or the launcher's environment.

    Precedence: an initialised ``torch.distributed`` group; ``WORLD_SIZE``/``RANK`` (torchrun); SLURM's
    ``SLURM_NTASKS``/``SLURM_PROCID``/``SLURM_LOCALID`` under srun (Lightning's ``SLURMEnvironment``, which also
    derives the rendezvous address from the node list and the port from the job id); otherwise one process.

    Raises:
        ValueError: a variable that is not an integer, or a rank outside ``[0, world_size)``, naming the variable.
    """
    if environ is None and dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_world_size(), dist.get_rank(), _env_int(os.environ, "LOCAL_RANK", 0), "initialized")
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world = WorldInfo(
            _env_int(env, "WORLD_SIZE"), _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK", 0), "torchrun"
        )
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world_size = _env_int(env, "SLURM_NTASKS")
        world = WorldInfo(world_size, _env_int(env, "SLURM_PROCID", 0), _env_int(env, "SLURM_LOCALID", 0), "slurm")
        if world_size > 1:
            world = WorldInfo(world.world_size, world.rank, world.local_rank, "slurm", *_slurm_rendezvous(env))
    else:
        return WorldInfo(1, 0, 0, "single")
    if world.world_size < 1:
        raise ValueError(f"world size {world.world_size} ({world.source}): must be at least 1")
    if not 0 <= world.rank < world.world_size:
        raise ValueError(f"rank {world.rank} ({world.source}): outside [0, world size {world.world_size})")
    return world


def _slurm_rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """Rendezvous address and port under srun, derived as Lightning's ``SLURMEnvironment`` does (so a merge and a
    fit in one job agree): ``MASTER_ADDR`` or the first node of ``SLURM_NODELIST``; ``MASTER_PORT`` or 15000 plus
    the last four digits of ``SLURM_JOB_ID`` (12910 without one).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    nodes = env.get("SLURM_NODELIST", "127.0.0.1")
    address = env.get("MASTER_ADDR") or SLURMEnvironment.resolve_root_node_address(nodes)
    if "MASTER_PORT" in env:
        return address, _env_int(env, "MASTER_PORT")
    job_id = env.get("SLURM_JOB_ID", "")
    return address, int(job_id[-4:]) + 15000 if job_id.isdigit() else 12910


def is_global_zero(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank 0 (or the only process): the one that writes after a merge."""
    return detect_world(environ).is_global_zero


def rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device a rank merges on: ``None``/``"cuda"`` -> ``cuda:LOCAL_RANK`` (modulo the visible GPUs, so one GPU
    per task under SLURM's ``--gpus-per-task`` works too) when CUDA is there, else CPU; an indexed device as given.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


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


# ---------------------------------------------------------------------------------------------------------------
# JSON over CPU collectives: plain data between ranks, never pickle.
# ---------------------------------------------------------------------------------------------------------------


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _broadcast_json(obj: Any, rank: int, group: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    payload = _encode(obj) if rank == 0 else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if rank != 0:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group)
    return json.loads(bytes(payload.numpy()).decode())


def _all_gather_json(obj: Any, world_size: int, group: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    payload = _encode(obj)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(bytes(g[: int(s.item())].numpy()).decode()) for g, s in zip(gathered, sizes, strict=True)]


def _failure(err: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": str(err), "type": type(err).__name__, "user": isinstance(err, ValueError)}


def _raise_remote(statuses: Sequence[Mapping[str, Any]], own: BaseException | None) -> None:
    """Raise on every rank when any rank failed: a rank's own error as it was, the others' by rank and message."""
    if own is not None:
        raise own
    for rank, status in enumerate(statuses):
        if not status["ok"]:
            message = f"rank {rank} failed: {status['type']}: {status['error']}"
            raise ValueError(message) if status["user"] else RuntimeError(message)


def _exchange(
    own: BaseException | None, payload: Mapping[str, Any], world_size: int, group: Any
) -> list[dict[str, Any]]:
    statuses = _all_gather_json(_failure(own) if own is not None else {"ok": True, **payload}, world_size, group)
    if own is not None or not all(s["ok"] for s in statuses):
        _raise_remote(statuses, own)
    return statuses


# ---------------------------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------------------------


def _init_group(world: WorldInfo, device: torch.device, timeout: timedelta) -> Any:
    """Join (or create) the process group; return a new gloo group of all ranks for this merge's CPU collectives.

    Why a group of its own: the default group may be NCCL-only (one a Lightning fit on GPUs created), and its
    timeout (Lightning's 30 minutes) need not cover a rank waiting for the slowest rank's whole share.
    """
    _init_default_group(world, device, timeout)
    return dist.new_group(backend="gloo", timeout=timeout)


def _init_default_group(world: WorldInfo, device: torch.device, timeout: timedelta) -> None:
    """Create the default process group of every launched process from the environment, unless one exists.

    A group created here stays up for the rest of the process (destroyed at exit): a second merge in the same
    process (a pipeline merging several methods) joins it again, whereas re-initialising under torchrun's shared
    rendezvous store after a ``destroy_process_group`` is not reliable (it can hang).
    """
    if not dist.is_initialized():
        if world.source == "torchrun":
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ValueError(f"WORLD_SIZE={world.world_size} is set but {', '.join(missing)} is not")
            init_method = "env://"
        else:
            init_method = f"tcp://{world.main_address}:{world.main_port}"
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=init_method, world_size=world.world_size, rank=world.rank, timeout=timeout
        )
        atexit.register(_destroy_group)
    if dist.get_world_size() != world.world_size:
        raise ValueError(f"process group has {dist.get_world_size()} ranks, the environment says {world.world_size}")


def join_world(
    device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, world: WorldInfo | None = None
) -> WorldInfo:
    """Join the default process group of all launched processes (created from the launcher's environment if none
    exists yet); one process: nothing to join. Returns this process's place.

    Why public: a pipeline whose ranks worked apart (each trained its own experts) meets again here before the
    merges; the rendezvous waits up to ``timeout_s`` for the slowest rank.
    """
    world = world if world is not None else detect_world()
    if world.world_size > 1 or world.source == "initialized":
        _init_default_group(world, rank_device(device, world.local_rank), timedelta(seconds=float(timeout_s)))
    return world


def all_ranks_ok(error: BaseException | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """A barrier that carries failures: every rank says whether its own work failed; if any did, every rank raises.

    The failing rank re-raises its own exception; the others raise ``ValueError`` (bad input) or ``RuntimeError``
    naming the rank and its message. Needs the default process group (``join_world``); without one, only
    ``error`` itself is raised.
    """
    gather_results(error, None, timeout_s)


def gather_results(error: BaseException | None, payload: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Every rank's ``payload`` (plain JSON data), in rank order, on every rank; raised everywhere if any rank failed.

    Why: ranks that shared out work (each evaluated its own merged models) must all learn every result, and one
    rank's failure must stop the others instead of leaving them waiting in a collective. Without a process group
    this is ``[payload]`` (or ``error`` raised).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return [payload]
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=float(timeout_s)))
    try:
        statuses = _exchange(error, {"payload": payload}, dist.get_world_size(), group)
    finally:
        dist.destroy_process_group(group)
    return [status["payload"] for status in statuses]


def broadcast_json(obj: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Global rank 0's ``obj`` (plain JSON data, never pickle) on every rank; ``obj`` itself without a group.

    Why: ranks that decide from the file system (is this merge current?) must all take rank 0's decision, or one
    would enter a collective that the others skip.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=float(timeout_s)))
    try:
        return _broadcast_json(obj, dist.get_rank(), group)
    finally:
        dist.destroy_process_group(group)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
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
    writer = ShardWriter(part, max_shard_bytes, prefix=f"delta-rank{rank:05d}")
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
        write_index(out, weight_map, sum(int(p["total_size"]) for p in parts))
        return len(weight_map)
    writer = ShardWriter(out, max_shard_bytes)
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
                error, shared = err, _failure(err)
        shared = _broadcast_json(shared, rank, group)
        if error is not None:
            raise error
        if not shared["ok"]:
            _raise_remote([shared], None)
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
        parts = _exchange(own, result, size, group)
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
                        tmp, setup, timings, merged_count, lam=None,
                        distributed=_record(world, layout, parts, setup.entries),
                    )  # fmt: skip
            except Exception as err:  # noqa: BLE001
                own = err
        final = _exchange(own, {"timings": timings} if rank == 0 else {}, size, group)
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
    "DEFAULT_TIMEOUT_S",
    "LAYOUTS",
    "WorldInfo",
    "all_ranks_ok",
    "assign_entries",
    "broadcast_json",
    "detect_world",
    "distributed_merge",
    "gather_results",
    "is_global_zero",
    "join_world",
    "merge_task_vectors_distributed",
    "rank_device",
]
