"""Where this process stands among the launched processes, and the collectives that carry plain data and failures
between them.

Why one small module of its own: training (``commands/expert_groups.py``, the pipeline's shared-out evaluations and
merges) and the distributed merge (``merging/engine/distributed.py``) all need the same answers — which rank am I, on
which device, under which launcher (torchrun, srun, an existing process group) — and the same rule that no rank
ever leaves a collective early: each phase ends with an exchange of every rank's outcome, so an error on one rank is
raised on all ranks, naming the rank and its message, instead of leaving the others waiting for a timeout. Data
between ranks is JSON over CPU (gloo) collectives, never pickle.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: ``DRM_LIGHTNING_TRACE=1``: every rank prints what it decided and what each exchange sent and received (stderr).
TRACE_ENV = "DRM_LIGHTNING_TRACE"

#: After how many seconds without a heartbeat another rank counts as gone (``DRM_LIGHTNING_DEAD_RANK_S``); a rank on
#: this node whose process is gone counts as gone at the next look (every ``WATCH_INTERVAL_S``).
DEAD_RANK_ENV = "DRM_LIGHTNING_DEAD_RANK_S"
DEFAULT_DEAD_RANK_S = 30.0
WATCH_INTERVAL_S = 0.5

#: How many seconds a rank waits for the others to first reach the rendezvous store (``DRM_LIGHTNING_JOIN_S``): a
#: client for the store's host to accept it, every rank for the ranks of which the store holds no sign yet. After
#: that the missing ranks count as never joined (killed or crashed before they got there). torchrun's own
#: rendezvous waits as long (its ``join_timeout``).
JOIN_ENV = "DRM_LIGHTNING_JOIN_S"
DEFAULT_JOIN_S = 600.0

#: Collectives wait for the slowest rank's whole share of the work (a long merge), so the timeout must cover it.
DEFAULT_TIMEOUT_S = 4 * 3600.0


@dataclass(frozen=True)
class WorldInfo:
    """Where this process stands among the launched processes (the ranks of a fit, a merge, a pipeline).

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA if available, else CPU; a CUDA device that is not there is refused up front."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    return dev


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


# ---------------------------------------------------------------------------------------------------------------
# JSON over CPU collectives: plain data between ranks, never pickle.
# ---------------------------------------------------------------------------------------------------------------


def encode_json(obj: Any) -> torch.Tensor:
    """``obj`` as JSON bytes in a tensor that owns its memory.

    Why not the ``frombuffer`` view itself: a collective's worker thread can drop its last reference to an input
    tensor after the call has returned; a tensor whose storage is a Python ``bytearray`` then needs the GIL to free
    it, and a thread that takes the GIL while the interpreter is exiting aborts the process ("terminate called
    without an active exception": seen on rank 0, the broadcaster, under load).
    """
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).clone()


def group_broadcast_json(obj: Any, rank: int, group: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    try:
        return _group_broadcast_json(obj, rank, group)
    except RuntimeError as err:  # a peer gone: say which (and stop) rather than gloo's "Connection closed by peer"
        explain_failed_collective(err)
        raise


def _group_broadcast_json(obj: Any, rank: int, group: Any) -> Any:
    payload = encode_json(obj) if rank == 0 else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if rank != 0:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group)
    return json.loads(bytes(payload.numpy()).decode())


def group_all_gather_json(obj: Any, world_size: int, group: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    try:
        return _group_all_gather_json(obj, world_size, group)
    except RuntimeError as err:  # a peer gone: say which (and stop) rather than gloo's "Connection closed by peer"
        explain_failed_collective(err)
        raise


def _group_all_gather_json(obj: Any, world_size: int, group: Any) -> list[Any]:
    payload = encode_json(obj)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(bytes(g[: int(s.item())].numpy()).decode()) for g, s in zip(gathered, sizes, strict=True)]


