"""A merge at a fixed λ written straight into a model folder (``export.model_folder.merge_to_model``, what
``drm-lightning merge`` does without ``--keep_delta``) gives the same files, byte for byte, as the merged-delta
folder followed by ``save_merged_model``: every method, dense and LoRA inputs, float32 and bfloat16 deltas, encoder
and decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drm_lightning.export.model_folder import merge_to_model, save_merged_model
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.record import MERGE_FILE
from drm_lightning.merging.methods.registry import METHODS

LAM = 0.7


@pytest.fixture(scope="module")
def llama_bf16_tvs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three bfloat16 task vectors of a tiny Llama (decoder family: untied lm_head left out of the backbone)."""
    from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors

    root = tmp_path_factory.mktemp("llama_bf16")
    llama = build_tiny_model(root / "llama", "llama")
    return write_task_vectors(llama, root / "tv", 3, family="decoder", dtype=torch.bfloat16, seed=5)


@pytest.fixture(scope="module")
def stats_tvs(dense_tvs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``dense_tvs`` with random input statistics (the methods that need them: RegMean)."""
    from tests.helpers.merge_inputs import with_random_statistics

    return with_random_statistics(dense_tvs, tmp_path_factory.mktemp("stats"))


CASES = [
    *(
        ("stats_tvs" if method.needs_statistics else "dense_tvs", name)
        for name, method in METHODS.items()
        if not method.block_by_block  # RegMean++ merges with the tasks' data (tests/evaluation/test_block_merge.py)
    ),
    *(("lora_tvs", method) for method in ("task_arithmetic", "ties", "tsv_m")),
    *(("llama_bf16_tvs", method) for method in ("task_arithmetic", "drm_v")),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _record(folder: Path) -> dict:
    record = json.loads((folder / MERGE_FILE).read_text())
    record.pop("timings")  # the phases differ: no delta is written and read back
    return record


@pytest.mark.parametrize(("inputs", "method"), CASES)
def test_straight_to_the_model_folder_equals_delta_then_apply(
    inputs: str, method: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tvs = request.getfixturevalue(inputs)
    params = {"seed": 3} if method == "dare" else {}
    # one folder name for both: the model card names its folder
    straight_dir, applied_dir = tmp_path / "straight" / "out", tmp_path / "applied" / "out"
    result = merge_to_model(tvs, method, straight_dir, LAM, params, progress=False)
    assert result.output == straight_dir and result.merged_parameters > 0
    merge_task_vectors(tvs, method, tmp_path / "delta", params, progress=False)
    save_merged_model(tmp_path / "delta", LAM, applied_dir)

    straight, applied = _files(straight_dir), _files(applied_dir)
    assert sorted(straight) == sorted(applied)
    differ = sorted(name for name in straight if straight[name] != applied[name])
    assert differ == [MERGE_FILE]  # weights, config, tokenizer, heads and model card: the same bytes
    a, b = _record(straight_dir), _record(applied_dir)
    assert a.pop("merged_delta") is None and b.pop("merged_delta") == str((tmp_path / "delta").resolve())
    assert a == b
    # no Δ folder and no temporary beside the straight output
    assert sorted(p.name for p in straight_dir.parent.iterdir()) == ["out"]
