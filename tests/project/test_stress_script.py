"""``scripts/stress_distributed.sh``'s bookkeeping: a run cut short goes on where it stopped (each style after its
last finished round), and a folder holding another commit's run is refused in one line. The run itself is the
cheapest multi-process test, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "stress_distributed.sh"
CHEAP = "killed_under_torchrun"  # about 2 s: the launch stops before rank 1 joins
CHEAP_TEST = "tests/distributed/test_dead_rank.py::test_a_rank_killed_under_torchrun_before_it_joins_stops_the_launch"


def this_commit() -> str:
    """What the script records for this checkout."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return commit + ("+uncommitted" if dirty.stdout.strip() else "")


def stress(folder: Path, rounds: int, **env: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DRM_STRESS_DIR": str(folder),
        "DRM_VENV": sys.prefix,
        "DRM_STRESS_K": CHEAP,
        "DRM_STRESS_PATHS": CHEAP_TEST.split("::")[0],
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), str(rounds)], capture_output=True, text=True, env=env, timeout=600)


def results(folder: Path) -> list[list[str]]:
    return [line.split("\t") for line in (folder / "results.tsv").read_text().splitlines()]


def line(style: str, round_: int, test: str = CHEAP_TEST) -> str:
    return f"{style}\t{test}\t0\t1.0\t{round_}\n"


@pytest.mark.parametrize("recorded", ["0" * 40, None], ids=["another-commit", "no-record"])
def test_a_folder_holding_another_run_is_refused_in_one_line(tmp_path, recorded):
    (tmp_path / "results.tsv").write_text(line("standalone", 1))
    if recorded is not None:
        (tmp_path / "commit").write_text(recorded + "\n")
    done = stress(tmp_path, 2)
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and str(tmp_path) in errors[0] and "another DRM_STRESS_DIR" in errors[0], done.stderr
    assert results(tmp_path) == [line("standalone", 1).rstrip("\n").split("\t")]


@pytest.mark.parametrize("separate", ["", "1"], ids=["round-per-process", "process-per-test"])
def test_a_run_cut_short_goes_on_where_each_style_stopped(tmp_path, separate):
    # static finished both rounds, standalone only the first: only standalone's round 2 is left
    before = line("standalone", 1) + line("static", 1) + line("static", 2)
    (tmp_path / "results.tsv").write_text(before)
    (tmp_path / "commit").write_text(this_commit() + "\n")
    done = stress(tmp_path, 2, DRM_STRESS_SEPARATE=separate)
    assert done.returncode == 0, done.stderr
    rows = results(tmp_path)
    assert rows[:3] == [row.split("\t") for row in before.splitlines()]
    assert [(row[0], row[1], row[2], row[4]) for row in rows[3:]] == [("standalone", CHEAP_TEST, "0", "2")]
    assert "standalone resumes after round 1" in done.stderr and "static resumes after round 2" in done.stderr
    summary = [text for text in done.stdout.splitlines() if CHEAP_TEST in text]
    assert len(summary) == 2 and all("runs   2  failures   0" in text for text in summary), done.stdout


def test_a_finished_run_runs_nothing_more(tmp_path):
    before = "".join(line(style, n) for n in (1, 2) for style in ("standalone", "static"))
    (tmp_path / "results.tsv").write_text(before)
    (tmp_path / "commit").write_text(this_commit() + "\n")
    done = stress(tmp_path, 2, DRM_STRESS_PARALLEL="1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "results.tsv").read_text() == before
