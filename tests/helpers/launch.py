"""Starting and reaping the extra processes of multi-process tests, launched the way docs/multinode.md tells users to.

Launch styles (``LAUNCH_STYLES``), all on localhost:

- ``standalone``: ``torchrun --standalone --nproc_per_node N`` (one node; c10d rendezvous, the agent's store);
- ``static``: ``torchrun --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port P --nproc_per_node N``
  (the several-node form, static rendezvous, on one node);
- ``srun``: N processes started by hand with the variables srun gives each task (``SLURM_NTASKS``,
  ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE``, ``SLURM_JOB_ID``) and ``MASTER_ADDR``/``MASTER_PORT``.

``DRM_TEST_LAUNCH`` picks the style of the tests that do not name one (default ``standalone``);
``scripts/stress_distributed.sh`` runs every multi-process test under each.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LAUNCH_STYLES = ("standalone", "static", "srun")
LAUNCH_ENV = "DRM_TEST_LAUNCH"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher's ``--master_port``)."""
    return free_ports(1)[0]


#: Where the kernel's own port choices start (``ip_local_port_range``), when it cannot be read.
EPHEMERAL_LOW = 32768


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range: ports it hands to sockets bound to port 0 and to outgoing
    connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports free on 127.0.0.1 right now, drawn at random below the kernel's ephemeral range
    (all bound at once, so no two are the same: two launches on one port would meet in one store).

    Why below that range: a port the kernel chose for a socket bound to port 0 is free again once the socket closes,
    and the kernel may give it to the next outgoing connection (a gloo rank of another test running beside this one)
    before the launch binds it: EADDRINUSE, seen once in 8 rounds of ``scripts/stress_distributed.sh`` with the
    styles side by side. Below the range only another explicit bind can take it. Where the range leaves too few
    ports below it, the kernel chooses, as before.
    """
    low = ephemeral_low()
    rng = random.SystemRandom()  # not the global generator: tests seed it, and every xdist worker alike
    sockets: list[socket.socket] = []
    try:
        for _ in range(50 * count if low - 1024 >= 1024 else 0):
            if len(sockets) == count:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randrange(max(1024, low - 16384), low)))
            except OSError:  # in use (or taken by this call already)
                s.close()
                continue
            sockets.append(s)
        while len(sockets) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch_style() -> str:
    """The launch style of this test session (``DRM_TEST_LAUNCH``, default ``standalone``)."""
    style = os.environ.get(LAUNCH_ENV, "standalone")
    if style not in LAUNCH_STYLES:
        raise ValueError(f"{LAUNCH_ENV}={style!r}: expected one of {list(LAUNCH_STYLES)}")
    return style


class Launch:
    """The processes of one launch (the launcher, or every srun-style rank), as one process to wait for or kill.

    Attributes:
        procs: the processes started (one launcher; or one per rank for ``srun``).
        style: how they were started.
    """

    def __init__(self, procs: Sequence[subprocess.Popen], style: str) -> None:
        self.procs = list(procs)
        self.style = style

    @property
    def returncode(self) -> int | None:
        """``None`` while any process runs; else the first non-zero status (0 when all succeeded)."""
        codes = [p.poll() for p in self.procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c != 0), 0)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        for p in self.procs:
            p.wait(None if end is None else max(end - time.monotonic(), 0.01))
        return int(self.returncode or 0) if self.returncode is not None else 0

    def kill(self) -> None:
        """Kill every process of the launch and every rank under it (torchrun starts its workers in sessions of
        their own, so killing the launcher's session alone would orphan them)."""
        for p in self.procs:
            if p.poll() is None:
                for pid in [*_descendants(p.pid), p.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def communicate(self) -> None:
        for p in self.procs:
            p.wait()


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children first), from /proc (none where there is no /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def rank_pid(launch: Launch, rank: int) -> int | None:
    """The process of ``rank`` under a torchrun ``launch`` (a worker whose environment says ``RANK=<rank>``), or
    ``None`` while the launcher has not started it yet."""
    want = f"RANK={rank}".encode()
    for pid in _descendants(launch.procs[0].pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env:
            return pid
    return None


@contextmanager
def reaped(proc: subprocess.Popen | Launch) -> Iterator[subprocess.Popen | Launch]:
    """Yield ``proc``; if the block fails (a timeout, an assertion), kill and wait for it, so no rank outlives its
    test and holds its ports."""
    try:
        yield proc
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


REPO = Path(__file__).resolve().parents[2]
_LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "DRM_LIGHTNING_DEBUG")  # fmt: skip


def pipeline_env() -> dict[str, str]:
    """The environment of a launched command: this checkout's package, one thread, offline, and none of the
    pytest process's launcher or SLURM variables (a rank learns its place from its own launcher only)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def srun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The variables srun gives task ``rank`` of ``nproc`` on one node (block distribution), and the rendezvous."""
    return {"SLURM_NTASKS": str(nproc), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS_PER_NODE": str(nproc), "SLURM_TASKS_PER_NODE": str(nproc), "SLURM_NODEID": "0",
            "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "drm-test", "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def launcher_args(style: str, nproc: int) -> list[str]:
    """The ``python -m torch.distributed.run`` arguments of a torchrun style, as docs/multinode.md writes them."""
    if style == "standalone":
        return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if style == "static":
        return ["-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "--nproc_per_node", str(nproc)]  # fmt: skip
    raise ValueError(f"launch style {style!r} has no launcher")


def start(
    program: Sequence[str],
    log: Path,
    nproc: int,
    style: str | None = None,
    env: dict[str, str] | None = None,
    before_rank: Callable[[int], None] | None = None,
) -> Launch:
    """Start ``python <program>`` on ``nproc`` ranks in launch ``style`` (default ``launch_style()``), every rank's
    stdout and stderr going to the file ``log`` (srun style: ``log`` of rank 0, ``<log>.rank<r>`` of the others;
    ``finish`` reads them all).

    Args:
        program: the interpreter's arguments after ``python`` (``["-m", "drm_lightning.cli", ...]`` or a script).
        env: extra variables for every rank.
        before_rank: srun style only: called with ``r`` before rank ``r`` starts (a test that starts a rank late).

    Why a file, not a pipe: a test waits on one process at a time, and a pipe that nobody reads meanwhile fills
    and stalls every rank writing into it, for as long as the other process runs.
    """
    style = style or launch_style()
    base = {**pipeline_env(), **(env or {})}
    if style != "srun":
        with open(log, "w") as out:  # the child holds its own descriptor: ours closes at once
            proc = subprocess.Popen([sys.executable, *launcher_args(style, nproc), *program], env=base, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return Launch([proc], style)
    port = free_port()
    procs = []
    for rank in range(nproc):
        if before_rank is not None:
            before_rank(rank)
        rank_env = {**base, **srun_env(rank, nproc, port)}
        with open(rank_log(log, rank), "w") as out:
            procs.append(subprocess.Popen([sys.executable, *program], env=rank_env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return Launch(procs, style)


def rank_log(log: Path, rank: int) -> Path:
    """Where an srun-style rank writes: ``log`` for rank 0, ``<log>.rank<r>`` for the others."""
    return log if rank == 0 else log.with_name(f"{log.name}.rank{rank}")


def start_pipeline(
    args: Sequence[str], log: Path, nproc: int = 1, style: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen | Launch:
    """Start ``drm-lightning pipeline args`` (``nproc > 1``: on ``nproc`` ranks, see ``start``), its output going
    to the file ``log`` (read it with ``finish``)."""
    cli = ["-m", "drm_lightning.cli", "pipeline", *args]
    if nproc > 1:
        return start(cli, log, nproc, style, env)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *cli], env={**pipeline_env(), **(env or {})}, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen | Launch, log: Path, deadline: float) -> str:
    """Wait for ``proc`` until ``deadline`` (``time.monotonic()``; a hang raises ``TimeoutExpired``); its output
    (every srun-style rank's log, rank 0's first)."""
    proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    return read_logs(log)


def read_logs(log: Path) -> str:
    """``log`` and the srun-style ranks' ``<log>.rank<r>`` files beside it, in rank order."""
    others = sorted(log.parent.glob(f"{log.name}.rank*"), key=lambda p: int(p.name.rsplit("rank", 1)[1]))
    return "".join(p.read_text() for p in [log, *others] if p.is_file())
