"""A rank killed (``kill -9``) in the middle of a pipeline stops every other rank within seconds, loudly, leaving
nothing that looks complete.

Two ranks run the tiny recipe with ``--procs_per_expert 1`` under the test session's launcher (``DRM_TEST_LAUNCH``);
rank 1 is killed as it enters (a) its expert group's fit, (b) the distributed merge, (c) the evaluations shared out.
The other rank must exit non-zero within ``BOUND_S`` of the kill (on one node the watch sees the process gone within
``world.WATCH_INTERVAL_S``; torchrun also stops the ranks itself), print one line naming rank 1 and its stage, and
leave no merged folder (a, b) and no report.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.launch import read_logs, reaped, start
from tests.helpers.recipes import tiny_two_task_recipe, write_recipe

#: Seconds from the kill to the last rank's exit that the test allows: the watch looks every 0.5 s, the rest is a
#: loaded 2-core machine's slack (interpreter teardown, torchrun's agent).
BOUND_S = 30.0

STAGES = [
    ("expert group fit", "fitting experts / expert group 1 fits 'animal'"),
    ("distributed merge", "merging / drm_v"),
    ("evaluations shared out", "evaluating"),
]


def _pid_of_rank(text: str, rank: int) -> int | None:
    match = re.search(rf"\[trace pid (\d+)\] rank {rank}: joins the world", text)
    return int(match.group(1)) if match else None


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("what", "stage"), STAGES, ids=[s[0].replace(" ", "-") for s in STAGES])
def test_a_killed_rank_stops_every_rank_fast_and_loudly(tmp_path: Path, what: str, stage: str) -> None:
    recipe = tiny_two_task_recipe(tmp_path)
    recipe["trainer"] = {**recipe["trainer"], "max_epochs": 1}
    path = write_recipe(tmp_path, recipe)
    log = tmp_path / "two.log"
    env = {"DRM_LIGHTNING_TRACE": "1", "DRM_LIGHTNING_DEAD_RANK_S": "10"}
    cli = ["-m", "drm_lightning.cli", "pipeline", "--config", str(path), "--procs_per_expert", "1"]
    launch = start(cli, log, 2, env=env)
    deadline = time.monotonic() + 300
    with reaped(launch):
        killed_at = None
        while killed_at is None and time.monotonic() < deadline and launch.poll() is None:
            text = read_logs(log)
            pid = _pid_of_rank(text, 1)
            if pid is not None and f"[trace pid {pid}] stage {stage}\n" in text:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
            time.sleep(0.05)
        assert killed_at is not None, f"rank 1 never entered {stage!r}:\n{read_logs(log)[-4000:]}"
        launch.wait(timeout=BOUND_S + 30)
        stopped_after = time.monotonic() - killed_at
    out = read_logs(log)
    assert launch.returncode != 0, out[-4000:]
    assert stopped_after < BOUND_S, f"{what}: the other rank took {stopped_after:.0f} s to stop"
    errors = [line for line in out.splitlines() if line.startswith("drm-lightning: error:")]
    assert len(errors) == 1, out[-4000:]  # the survivor's one line; the killed rank says nothing
    assert "rank 1 died" in errors[0] and repr(stage) in errors[0], errors[0]
    run = tmp_path / "run"
    assert not (run / "report.md").exists() and not (run / "report.json").exists()
    if what != "evaluations shared out":
        assert not (run / "merged" / "drm_v" / "merge.json").exists()
