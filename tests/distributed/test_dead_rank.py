"""A rank killed (``kill -9``) in the middle of a pipeline, or before it ever reached the rendezvous, stops every other
rank within a stated bound, loudly, leaving nothing that looks complete.

Two ranks run the tiny recipe with ``--procs_per_expert 1``; rank 1 is killed as it enters (a) its expert group's
fit, (b) the distributed merge, (c) the evaluations shared out. The other rank must exit non-zero within ``BOUND_S``
of the kill (on one node the watch sees the process gone within ``world.WATCH_INTERVAL_S``; torchrun also stops the
ranks itself), print one line naming rank 1 and its stage, and leave no merged folder (a, b) and no report.

Launch styles: every stage runs under the session's style (``DRM_TEST_LAUNCH``, default ``standalone``), and the
expert group's fit runs srun-style too, where no launcher stops the survivor and the watch alone must (rank 0 waits
in the gloo rendezvous after its own group, a C++ wait no exception reaches). ``scripts/stress_distributed.sh`` with
``DRM_STRESS_STYLES="standalone static srun"`` runs every stage under every style (each case about 20 s here).

A rank killed before it joins: srun-style, where the join bound (``DRM_LIGHTNING_JOIN_S``) stops the other rank; and
under torchrun, where the launcher stops it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from drm_lightning.world import JOIN_ENV
from tests.helpers.launch import launch_style, rank_pid, read_logs, reaped, start
from tests.helpers.recipes import tiny_two_task_recipe, write_recipe

#: Seconds from the kill to the last rank's exit that the test allows: the watch looks every 0.5 s, the rest is a
#: loaded 2-core machine's slack (interpreter teardown, torchrun's agent).
BOUND_S = 30.0

STAGES = {
    "expert group fit": "fitting experts / expert group 1 fits 'animal'",
    "distributed merge": "merging / drm_v",
    "evaluations shared out": "evaluating",
}
#: (what, launch style or None for the session's): every stage under the session's style, the group fit srun-style.
CASES = [*((what, None) for what in STAGES), ("expert group fit", "srun")]

#: ``DRM_LIGHTNING_JOIN_S`` of the never-joined test, and the slack it allows beyond it (the watch looks every
#: 0.5 s; a loaded machine's teardown).
JOIN_S = 5.0
JOIN_SLACK_S = 15.0


def _case_id(case: tuple[str, str | None]) -> str:
    what, style = case
    return what.replace(" ", "-") + (f"-{style}" if style else "")


def _pid_of_rank(text: str, rank: int) -> int | None:
    match = re.search(rf"\[trace pid (\d+)\] rank {rank}: joins the world", text)
    return int(match.group(1)) if match else None


def _errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("drm-lightning: error:")]


def _pipeline(tmp_path: Path) -> list[str]:
    recipe = tiny_two_task_recipe(tmp_path)
    recipe["trainer"] = {**recipe["trainer"], "max_epochs": 1}
    path = write_recipe(tmp_path, recipe)
    return ["-m", "drm_lightning.cli", "pipeline", "--config", str(path), "--procs_per_expert", "1"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("what", "style"), CASES, ids=[_case_id(c) for c in CASES])
def test_a_killed_rank_stops_every_rank_fast_and_loudly(tmp_path: Path, what: str, style: str | None) -> None:
    if style is not None and style == launch_style():
        pytest.skip(f"the session's own launch style ({style}) runs this stage already")
    stage = STAGES[what]
    log = tmp_path / "two.log"
    env = {"DRM_LIGHTNING_TRACE": "1", "DRM_LIGHTNING_DEAD_RANK_S": "10"}
    launch = start(_pipeline(tmp_path), log, 2, style=style, env=env)
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
    # the survivor itself exits non-zero: rank 0's process srun-style, torchrun's (which reports any failed rank)
    survivor = launch.procs[0]
    assert survivor.returncode not in (0, None), out[-4000:]
    assert stopped_after < BOUND_S, f"{what} ({launch.style}): the other rank took {stopped_after:.0f} s to stop"
    errors = _errors(out)
    assert len(errors) == 1, out[-4000:]  # the survivor's one line; the killed rank says nothing
    assert "rank 1 died" in errors[0] and repr(stage) in errors[0], errors[0]
    run = tmp_path / "run"
    assert not (run / "report.md").exists() and not (run / "report.json").exists()
    if what != "evaluations shared out":
        assert not (run / "merged" / "drm_v" / "merge.json").exists()


#: (rank killed at once, what the other rank's line says): the store's host (the other rank cannot connect), and
#: rank 1 (rank 0's watch finds no sign of it in the store).
NEVER_JOINED = [
    (0, "rank 0 never joined: no rendezvous store at 127.0.0.1:"),
    (1, "rank 1 never joined: no sign of it at the rendezvous store"),
]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_killed_before_it_joins_stops_the_other_within_the_join_bound(tmp_path: Path) -> None:
    """srun-style (no launcher watches the ranks): one rank is killed at once, long before it reaches the rendezvous
    store (rank 0 hosts it). The other must not wait for the collectives' timeout (4 hours): it exits with status 1
    at most ``DRM_LIGHTNING_JOIN_S`` (plus slack) after it reached the store, with one line naming the rank that
    never joined and the bound. The cases of ``NEVER_JOINED`` run side by side (each mostly waits)."""
    env = {"DRM_LIGHTNING_TRACE": "1", JOIN_ENV: f"{JOIN_S:g}"}
    runs = []
    for killed, says in NEVER_JOINED:
        folder = tmp_path / f"killed{killed}"
        folder.mkdir()
        launch = start(_pipeline(folder), folder / "two.log", 2, style="srun", env=env)
        os.kill(launch.procs[killed].pid, signal.SIGKILL)  # still starting Python: nowhere near the store
        runs.append((killed, says, folder, launch))
    arrived: dict[int, float] = {}
    stopped: dict[int, float] = {}
    deadline = time.monotonic() + 120 + JOIN_S
    try:
        while len(stopped) < len(runs) and time.monotonic() < deadline:
            for killed, _, folder, launch in runs:
                survivor = 1 - killed
                if killed not in arrived and f"rank {survivor}: reaches the rendezvous store" in read_logs(
                    folder / "two.log"
                ):
                    arrived[killed] = time.monotonic()
                if killed not in stopped and launch.procs[survivor].poll() is not None:
                    stopped[killed] = time.monotonic()
            time.sleep(0.05)
        for _, _, _, launch in runs:
            launch.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for _, _, _, launch in runs:
            launch.kill()
            launch.communicate()
    for killed, says, folder, launch in runs:
        survivor = 1 - killed
        out = read_logs(folder / "two.log")
        assert launch.procs[survivor].returncode == 1, out[-4000:]
        assert killed in arrived, out[-4000:]
        waited = stopped[killed] - arrived[killed]
        assert waited < JOIN_S + JOIN_SLACK_S, f"rank {survivor} stopped {waited:.0f} s after it reached the store"
        errors = _errors(out)
        assert len(errors) == 1, out[-4000:]
        line = errors[0]
        assert says in line and f"{JOIN_S:g} s after rank {survivor}" in line and JOIN_ENV in line, line
        assert not (folder / "run" / "report.md").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_killed_under_torchrun_before_it_joins_stops_the_launch(tmp_path: Path) -> None:
    """Under torchrun (the session's style): rank 1's process is killed as soon as the launcher started it, seconds
    before it could reach the rendezvous store. The launcher sees it die and stops rank 0 (a torchrun worker is
    never left waiting on the store): the launch exits non-zero within ``BOUND_S``, torchrun's failure summary
    names rank 1 and its signal, and nothing that looks complete is left."""
    if launch_style() == "srun":
        pytest.skip("no launcher watches srun-style ranks: the never-joined test covers them")
    log = tmp_path / "two.log"
    launch = start(_pipeline(tmp_path), log, 2, env={"DRM_LIGHTNING_TRACE": "1"})
    with reaped(launch):
        deadline, pid = time.monotonic() + 120, None
        while pid is None and time.monotonic() < deadline and launch.poll() is None:
            pid = rank_pid(launch, 1)
            time.sleep(0.01)
        assert pid is not None, read_logs(log)[-4000:]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        launch.wait(timeout=BOUND_S + 30)
        stopped_after = time.monotonic() - killed_at
    out = read_logs(log)
    assert "rank 1: joins the world" not in out, out[-4000:]  # killed before it got anywhere near the store
    assert launch.returncode not in (0, None), out[-4000:]
    assert stopped_after < BOUND_S, f"torchrun ({launch.style}): the launch took {stopped_after:.0f} s to stop"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", out), out[-4000:]
    assert not (tmp_path / "run" / "report.md").exists() and not (tmp_path / "run" / "merged").exists()