def trace(message: str) -> None:
    """One line on stderr under ``DRM_LIGHTNING_TRACE=1``, prefixed with the launcher's rank and the pid.

    Why: a multi-process failure is read from one log of interleaved ranks; tracing every rank's task list and
    every exchange's payload shows which rank decided what (how the lost-task race was found). Why one ``write``
    with its newline, not ``print``: ``print`` writes the text and the newline separately, so two ranks tracing at
    the same moment into one log could leave a line glued to the other rank's (a stress run's test then missed a
    rank's "stage merging" line); one short write to a shared file lands whole.
    """
    if os.environ.get(TRACE_ENV) == "1":
        sys.stderr.write(f"[trace pid {os.getpid()}] {message}\n")
        sys.stderr.flush()


def failure_status(err: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": str(err), "type": type(err).__name__, "user": isinstance(err, ValueError)}


def raise_failures(statuses: Sequence[Mapping[str, Any]], own: BaseException | None) -> None:
    """Raise on every rank when any rank failed: a rank's own error as it was, the others' by rank and message."""
    if own is not None:
        raise own
    for rank, status in enumerate(statuses):
        if not status["ok"]:
            message = f"rank {rank} failed: {status['type']}: {status['error']}"
            raise ValueError(message) if status["user"] else RuntimeError(message)


def group_exchange(
    own: BaseException | None, payload: Mapping[str, Any], world_size: int, group: Any
) -> list[dict[str, Any]]:
    sent = failure_status(own) if own is not None else {"ok": True, **payload}
    trace(f"exchange sends {json.dumps(sent)[:400]}")
    statuses = group_all_gather_json(sent, world_size, group)
    trace(f"exchange received {json.dumps(statuses)[:800]}")
    if own is not None or not all(s["ok"] for s in statuses):
        raise_failures(statuses, own)
    return statuses


# ---------------------------------------------------------------------------------------------------------------


# Process group
# ---------------------------------------------------------------------------------------------------------------


#: This process's rendezvous stores (one per address: every incarnation of the default group meets on it) and how
#: many incarnations each had.
_stores: dict[tuple[str, int, int, bool], Any] = {}
_incarnations: dict[tuple[str, int, int, bool], int] = {}
#: The stores this process could not reach (their host never joined): no second try when it leaves.
_unreachable: set[tuple[str, int, int, bool]] = set()


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when unset).

    Raises:
        ValueError: one line naming the variable and its value.
    """
    value = os.environ.get(name, str(default))
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{name}={value!r}: expected a positive number of seconds")
    return seconds


def _plural(ranks: Sequence[int]) -> str:
    """``rank 1`` or ``ranks 1, 3``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _wait_for_store(host: str, port: int, rank: int, agent: bool, join_s: float) -> None:
    """Wait until the rendezvous store at ``host:port`` accepts connections, for at most ``join_s`` seconds.

    Why here, with a plain socket: ``TCPStore``'s client retries for its whole timeout (the collectives' 4 hours)
    when the store's host never came up (rank 0 killed before it got there, under srun), and logs a C++ backtrace
    per try; this says once which rank never joined.

    Raises:
        ConnectionError: the store's host never came up, naming it, the address and the bound.
    """
    end = time.monotonic() + join_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, join_s)):
                return
        except OSError:
            if time.monotonic() >= end:
                break
            time.sleep(0.2)
    if agent:
        raise ConnectionError(
            f"the launcher's rendezvous store at {host}:{port} did not answer within {join_s:g} s ({JOIN_ENV}); "
            f"rank {rank} stops"
        )
    raise ConnectionError(
        f"rank 0 never joined: no rendezvous store at {host}:{port} (rank 0 hosts it) {join_s:g} s after rank {rank} "
        f"looked for it ({JOIN_ENV}; killed or crashed before getting there?); rank {rank} stops"
    )


def _store_address(world: WorldInfo) -> tuple[str, int, int, bool]:
    """(host, port, world size, agent store?) of this process's rendezvous."""
    if world.source == "torchrun":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world.world_size} is set but {', '.join(missing)} is not")
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return os.environ["MASTER_ADDR"], _env_int(os.environ, "MASTER_PORT"), world.world_size, agent
    return str(world.main_address), int(world.main_port or 0), world.world_size, False


