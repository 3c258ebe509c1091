"""The base's skeleton kept on disk (``interop/skeleton_cache.py``): what a cached entry answers is what building the
base through ``transformers`` answers, for every family; a warm entry builds and imports nothing; the entry is keyed
by everything the skeleton depends on; a spoilt entry or a folder that cannot be written costs only time.

The suite's cache is a folder of its own (``tests/conftest.py`` sets ``DRM_LIGHTNING_CACHE``); each test here
points it at its own folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, LlamaConfig, T5Config, ViTConfig

from drm_lightning.cli import main
from drm_lightning.interop import base as base_module
from drm_lightning.interop import skeleton_cache
from drm_lightning.interop.base import _build_skeleton, describe_base
from drm_lightning.interop.skeleton_cache import CACHE_ENV, cached_skeleton
from tests.helpers.interop_models import bert_base, bert_classifier, llama_base, llama_causal

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
#: arch -> (config, family, checkpoint names beyond the backbone's own: old spellings, heads, prefixed names)
CONFIGS = {
    "bert": (
        BertConfig(**TINY, vocab_size=64, max_position_embeddings=64),
        "encoder",
        ["bert.encoder.layer.0.attention.self.query.weight", "embeddings.LayerNorm.gamma", "pooler.dense.weight",
         "classifier.weight", "bert.embeddings.LayerNorm.beta"],
    ),
    "llama": (
        LlamaConfig(**TINY, num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False),
        "decoder",
        ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "score.weight", "model.norm.weight"],
    ),
    "llama-lm": (
        LlamaConfig(**TINY, num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True),
        "decoder_lm",
        ["layers.0.mlp.up_proj.weight", "lm_head.weight", "model.embed_tokens.weight"],
    ),
    "t5": (
        T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=64),
        "seq2seq",
        ["encoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight", "shared.weight"],
    ),
    "vit": (
        ViTConfig(**TINY, image_size=32, patch_size=16),
        "vision",
        ["vit.encoder.layer.0.attention.attention.query.weight", "encoder.layer.1.output.dense.bias",
         "encoder.layer.0.intermediate.dense.weight", "layernorm.weight", "classifier.bias"],
    ),
}  # fmt: skip


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    monkeypatch.setattr(base_module, "_SKELETONS", {})  # the in-process layer would answer before the disk
    return folder


def _base(folder: Path, arch: str) -> Path:
    CONFIGS[arch][0].save_pretrained(folder)  # the skeleton needs config.json alone
    return folder


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "skeletons").glob("*.json"))


def _refuse_build(*args: object) -> None:
    raise AssertionError("the base was built through transformers although its skeleton is in the cache")


# What an entry answers


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_cached_skeleton_answers_what_building_it_answers(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    folder, family = _base(tmp_path / arch, arch), CONFIGS[arch][1]
    shapes, prefix, embeddings, rename = _build_skeleton(folder, family)
    keys = sorted({*shapes, *(f"{prefix}.{name}" for name in shapes), *CONFIGS[arch][2]})
    cold = describe_base(str(folder), family)
    assert [r.name for r in _entries(cache)] != []
    assert [cold.rename(key) for key in keys] == [rename(key) for key in keys]
    skeleton_cache._save_unsaved()  # as at exit: the renames looked up join the entry

    monkeypatch.setattr(base_module, "_SKELETONS", {})
    monkeypatch.setattr(base_module, "_build_skeleton", _refuse_build)
    warm = describe_base(str(folder), family)
    assert (warm.shapes, warm.prefix, warm.embeddings) == (shapes, prefix, embeddings)
    assert [warm.rename(key) for key in keys] == [rename(key) for key in keys]


def test_a_key_the_entry_lacks_builds_the_real_renamer_once_and_joins_the_entry(cache: Path) -> None:
    builds: list[str] = []

    def build() -> skeleton_cache.Skeleton:
        builds.append("built")
        return {"a.weight": (2, 3)}, "model", ["a.weight"], lambda key: key.replace("old", "new")

    cached_skeleton("decoder", "{}", build)
    _, _, _, rename = cached_skeleton("decoder", "{}", build)
    assert builds == ["built"]
    assert rename("old.x") == "new.x" and rename("old.y") == "new.y" and builds == ["built", "built"]
    skeleton_cache._save_unsaved()
    (entry,) = _entries(cache)
    assert json.loads(entry.read_text())["renames"] == {"old.x": "new.x", "old.y": "new.y"}
    assert cached_skeleton("decoder", "{}", _refuse_build)[3]("old.y") == "new.y"


def test_a_key_the_renamer_refuses_raises_every_time_and_is_not_remembered(cache: Path) -> None:
    def rename(key: str) -> str:
        if "fused" in key:
            raise ValueError(f"tensor {key!r} is converted by transformers when loaded")
        return key

    cached_skeleton("decoder", "{}", lambda: ({"a": (1,)}, "", [], rename))
    for _ in range(2):
        memo = cached_skeleton("decoder", "{}", lambda: ({"a": (1,)}, "", [], rename))[3]
        with pytest.raises(ValueError, match="fused"):
            memo("experts.fused.weight")
    skeleton_cache._save_unsaved()
    assert json.loads(_entries(cache)[0].read_text())["renames"] == {}


# What an entry is keyed by


def test_another_config_family_or_transformers_version_is_another_entry(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    skeleton = ({"a": (1,)}, "", [], str)
    cached_skeleton("decoder", '{"hidden_size": 32}', lambda: skeleton)
    cached_skeleton("decoder", '{"hidden_size": 48}', lambda: skeleton)
    cached_skeleton("decoder_lm", '{"hidden_size": 32}', lambda: skeleton)
    assert len(_entries(cache)) == 3
    monkeypatch.setattr(skeleton_cache, "_version", lambda package: "0.0.0-another")
    cached_skeleton("decoder", '{"hidden_size": 32}', lambda: skeleton)
    assert len(_entries(cache)) == 4
    cached_skeleton("decoder", '{"hidden_size": 32}', _refuse_build)  # the same inputs: answered
    assert len(_entries(cache)) == 4


# What goes wrong costs only time


@pytest.mark.parametrize(
    "spoilt",
    ["{not json", "[]", '{"format": 0}', '{"format": 1, "shapes": {"a": ["2"]}, "prefix": "", "embeddings": [],'
     ' "renames": {}}', ""],
    ids=["not-json", "not-an-object", "another-format", "a-shape-of-strings", "empty"],
)  # fmt: skip
def test_a_spoilt_entry_is_built_again_and_overwritten(cache: Path, spoilt: str) -> None:
    skeleton = ({"a.weight": (2, 3)}, "model", [], str)
    cached_skeleton("decoder", "{}", lambda: skeleton)
    (entry,) = _entries(cache)
    entry.write_text(spoilt)
    assert cached_skeleton("decoder", "{}", lambda: skeleton)[:3] == skeleton[:3]
    assert json.loads(entry.read_text())["shapes"] == {"a.weight": [2, 3]}


def test_a_cache_folder_that_cannot_be_written_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocked / "cache"))
    skeleton = ({"a.weight": (2, 3)}, "model", [], str)
    assert cached_skeleton("decoder", "{}", lambda: skeleton)[:3] == skeleton[:3]
    assert blocked.read_text() == "not a folder"


def test_off_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds: list[int] = []
    for _ in range(2):
        cached_skeleton("decoder", "{}", lambda: builds.append(1) or ({"a": (1,)}, "", [], str))
    assert builds == [1, 1] and list(tmp_path.iterdir()) == []


# End to end: a merge of model folders


_PROBE = """
import sys
from drm_lightning.cli import main
from drm_lightning.interop import base

