"""A process group left alive is destroyed at exit, before the interpreter tears down (drm_lightning.exit_cleanup)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.launch import free_port

REPO = Path(__file__).resolve().parents[2]

# The check is registered before drm_lightning is imported, so it runs after drm_lightning's handler (atexit is
# last-in, first-out) and sees what that handler left.
SCRIPT = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("group alive after the handlers:", dist.is_initialized(), flush=True))
import drm_lightning
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", world_size=1, rank=0)
group = dist.new_group(backend="gloo")  # a sub-group too, as a merge makes
dist.all_reduce(__import__("torch").ones(3), group=group)
print("group alive before exit:", dist.is_initialized(), flush=True)
"""


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_a_group_left_alive_is_destroyed_at_exit() -> None:
    done = _run(SCRIPT.format(port=free_port()))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "group alive before exit: True" in done.stdout
    assert "group alive after the handlers: False" in done.stdout


def test_without_a_group_the_handler_does_nothing_and_imports_no_torch() -> None:
    done = _run("import sys, drm_lightning; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
