"""The one model-folder writer (``export.folder_writer``): which tokenizer files a folder gets, and what a folder
with and without a merge record holds. Byte-for-byte equality of whole merged folders is in
``test_merge_to_model.py``; the task folders' logits in ``tests/interop/test_interop.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

from drm_lightning.export.folder_writer import save_tokenizer, write_folder
from drm_lightning.io.tokenizer_files import TOKENIZER_FILES
from drm_lightning.merging.engine.record import MERGE_FILE
from tests.helpers.merge_inputs import TINY_CONFIGS
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model() -> BertModel:
    return BertModel(BertConfig(**TINY_CONFIGS["bert"]))


@pytest.mark.parametrize("only", ["preprocessor_config.json", "special_tokens_map.json"])
def test_a_base_without_core_tokenizer_files_gets_no_tokenizer(tmp_path: Path, only: str) -> None:
    # A CLIP folder whose tokenizer is gone: AutoTokenizer would still build an empty CLIPTokenizer from it.
    base = Path(make_tiny_model("clip", tmp_path / "clip"))
    kept = (base / only).read_text() if (base / only).is_file() else "{}"
    for name in TOKENIZER_FILES:
        (base / name).unlink(missing_ok=True)
    (base / only).write_text(kept)
    out = tmp_path / "out"
    out.mkdir()
    assert save_tokenizer(str(base), out) is False
    assert list(out.iterdir()) == []


def test_a_written_folder_gets_every_tokenizer_file_of_its_source_as_it_is(model: BertModel, tmp_path: Path) -> None:
    source = tmp_path / "merged"
    source.mkdir()
    for i, name in enumerate(TOKENIZER_FILES):
        (source / name).write_bytes(f"{name} {i}\n".encode())
    (source / "chat_template.jinja").write_text("not a tokenizer file of the list")
    out = tmp_path / "tasks" / "sst2"
    write_folder(out, model, tokenizer_files_of=source)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", *TOKENIZER_FILES}
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the temporary sibling is gone


@pytest.mark.parametrize("heads_as", ["folder", "writer"])
def test_a_merge_record_brings_its_model_card_and_heads(model: BertModel, tmp_path: Path, heads_as: str) -> None:
    record = {"base_model": "tiny-bert", "base_fingerprint": "sampled1:0", "family": "encoder", "method": "ties",
              "lam": 0.5, "save_as": "model"}  # fmt: skip
    source = tmp_path / "delta" / "heads"
    (source / "sst2").mkdir(parents=True)
    (source / "sst2" / "head.safetensors").write_bytes(b"head")

    def heads(folder: Path) -> None:
        shutil.copytree(source, folder / "heads")

    out = tmp_path / "merged"
    write_folder(out, model, max_shard_size="40KB", heads=source if heads_as == "folder" else heads, record=record)
    assert json.loads((out / MERGE_FILE).read_text()) == record
    assert (out / "heads" / "sst2" / "head.safetensors").read_bytes() == b"head"
    assert (out / "model.safetensors.index.json").is_file()  # save_pretrained's shards at max_shard_size
    assert "tiny-bert" in (out / "README.md").read_text()
    assert not [p for p in out.iterdir() if p.name in TOKENIZER_FILES]


def test_a_weights_writer_and_a_late_record(tmp_path: Path) -> None:
    """An adapter's folder: its own weights writer, and ``merge.json`` made once the weights are written."""
    written: list[str] = []

    def weights(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        written.append("weights")

    def record() -> dict:
        assert written == ["weights"]
        return {"base_model": "b", "base_fingerprint": "sampled1:0", "family": "encoder", "method": "ties"}

    out = tmp_path / "adapter"
    write_folder(out, weights, heads=tmp_path / "no_heads", record=record)
    assert {p.name for p in out.iterdir()} == {"adapter_model.safetensors", MERGE_FILE, "README.md"}
