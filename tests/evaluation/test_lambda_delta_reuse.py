"""A λ search reads Δ_merged from disk once when it fits in memory, and streams it per λ otherwise.

Reads are counted at the one place shards are opened (``merged_delta.open_safetensors``); the evaluation itself is
replaced by a function of the weights, so the search runs without datamodules and what it sees is still the model
at each λ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drm_lightning.evaluation import merged as merged_module
from drm_lightning.evaluation import multitask
from drm_lightning.evaluation.lambda_search import search_merged_lambda
from drm_lightning.evaluation.merged import MergedBackbone
from drm_lightning.io import merged_delta
from drm_lightning.merging.engine.apply import apply_merged_delta
from drm_lightning.merging.engine.merger import merge_task_vectors
from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors

GRID = [0.25, 0.5, 1.0, 1.5]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lambda_reuse")
    tvs = write_task_vectors(build_tiny_model(root / "bert", "bert"), root / "tvs", 2, kind="dense")
    # small shards: Δ_merged spans several files, so "once" means every shard once
    merge_task_vectors(tvs, "task_arithmetic", root / "merged", progress=False, max_shard_bytes=20_000)
    return root / "merged", tvs


@pytest.fixture
def shard_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = merged_delta.open_safetensors

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(merged_delta, "open_safetensors", counting)
    return opened


def _weights_score(model: torch.nn.Module, *args, **kwargs) -> dict[str, dict[str, float]]:
    weight = next(p for n, p in model.named_parameters() if n.endswith("query.weight"))
    return {"task": {"accuracy": float(weight.double().sum())}}


@pytest.mark.parametrize("keep", [True, False])
def test_lambda_search_reads_delta_once_when_kept(
    merged: tuple[Path, list[Path]], shard_reads: list[str], keep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, tvs = merged
    count = len(list((folder / merged_delta.MERGED_DIR).glob("*.safetensors")))
    assert count >= 3
    monkeypatch.setattr(multitask, "evaluate_backbone", _weights_score)
    backbone = MergedBackbone(folder, keep_delta=keep)
    assert backbone.keeps_delta is keep
    result = search_merged_lambda(backbone, tvs, {}, {"task": {"accuracy": 1.0}}, GRID)
    assert [p.lam for p in result.curve] == GRID
    passes = 1 if keep else 1 + len(GRID)  # loading (λ = 0), then each λ
    assert sorted(shard_reads) == sorted(list(set(shard_reads)) * passes) and len(shard_reads) == passes * count


def test_kept_delta_gives_the_same_bytes_as_applying(merged: tuple[Path, list[Path]]) -> None:
    folder, _ = merged
    kept, streamed = MergedBackbone(folder, keep_delta=True), MergedBackbone(folder, keep_delta=False)
    for lam in (0.5, 1.5, 0.5):
        want = apply_merged_delta(folder, lam).state_dict()
        for backbone in (kept, streamed):
            got = backbone.at(lam).state_dict()
            assert all(torch.equal(got[k], v) for k, v in want.items())


def test_keep_decided_by_available_memory(merged: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = merged
    size = merged_module.merged_delta_bytes(folder)
    assert size == sum(p.numel() * 4 for _, p in merged_delta.iter_merged_delta(folder))
    import drm_lightning.memory as memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * size)
    assert MergedBackbone(folder).keeps_delta
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * size - 1)
    assert not MergedBackbone(folder).keeps_delta
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: None)
    assert not MergedBackbone(folder).keeps_delta
