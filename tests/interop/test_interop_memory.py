"""Host memory of converting a fine-tuned model into a task vector stays within 1.5x of one model.

Why it matters: the obvious conversion (``from_pretrained`` both models, subtract state dicts, ``save_file``) holds
two models plus a float32 delta, 3x or more. Here the base is loaded once and the fine-tuned shards are read and
written one tensor at a time. Measured as in ``tests/merging/test_merge_memory.py``: a fresh interpreter pays its
one-time costs by loading the base once and freeing it, then polls its RSS from a thread while it converts a sharded
~64 MB ``BertForSequenceClassification`` (the same size in float32 as its delta).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.interop_models import bert_base, bert_classifier

pytestmark = pytest.mark.slow

BOUND = 1.5
MODEL = dict(hidden_size=256, num_hidden_layers=20, num_attention_heads=4, intermediate_size=1024, vocab_size=1024)

MEASURE = textwrap.dedent(
    """
    import gc, json, sys, threading, time
    from pathlib import Path
    import psutil
    from drm_lightning.interop.inputs import convert
    from drm_lightning.models.backbone import load_backbone

    root = Path(sys.argv[1])
    model = load_backbone(str(root / "base"), "encoder")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    gc.collect()
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak, done = [baseline], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    convert(str(root / "full"), root / "tv", base=str(root / "base"))
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    print(json.dumps({"model_bytes": size, "growth": (peak[0] - baseline) / size, "seconds": seconds}))
    """
)


def test_conversion_peak_memory_is_about_one_model(tmp_path: Path) -> None:
    config = {**MODEL, "max_position_embeddings": 128}
    base = bert_base(tmp_path / "base", **config)
    bert_classifier(base, tmp_path / "full", seed=1, shard="8MB", **config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, cwd=repo
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert 60e6 < report["model_bytes"] < 100e6, report
    assert report["growth"] <= BOUND, f"peak RSS grew by {report['growth']:.2f}x the model: {report}"
    assert (tmp_path / "tv" / "task_vector.safetensors").stat().st_size > 0.9 * report["model_bytes"]
