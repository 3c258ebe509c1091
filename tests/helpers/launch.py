"""Starting and reaping the extra processes of multi-process tests (pipelines, torchrun launches on localhost)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
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
    """The environment of a launched pipeline: this checkout's package, one thread, offline, and none of the
    pytest process's launcher or SLURM variables (a rank learns its place from its own launcher only)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def start_pipeline(args: Sequence[str], log: Path, nproc: int = 1) -> subprocess.Popen:
    """Start ``drm-lightning pipeline args`` (``nproc > 1``: under ``torchrun`` on localhost, static rendezvous on a
    free port), its stdout and stderr, every rank's, going to the file ``log`` (read it with ``finish``).

    Why static rendezvous, not ``--standalone``: the expert-group tests ran on it for many CI runs without a miss,
    and once under ``--standalone`` (its c10d rendezvous and agent store) the failing-group test saw rank 1 report
    no failure for a task it could not load; the cause was not found, so the tests keep the launch they were proven
    on. Why a file, not a pipe: a test waits on one process at a time, and a pipe that nobody reads meanwhile fills
    and stalls every rank writing into it, for as long as the other process runs.
    """
    cli = ["-m", "drm_lightning.cli", "pipeline", *args]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]  # fmt: skip
    cmd = [sys.executable, *(launcher if nproc > 1 else []), *cli]
    with open(log, "w") as out:  # the child holds its own descriptor: ours closes at once
        return subprocess.Popen(cmd, env=pipeline_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, deadline: float) -> str:
    """Wait for ``proc`` until ``deadline`` (``time.monotonic()``; a hang raises ``TimeoutExpired``); its output."""
    proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    return log.read_text()