if sys.argv[1] == "warm":
    def refuse(*args):
        raise AssertionError("the base was built although its skeleton is in the cache")
    base._build_skeleton = refuse
inputs = "[" + ",".join(sys.argv[4:]) + "]"
assert main(["merge", "--task_vectors", inputs, "--base", sys.argv[3], "--lam", "0.7", "--output", sys.argv[2]]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_second_merge_of_model_folders_builds_no_base_and_writes_the_same_bytes(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """The first merge fills the cache (building the base through transformers); the second, in a fresh process,
    builds nothing and writes the folder a merge with the cache off writes. A causal LM's merge then imports no
    transformers at all; a classifier's still does, to write each task's ``*ForSequenceClassification`` folder."""
    if arch == "bert":
        base = bert_base(tmp_path / "base")
        experts = [bert_classifier(base, tmp_path / f"e{i}", seed=i) for i in (1, 2)]
    else:
        base = llama_base(tmp_path / "base")
        experts = [llama_causal(base, tmp_path / f"e{i}", seed=i) for i in (1, 2)]
    imported = {}
    for run in ("cold", "warm"):
        command = [sys.executable, "-c", _PROBE, run, str(tmp_path / run), str(base), *map(str, experts)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        imported[run] = done.stdout.splitlines()[-1]
    assert imported["cold"] != "[]"
    assert (imported["warm"] == "[]") == (arch == "llama"), imported["warm"][:200]
    monkeypatch.setenv(CACHE_ENV, "off")
    inputs = f"[{experts[0]},{experts[1]}]"
    assert main(["merge", "--task_vectors", inputs, "--base", str(base), "--lam", "0.7", "--output",
                 str(tmp_path / "off")]) == 0  # fmt: skip
    written = sorted(p.relative_to(tmp_path / "off") for p in (tmp_path / "off").rglob("*") if p.is_file())
    assert any(name.suffix == ".safetensors" for name in written)
    for name in written:
        if name.name not in ("merge.json", "README.md"):  # they record the time and the output's path
            assert (tmp_path / "warm" / name).read_bytes() == (tmp_path / "off" / name).read_bytes(), name
