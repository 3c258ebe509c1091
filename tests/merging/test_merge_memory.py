"""Host memory of a whole merge stays bounded by about one model, not T models.

Why a subprocess: RSS of the pytest process carries everything other tests allocated. A fresh interpreter imports
the merger, loads the base model once (so one-time costs such as lazy imports and allocator arenas are paid),
frees it, takes its RSS as the baseline and then polls RSS from a thread while it merges T = 8 task vectors and
applies the merged delta into a ``save_pretrained`` folder. The model (~64 MB of float32 weights) is big enough
that its size dominates the interpreter's own noise; the 8 task vectors together are 8× that, so a merger that
held them (or kept their memory maps open) would fail by a wide margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors

pytestmark = pytest.mark.slow

T = 8
#: peak RSS growth allowed during merge + apply, in units of one model's weight bytes
BOUND = 1.5
#: ~64 MB of float32 weights in many parameters of at most 1 MB: the bound is about the whole model, and a
#: parameter's T deltas (plus the float64 working copies of the methods) stay well below it.
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=20,
    num_attention_heads=4,
    intermediate_size=1024,
    vocab_size=1024,
    max_position_embeddings=128,
)

MEASURE = textwrap.dedent(
    """
    import gc, json, sys, threading, time
    from pathlib import Path

    import psutil

    from drm_lightning.export.model_folder import save_merged_model
    from drm_lightning.merging.engine.merger import merge_task_vectors
    from drm_lightning.models.backbone import load_backbone

    root = Path(sys.argv[1])
    tvs = sorted((root / "tvs").iterdir())
    model = load_backbone(str(root / "base"), "encoder")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    gc.collect()

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peaks = {"merge": baseline, "apply": baseline}
    phase, done = ["merge"], threading.Event()

    def poll():
        while not done.is_set():
            rss = proc.memory_info().rss
            peaks[phase[0]] = max(peaks[phase[0]], rss)
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    merge_task_vectors(tvs, "task_arithmetic", root / "merged", progress=False, max_shard_bytes=size // 16)
    phase[0] = "apply"
    t1 = time.perf_counter()
    save_merged_model(root / "merged", 0.5, root / "applied", max_shard_size=size // 16)
    t2 = time.perf_counter()
    done.set()
    thread.join()
    print(json.dumps({
        "model_bytes": size,
        "growth": {k: (v - baseline) / size for k, v in peaks.items()},
        "seconds": {"merge": t1 - t0, "apply": t2 - t1},
    }))
    """
)


def test_merge_and_apply_peak_memory_is_about_one_model(tmp_path: Path) -> None:
    base = build_tiny_model(tmp_path / "base", "bert", **MODEL)
    tvs = write_task_vectors(base, tmp_path / "tvs", T)
    assert len(tvs) == T
    # One intra-op thread: the check is about memory, and on a shared 2-core machine spinning threads only add time.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", MEASURE, str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    model_mb = report["model_bytes"] / 1e6
    assert 60 < model_mb < 100, report
    for phase, growth in report["growth"].items():
        assert growth <= BOUND, f"{phase}: peak RSS grew by {growth:.2f}x the model ({model_mb:.0f} MB): {report}"
    assert (tmp_path / "applied" / "config.json").is_file()
