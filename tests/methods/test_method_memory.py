"""Working memory of one parameter's merge stays within 4x its T float32 input deltas, per method (issue 12).

Why a subprocess: the pytest process's RSS carries whatever other tests allocated. One fresh interpreter measures
each method in turn with ``benchmarks/merge_memory.py``'s ``measure_in_process`` (a warm-up call on the same
parameter, ``malloc_trim``, then the peak RSS growth of a second call above the resident inputs), on a mid-size
parameter (T = 5, as in the issue; 15 MiB of inputs) big enough that the interpreter's own noise stays far below
the bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOUND = 4.0
#: every data-free method; on this shape each one's float64 Gram ``eigh`` (the Gram, LAPACK's copy and its workspace:
#: about ``4·k²`` float64 for a ``k``-sided Gram) stays well under the bound, which a wide DRM Gram does not always
#: do (benchmarks/README.md, ``merge_memory.py``). ``wudi`` holds six float64 copies of the parameter (the sum, its
#: gradient's constant term, Adam's offset and two moments, the gradient) and the ``in``-sided Gram: 3.1x here.
#: RegMean is not here: its input Grams are inputs too (``in² · 4`` bytes per task), which this ratio leaves out.
METHODS = [
    "task_arithmetic", "ties", "dare", "dare_ties", "drm_v", "drm_h", "iso_c", "iso_cts", "tsv_m", "wudi_closed",
    "wudi",
]  # fmt: skip
CASES = [("matrix", (768, 1024)), ("elementwise", (1024, 768))]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from merge_memory import measure_in_process
    rows = []
    for method in json.loads(sys.argv[2]):
        for rule, shape in json.loads(sys.argv[3]):  # "elementwise": the rule of non-matrix parameters
            rows.append(measure_in_process(method, tuple(shape), rule, 5, "cpu"))
    print(json.dumps(rows))
    """
)


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # the peak RSS is then what the method holds (merge_memory.py)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks"), json.dumps(METHODS), json.dumps(CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", METHODS)
def test_working_memory_within_four_times_the_inputs(measured: list[dict], method: str) -> None:
    rows = [r for r in measured if r["method"] == method]
    assert len(rows) == len(CASES)
    for row in rows:
        assert row["input_bytes"] == 5 * 768 * 1024 * 4
        assert 0 < row["ratio"] <= BOUND, row
