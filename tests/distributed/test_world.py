"""The default process group made, left and made again on one store (what a pipeline with expert groups does): each
incarnation exchanges its own round's data, and the late rank of a round is waited for.

Why: torchrun's agent store outlives process groups; a second default group under torch's own key prefix read the
first one's keys (rank 1's old address) and rank 0 timed out connecting to a peer that had left ("Gloo
connectFullMesh failed ... Connect timeout"). Each incarnation now has a prefix of its own
(``world.init_default_group``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from drm_lightning.world import WorldInfo, init_default_group
from tests.helpers.launch import finish, reaped, start

WORKER = """
import json, os, sys, time
import torch.distributed as dist
from drm_lightning.world import detect_world, gather_results, join_world

rank = detect_world().rank
rounds = []
for n in range(2):
    if rank == 1 and n > 0:
        time.sleep(3)  # rank 0 reaches the next rendezvous first: stale keys would be read now
    join_world("cpu", timeout_s=15)
    rounds.append(gather_results(None, f"round{n}-rank{rank}", timeout_s=15))
    dist.destroy_process_group()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(rounds, f)
"""


@pytest.mark.multiprocess
def test_each_incarnation_of_the_world_exchanges_its_own_data(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "launch.log"
    launch = start([str(tmp_path / "worker.py"), str(tmp_path)], log, 2)  # DRM_TEST_LAUNCH's style
    with reaped(launch):
        out = finish(launch, log, time.monotonic() + 120)
    assert launch.returncode == 0, out[-4000:]
    expected = [[f"round{n}-rank0", f"round{n}-rank1"] for n in range(2)]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_each_incarnation_rendezvouses_under_keys_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two incarnations on one agent store (a world of one): the second writes keys of its own instead of finding
    the first's (torch's own prefix restarts with every default group)."""
    from datetime import timedelta

    agent = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)  # what torchrun's agent hosts
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    counts = []
    for _ in range(2):
        init_default_group(WorldInfo(1, 0, 0, "torchrun"), torch.device("cpu"), timedelta(seconds=10))
        dist.destroy_process_group()
        counts.append(agent.num_keys())
    assert counts[1] > counts[0], counts


def test_a_process_killed_but_not_reaped_counts_as_gone() -> None:
    """The watch's look at a rank on this node: a zombie (killed, its launcher not yet reaped it) is gone."""
    import os
    import signal
    import subprocess
    import sys

    from drm_lightning.world import _process_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _process_alive(child.pid) and time.monotonic() < deadline:  # a zombie until waited for
            time.sleep(0.05)
        assert not _process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not _process_alive(child.pid)  # reaped: no such process


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_dead_rank_bound_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from drm_lightning import world

    monkeypatch.setenv(world.DEAD_RANK_ENV, value)
    monkeypatch.setattr(world, "_Watch", lambda *args: pytest.fail("started a watch"))
    with pytest.raises(ValueError, match=rf"DRM_LIGHTNING_DEAD_RANK_S='{value}'"):
        world._start_watch("127.0.0.1", 1, 0, 2, hosts_store=False)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_join_bound_is_refused_before_any_connection(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from datetime import timedelta

    from drm_lightning import world

    monkeypatch.setenv(world.JOIN_ENV, value)
    monkeypatch.setattr(world, "_wait_for_store", lambda *args: pytest.fail("looked for the store"))
    with pytest.raises(ValueError, match=rf"DRM_LIGHTNING_JOIN_S='{value}'"):
        world.world_store(WorldInfo(2, 1, 1, "slurm", "127.0.0.1", 1), timedelta(seconds=10))


def test_the_ranks_that_never_joined_are_named_once_the_join_bound_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 4 watches; rank 2 has arrived (this process stands in for it), ranks 1 and 3 left no sign: nothing
    is said within ``join_s`` of rank 0's arrival, then one line names both."""
    import os
    import socket

    from drm_lightning import world

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    stops: list[tuple[int | None, str]] = []
    monkeypatch.setattr(world._Watch, "_stop", lambda self, other, why: stops.append((other, why)))
    watch = world._Watch("127.0.0.1", store.port, 0, 4, hosts_store=False, dead_after_s=30.0, join_s=30.0)
    try:
        store.set("drm_lightning/watch/who/2", f"{socket.gethostname()} {os.getpid()}")
        watch.look(beat=False)
        assert stops == [] and watch.never_joined() == [1, 3]
        watch.arrived_at -= 31.0
        watch.look(beat=False)
    finally:
        watch.leave(None)
    assert stops, "nothing said after the join bound"
    other, why = stops[-1]
    assert other is None and why.startswith("ranks 1, 3 never joined: no sign of them"), why
    assert f"127.0.0.1:{store.port} 30 s after rank 0 arrived (DRM_LIGHTNING_JOIN_S" in why, why


def test_a_trace_line_is_written_whole_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks trace into one shared log: a line written in pieces (``print``'s text, then its newline) could be glued to
    another rank's line written in between, and a test waiting for ``... stage merging / drm_v\\n`` would miss it."""
    import io
    import sys

    from drm_lightning.world import TRACE_ENV, trace

    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    recorder = Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    monkeypatch.setenv(TRACE_ENV, "1")
    trace("stage merging / drm_v")
    assert len(recorder.writes) == 1 and recorder.writes[0].endswith("] stage merging / drm_v\n")
    monkeypatch.setenv(TRACE_ENV, "0")
    trace("not traced")
    assert len(recorder.writes) == 1
