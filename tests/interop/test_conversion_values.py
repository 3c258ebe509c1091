"""What a conversion writes, value by value, and that experts of one base share one loaded base.

- every dense delta is ``W_ft - W_0`` in float32, exactly (the float32 difference of the two tensors as saved),
  and a parameter the fine-tune left unchanged is left out and counted (``meta.json["source"]["unchanged"]``);
- a fine-tuned tensor holding NaN, +Inf or -Inf is refused in one line naming it, with nothing written;
- ``import_inputs`` (``merge`` given model and adapter folders) loads the base once for all its experts and writes
  the same bytes as converting each expert on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.interop import write as write_module
from drm_lightning.interop.checkpoint import CheckpointError
from drm_lightning.interop.inputs import convert, import_inputs
from tests.helpers.interop_models import bert_base, bert_classifier, bert_lora

PREFIX = "bert."  # BertForSequenceClassification's backbone prefix


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conversion_values")
    base = bert_base(root / "base")
    full = bert_classifier(base, root / "full", seed=1)
    # One backbone tensor put back to the base's: a parameter the fine-tune left unchanged.
    tensors = load_file(full / "model.safetensors")
    tensors[PREFIX + "embeddings.LayerNorm.bias"] = load_file(base / "model.safetensors")["embeddings.LayerNorm.bias"]
    save_file(tensors, full / "model.safetensors", metadata={"format": "pt"})
    return {
        "root": root,
        "base": base,
        "full": full,
        "full2": bert_classifier(base, root / "full2", seed=2),
        "lora": bert_lora(base, root / "lora", seed=3),
    }


def test_dense_deltas_are_the_float32_differences_and_unchanged_ones_are_left_out(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    tv = convert(str(folders["full"]), tmp_path / "tv", base=str(folders["base"]))
    written = load_file(tv / "task_vector.safetensors")
    base = load_file(folders["base"] / "model.safetensors")
    tuned = load_file(folders["full"] / "model.safetensors")
    want = {name: tuned[PREFIX + name].float() - w.float() for name, w in base.items()
            if not name.startswith("pooler.")}  # fmt: skip  # the backbone is loaded without its pooler
    unchanged = sorted(name for name, delta in want.items() if not delta.any())
    assert unchanged == ["embeddings.LayerNorm.bias"]
    assert sorted(written) == sorted(set(want) - set(unchanged))
    for name, delta in written.items():
        assert delta.dtype == torch.float32 and torch.equal(delta, want[name]), name
    assert json.loads((tv / "meta.json").read_text())["source"]["unchanged"] == len(unchanged)


@pytest.mark.parametrize(("value", "position"), [(float("nan"), 0), (float("inf"), -1), (float("-inf"), 7)])
def test_a_non_finite_tensor_is_refused_naming_it_and_nothing_is_written(
    folders: dict[str, Path], tmp_path: Path, value: float, position: int
) -> None:
    source = tmp_path / "broken"
    source.mkdir()
    for path in folders["full"].iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    tensors = load_file(source / "model.safetensors")
    key = PREFIX + "encoder.layer.1.attention.self.query.weight"
    tensors[key].view(-1)[position] = value
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.query\.weight.*NaN or Inf"):
        convert(str(source), tmp_path / "tv", base=str(folders["base"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_experts_of_one_base_load_it_once_and_write_what_each_conversion_writes(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["full", "full2", "lora"]
    alone = {name: convert(str(folders[name]), tmp_path / f"alone_{name}", base=str(folders["base"])) for name in names}
    loads = []
    real = write_module.load_backbone
    monkeypatch.setattr(write_module, "load_backbone", lambda *a, **k: loads.append(a) or real(*a, **k))
    with import_inputs([str(folders[n]) for n in names], tmp_path / "merged", base=str(folders["base"])) as got:
        assert len(loads) == 1
        for name, folder in zip(names, got, strict=True):
            files = sorted(p.name for p in alone[name].iterdir())
            assert sorted(p.name for p in Path(folder).iterdir()) == files, name
            for file in files:
                assert (Path(folder) / file).read_bytes() == (alone[name] / file).read_bytes(), (name, file)
