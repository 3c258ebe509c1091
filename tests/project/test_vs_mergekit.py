"""``benchmarks/vs_mergekit.py --quick``: a tiny Llama, two experts, Task Arithmetic and TIES through both tools'
CLIs from the same mergekit YAML. Skipped where mergekit's own virtualenv is absent (it is never a dependency of
this project: ``--install`` makes it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/mkvenv"))


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "mergekit-yaml").is_file(), reason=f"no mergekit virtualenv at {VENV}")
def test_quick_run_agrees_with_mergekit_on_task_arithmetic(tmp_path: Path) -> None:
    out = tmp_path / "vs.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "vs_mergekit.py"), "--quick", "--json", str(out)]
    command += ["--mergekit_venv", str(VENV), "--work", str(tmp_path / "work")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["task_arithmetic", "ties"]
    for row in rows.values():  # one run of each tool, each with a wall time and a peak
        assert len(row["ours"]) == len(row["mergekit"]) == 1
        assert all(run["wall_s"] > 0 and run["rss_mib"] > 0 for run in row["ours"] + row["mergekit"])
    assert rows["task_arithmetic"]["rel_diff"] < 1e-6  # the same sum in both tools
    assert "| task_arithmetic |" in done.stdout and "| ties |" in done.stdout


@pytest.mark.slow
def test_folders_are_timed_with_the_skeleton_cached_and_with_it_empty(tmp_path: Path) -> None:
    """``--folders`` times the merge of the model folders twice: with the base's skeleton in the benchmark's warm
    cache (filled by one untimed merge) and with an empty cache each run."""
    out, work = tmp_path / "vs.json", tmp_path / "work"
    command = [sys.executable, str(ROOT / "benchmarks" / "vs_mergekit.py"), "--quick", "--no_mergekit", "--folders"]
    command += ["--methods", "task_arithmetic", "--json", str(out), "--work", str(work)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["folders"]) == len(row["folders_first"]) == 1
    assert all(run["wall_s"] > 0 and run["rss_mib"] > 0 for run in row["folders"] + row["folders_first"])
    assert len(list((work / "skeleton-cache" / "skeletons").glob("*.json"))) == 1
    assert "first merge of the base" in done.stdout