def world_store(world: WorldInfo, timeout: timedelta) -> Any:
    """The store this process's default groups meet on: one per rendezvous address, made on the first call.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) a client of the launcher's agent store at
    ``MASTER_ADDR:MASTER_PORT``; otherwise (srun, a hand-set environment) rank 0 hosts it there (multi-tenant, so
    Lightning's own store on the same port shares the server) and the other ranks connect to it.

    Why one store for the whole process: a second ``TCPStore`` server on the same port, after the first group was
    destroyed, races with the ranks still connected to the first.

    A client waits at most ``DRM_LIGHTNING_JOIN_S`` seconds (``DEFAULT_JOIN_S``) for the store's host to come up, then
    raises ``ConnectionError`` naming it; the watch started here ends this process when another rank has left no
    sign in the store that long after this one arrived (``_Watch``): a rank that never joined is not waited for.
    """
    address = _store_address(world)
    if address not in _stores:
        host, port, size, agent = address
        hosts = not agent and world.rank == 0
        join_s = _env_seconds(JOIN_ENV, DEFAULT_JOIN_S)
        trace(f"rank {world.rank}: reaches the rendezvous store at {host}:{port}")
        if not hosts and size > 1:
            try:
                _wait_for_store(host, port, world.rank, agent, min(join_s, timeout.total_seconds()))
            except ConnectionError:
                _unreachable.add(address)
                raise
        _stores[address] = dist.TCPStore(
            host, port, size, is_master=hosts, timeout=timeout, wait_for_workers=False, multi_tenant=True,
        )  # fmt: skip
        _incarnations[address] = 0
        if size > 1 and _watch is None:
            _start_watch(host, port, world.rank, size, hosts_store=hosts, join_s=join_s)
    return _stores[address]


def init_default_group(world: WorldInfo, device: torch.device, timeout: timedelta) -> None:
    """Create the default process group of every launched process, unless one exists.

    Each incarnation of the group (a pipeline makes one to agree on the experts to fit, leaves it while its expert
    groups train, then makes another for the merges) rendezvouses under a key prefix of its own
    (``drm_lightning/world/<n>/``) in this process's one store (``world_store``). Why: torchrun's agent store
    outlives process groups, and a second group under torch's own prefix reads the first one's keys (a rank's old
    address: the rendezvous then waits on a peer that left, "Gloo connectFullMesh failed ... Connect timeout").
    Every rank makes the same incarnations in the same order, so the prefixes agree.
    """
    if not dist.is_initialized():
        store = world_store(world, timeout)
        address = _store_address(world)
        _incarnations[address] += 1
        prefix = f"drm_lightning/world/{_incarnations[address]}/"
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        trace(f"rank {world.rank}: joins the world, store prefix {prefix}")
        dist.init_process_group(
            backend, store=dist.PrefixStore(prefix, store), world_size=world.world_size, rank=world.rank,
            timeout=timeout,
        )  # fmt: skip
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
    timeout = timedelta(seconds=float(timeout_s))
    if world.world_size > 1 or world.source == "initialized":
        init_default_group(world, rank_device(device, world.local_rank), timeout)
    if world.source == "initialized" and _watch is None:  # a group Lightning made: the launcher's store is there too
        launched = detect_world(dict(os.environ))
        if launched.world_size == world.world_size > 1:
            world_store(launched, timeout)  # starts the watch of the other ranks
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
        statuses = group_exchange(error, {"payload": payload}, dist.get_world_size(), group)
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
        return group_broadcast_json(obj, dist.get_rank(), group)
    finally:
        dist.destroy_process_group(group)


# ---------------------------------------------------------------------------------------------------------------
# Watching the other ranks: a rank that dies stops every rank within seconds, with one line naming it and its stage
# ---------------------------------------------------------------------------------------------------------------

_stages: list[str] = []
_watch: _Watch | None = None


