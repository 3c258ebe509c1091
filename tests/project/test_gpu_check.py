"""``scripts/gpu_check.sh``, the one command a lent GPU runs, in its dry mode on the CPU: every step runs, on tiny
shapes, and writes its table, so the first real GPU run is not the script's first run; and its bookkeeping: a step
with no time left is skipped with a line, the files are packed for the device call's 8-file limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import merge_speed  # noqa: E402

STEPS = [
    "setup",
    "gpu tests (collected)",
    "merge speed",
    "merge speed (data-aware)",
    "merge memory",
    "vs mergekit",
    "merge speed (baselines)",
]


def run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The script on the CPU with no setup, no mergekit and no wheels (the mergekit step has its own test)."""
    env = {
        **os.environ,
        "OUT": str(out),
        "DRM_GPU_CHECK_SETUP": "0",
        "DRM_GPU_CHECK_PACK": "0",
        "MERGEKIT_VENV": str(out / "no-mergekit"),
        "DRM_GPU_CHECK_WHEELS": str(out / "no-wheels"),
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def steps(summary: str) -> dict[str, str]:
    """The summary's step table (its first table; the steps' own tables follow it): step -> status."""
    lines = summary.splitlines()
    start = lines.index("| step | status | seconds | limit s | output |") + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    return {row.split("|")[1].strip(): row.split("|")[2].strip() for row in lines[start:end]}


@pytest.mark.slow
def test_dry_run_writes_every_table(tmp_path: Path) -> None:
    run = run_script(tmp_path, "--device", "cpu", "--quick")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    status = steps(summary)
    assert list(status) == STEPS
    assert status["setup"].startswith("skipped (DRM_GPU_CHECK_SETUP=0")
    assert status["vs mergekit"].startswith("skipped (no mergekit")
    assert {status[name] for name in STEPS if name not in ("setup", "vs mergekit")} == {"ran"}
    assert "tests collected" in (tmp_path / "gpu_tests.txt").read_text()
    for name in ("merge_speed.md", "merge_speed_data.md", "merge_memory.md", "merge_speed_baselines.md"):
        assert f"## {name}" in summary  # each step's output follows the table
    speed, data, baselines = (
        json.loads((tmp_path / f"{name}.json").read_text())["methods"]
        for name in ("merge_speed", "merge_speed_data", "merge_speed_baselines")
    )
    assert set(speed) | set(data) == set(merge_speed.METHODS) and not set(speed) & set(data)  # every row, once
    assert {key: list(row["impls"]) for key, row in speed.items()} == {key: ["drm_lightning"] for key in speed}
    assert {key: list(row["impls"]) for key, row in baselines.items()} == {key: ["naive"] for key in speed}
    for key, row in data.items():
        assert list(row["impls"]) == (["drm_lightning"] if key.startswith("learn") else ["drm_lightning", "naive"])
    memory = json.loads((tmp_path / "merge_memory.json").read_text())["rows"]
    assert memory and not any(row["warmup"] for row in memory)


def test_no_time_left_skips_every_step_and_packs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = run_script(out, "--device", "cpu", "--quick", DRM_GPU_CHECK_BUDGET_S="0", DRM_GPU_CHECK_PACK="1")
    assert run.returncode == 1, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.md"]
    status = steps((out / "summary.md").read_text())
    assert list(status) == STEPS
    assert status["vs mergekit"].startswith("skipped (no mergekit")  # told apart before the clock
    assert {status[name] for name in STEPS[1:] if name != "vs mergekit"} == {"skipped (no time left)"}
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert "summary.md" in tar.getnames()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fast"], "gpu_check.sh: unknown argument '--fast' (expected --device cuda|cpu, --quick)"),
        (["--device", "tpu"], "gpu_check.sh: --device must be cuda or cpu, got 'tpu'"),
    ],
)
def test_bad_argument_is_one_line(args: list[str], message: str) -> None:
    run = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == message
