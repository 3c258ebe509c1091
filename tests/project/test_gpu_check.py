"""``scripts/gpu_check.sh``, the one command a lent GPU runs, in its dry mode on the CPU: every step runs, on tiny
shapes, and writes its table, so the first real GPU run is not the script's first run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import merge_speed  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_every_table(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "DRM_GPU_CHECK_SETUP": "0", "DRM_GPU_CHECK_MERGEKIT": "0"}
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    rows = [line.split("|")[1:4] for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    steps = {name.strip(): code.strip() for name, code, _ in rows[1:]}
    assert {"gpu tests (collected)", "merge speed", "merge speed (data-aware)", "merge memory"} <= set(steps)
    assert set(steps.values()) == {"0"}
    assert "tests collected" in (tmp_path / "gpu_tests.txt").read_text()
    for name in ("merge_speed.json", "merge_speed_data.json", "merge_memory.json"):
        assert json.loads((tmp_path / name).read_text())
    speed = json.loads((tmp_path / "merge_speed.json").read_text())["methods"]
    data = json.loads((tmp_path / "merge_speed_data.json").read_text())["methods"]
    assert set(speed) | set(data) == set(merge_speed.METHODS) and not set(speed) & set(data)  # every row, once


def test_unknown_argument_is_one_line(tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == (
        "gpu_check.sh: unknown argument '--fast' (expected --device cuda|cpu, --quick)"
    )