def current_stage() -> str:
    """What this process is doing, as the pipeline and the merges name it (``"start-up"`` before any stage)."""
    return " / ".join(_stages) or "start-up"


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Within the block this process's stage is ``name`` (nested in the enclosing one); the other ranks read it to
    name the stage of a rank that died."""
    _stages.append(name)
    _publish_stage()
    trace(f"stage {current_stage()}")
    try:
        yield
    finally:
        _stages.pop()
        _publish_stage()


def _publish_stage() -> None:
    if _watch is not None:
        _watch.publish_stage()


class _Watch:
    """A thread that says every ``WATCH_INTERVAL_S`` that this rank is alive and looks at the others; when one is gone
    (its process on this node ended, no heartbeat for ``DEAD_RANK_ENV`` seconds, or the store's host is gone), or
    when ranks left no sign in the store ``JOIN_ENV`` seconds after this one arrived (they never joined), it prints one
    line naming those ranks (and the stage) and ends this process with status 1.

    Why a thread and ``os._exit``: the main thread may be inside a long computation or a C++ wait (a rendezvous, a
    collective) that no exception reaches; what a merge or a fit leaves is staged beside its output under a
    temporary name that the next run removes, so nothing complete-looking is left.
    """

    PREFIX = "drm_lightning/watch/"

    def __init__(
        self, host: str, port: int, rank: int, size: int, hosts_store: bool, dead_after_s: float, join_s: float
    ) -> None:
        # a client of its own: the main thread's blocking rendezvous on the other client must not hold up heartbeats
        self.store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=60))
        self.address, self.rank, self.size, self.hosts_store = f"{host}:{port}", rank, size, hosts_store
        self.dead_after_s, self.join_s = dead_after_s, join_s
        self.arrived_at = time.monotonic()
        self.host = socket.gethostname()
        self.leaving = threading.Event()
        self.lock = threading.RLock()
        self.seen: dict[int, tuple[int, float]] = {}  # rank -> (heartbeats, when that count was first seen)
        self.finished: set[int] = set()
        self.joined: set[int] = {rank}  # the ranks that left a sign in the store (their "who" or "left" key)
        self.store.set(self._key("who", rank), f"{self.host} {os.getpid()}")
        self.publish_stage()
        self.thread = threading.Thread(target=self._run, name="drm_lightning-rank-watch", daemon=True)
        self.thread.start()

    def _key(self, what: str, rank: int) -> str:
        return f"{self.PREFIX}{what}/{rank}"

    def publish_stage(self) -> None:
        with self.lock:
            if not self.leaving.is_set():
                self.store.set(self._key("stage", self.rank), current_stage())

    def _run(self) -> None:
        while not self.leaving.wait(WATCH_INTERVAL_S):
            self.look()

    def look(self, beat: bool = True) -> None:
        """One look at the other ranks (and a heartbeat): a rank that is gone ends this process."""
        try:
            with self.lock:
                if self.leaving.is_set():
                    return
                if beat:
                    self.store.add(self._key("beat", self.rank), 1)
                for other in range(self.size):
                    if other != self.rank and other not in self.finished:
                        why = self._gone(other)
                        if why is not None:
                            self._stop(other, why)
                missing = self.never_joined()
                if missing and time.monotonic() - self.arrived_at > self.join_s:
                    self._stop(None, self._never_joined_line(missing))
        except Exception as err:  # noqa: BLE001 - the store's host (rank 0 or the launcher) is gone
            if not self.leaving.is_set():
                self._stop(None, f"the rendezvous store at {self.address} stopped answering ({err})")

    def explain(self, err: BaseException) -> None:
        """A collective failed with ``err``: if a rank is gone (looking for up to the heartbeat bound), say which
        and end this process; otherwise return (the caller raises ``err``)."""
        end = time.monotonic() + self.dead_after_s + WATCH_INTERVAL_S
        while time.monotonic() < end and not self.leaving.is_set():
            self.look(beat=False)
            time.sleep(WATCH_INTERVAL_S)

    def _gone(self, other: int) -> str | None:
        """Why rank ``other`` is gone, or ``None`` while it lives (or has not arrived yet)."""
        seen = self.seen
        if self.store.check([self._key("left", other)]):
            self.joined.add(other)
            status = self.store.get(self._key("left", other)).decode()
            if status == "ok":
                self.finished.add(other)
                return None
            return f"failed ({status})"
        if not self.store.check([self._key("who", other)]):
            return None  # not arrived yet: its rendezvous waits for it (at most ``join_s``: ``look``)
        self.joined.add(other)
        host, pid = self.store.get(self._key("who", other)).decode().rsplit(" ", 1)
        if host == self.host and not _process_alive(int(pid)):
            return f"died (its process {pid} is gone: killed, out of memory?)"
        beats, now = self.store.add(self._key("beat", other), 0), time.monotonic()
        if other not in seen or seen[other][0] != beats:
            seen[other] = (beats, now)
        elif now - seen[other][1] > self.dead_after_s:
            return f"stopped answering ({now - seen[other][1]:.0f} s without a heartbeat)"
        return None

    def never_joined(self) -> list[int]:
        """The ranks that left no sign in the store at the last look (not arrived yet, or never will)."""
        return [r for r in range(self.size) if r not in self.joined]

    def _never_joined_line(self, missing: Sequence[int]) -> str:
        them = "it" if len(missing) == 1 else "them"
        return (
            f"{_plural(missing)} never joined: no sign of {them} at the rendezvous store {self.address} "
            f"{self.join_s:g} s after rank {self.rank} arrived ({JOIN_ENV}; killed or crashed before getting there?)"
        )

    def _stop(self, other: int | None, why: str) -> None:
        if other is None:
            message = f"{why}: rank {self.rank} stops during {current_stage()!r}"
        else:
            try:
                theirs = self.store.get(self._key("stage", other)).decode()
            except Exception:  # noqa: BLE001 - the stage is a courtesy
                theirs = "?"
            message = f"rank {other} {why} during {theirs!r}; rank {self.rank} stops during {current_stage()!r}"
        print(f"drm-lightning: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    def leave(self, failure: str | None) -> None:
        """Say this rank is done (``failure``: with that error) and stop watching; the rank hosting the store waits
        (a few seconds at most) for the others to say so too, so none reads a vanished store as a death."""
        with self.lock:
            self.leaving.set()
            try:
                self.store.set(self._key("left", self.rank), "ok" if failure is None else failure[:300])
                end = time.monotonic() + 10.0
                while self.hosts_store and time.monotonic() < end:
                    keys = [self._key("left", r) for r in range(self.size)]
                    if all(self.store.check([k]) for k in keys):
                        break
                    time.sleep(0.1)
            except Exception:  # noqa: BLE001 - leaving: nothing left to tell
                pass


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this machine runs (a zombie, killed but not reaped by its launcher, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc: only heartbeats tell


def _start_watch(host: str, port: int, rank: int, size: int, hosts_store: bool, join_s: float = DEFAULT_JOIN_S) -> None:
    global _watch
    dead_after = _env_seconds(DEAD_RANK_ENV, DEFAULT_DEAD_RANK_S)
    _watch = _Watch(host, port, rank, size, hosts_store, dead_after, join_s)
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            """The launcher stops this rank (torchrun does when another rank died): name that rank if it is gone."""
            if _watch is not None:
                _watch.look(beat=False)
                missing = _watch.never_joined()
                never = f"; {_plural(missing)} never joined the rendezvous" if missing else ""
                _watch._stop(None, f"stopped by the launcher (signal {signum}{never})")
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)


def explain_failed_collective(err: BaseException) -> None:
    """A collective raised ``err``: when a rank is gone, end this process with the line naming it (see ``_Watch``)."""
    if _watch is not None:
        _watch.explain(err)


def leave_watch(failure: str | None = None) -> None:
    """Tell the other ranks this one is done (``failure``: the one-line error it ends with) and stop watching them.

    Called by ``exit_cleanup`` when a command ends; a rank that ends without it (killed) is seen as dead.
    """
    global _watch
    if _watch is None and failure is not None and not _stores and not _unreachable:
        _announce_early_failure()
    if _watch is not None:
        _watch.leave(failure)
        _watch = None


def _announce_early_failure() -> None:
    """This rank fails before it ever met the others: reach the rendezvous store now (briefly) so that the others,
    waiting there for it, hear of it instead of waiting for the rendezvous timeout."""
    try:
        world = detect_world(dict(os.environ))
        if world.world_size > 1:
            world_store(world, timedelta(seconds=10))
    except Exception as err:  # noqa: BLE001 - best effort: the launcher's own error stands
        trace(f"could not tell the other ranks of this rank's failure: {err}")
