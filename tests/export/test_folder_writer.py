"""The one model-folder writer (``export.folder_writer``): which tokenizer files a folder gets, and what a folder
with and without a merge record holds. Byte-for-byte equality of whole merged folders is in
``test_merge_to_model.py``; the task folders' logits in ``tests/interop/test_interop.py``.
"""

from __future__ import annotations

import json
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


def test_a_merge_record_brings_its_model_card_and_heads(model: BertModel, tmp_path: Path) -> None:
    record = {"base_model": "tiny-bert", "base_fingerprint": "sampled1:0", "family": "encoder", "method": "ties",
              "lam": 0.5, "save_as": "model"}

    def heads(folder: Path) -> None:
        (folder / "heads").mkdir()

    out = tmp_path / "merged"
    write_folder(out, model, max_shard_size="40KB", heads=heads, record=record)
    assert json.loads((out / MERGE_FILE).read_text()) == record
    assert (out / "heads").is_dir() and (out / "model.safetensors.index.json").is_file()
    assert "tiny-bert" in (out / "README.md").read_text()
    assert not [p for p in out.iterdir() if p.name in TOKENIZER_FILES]
