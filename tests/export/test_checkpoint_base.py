"""A merge at a fixed λ written from the base's own checkpoint, with no model class (``export.checkpoint_base``),
gives the same folder, byte for byte, as the base loaded through its ``transformers`` class and ``save_pretrained``
(the merged-delta folder then ``save_merged_model``); and where the checkpoint cannot stand for the model (tied
weights, a CLIP tower, a cast, a file stored twice, more than one shard) the model class writes it instead, so the
folder is still the same. One table over architectures, each base built and saved by ``transformers`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from drm_lightning.export.checkpoint_base import open_checkpoint_base
from drm_lightning.export.model_folder import merge_to_model, save_merged_model
from drm_lightning.io.task_vector import read_meta
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.record import MERGE_FILE

LAM = 0.6
SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64)


def _llama(tie: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=tie)
        return LlamaForCausalLM(config)

    return build


def _llama_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=1))


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**SMALL, num_hidden_layers=2, max_position_embeddings=64))


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64))


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**SMALL | {"vocab_size": None}, num_hidden_layers=2, image_size=16, patch_size=8))


def _t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=64, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def _clip() -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=16,
                  patch_size=8)  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


#: Tied names whose deltas are left out of the random task vectors: a real expert's Δ is one tensor under both names,
#: the random ones would differ, and the model class keeps whichever comes first.
TIED_ALIASES = {"llama-causal-tied-lm": r"^lm_head\.", "t5": r"^((encoder|decoder)\.embed_tokens|lm_head)\."}

#: id -> (builder, family, dtype saved, whether the checkpoint stands for the model (no model class needed)).
CASES: dict[str, tuple[Callable[[], torch.nn.Module], str, torch.dtype, bool]] = {
    "bert-with-pooler": (_bert, "encoder", torch.float32, True),  # the pooler is not backbone: copied as stored
    "llama-model": (_llama_model, "decoder", torch.float32, True),
    "llama-causal-untied": (_llama(False), "decoder", torch.float32, True),  # backbone under "model."
    "llama-causal-tied": (_llama(True), "decoder", torch.float32, True),  # the file holds the embedding once
    "llama-causal-untied-lm": (_llama(False), "decoder_lm", torch.float32, True),  # the whole model is the backbone
    "llama-causal-tied-lm": (_llama(True), "decoder_lm", torch.float32, False),  # lm_head.weight: a tie, not stored
    "llama-causal-bf16": (_llama(False), "decoder", torch.bfloat16, True),
    "gpt2-lm-head": (_gpt2, "decoder", torch.float32, True),  # backbone under "transformer."
    "vit": (_vit, "vision", torch.float32, False),  # stored as encoder.layer.*, renamed to layers.* on load
    "t5": (_t5, "seq2seq", torch.float32, False),  # shared / encoder / decoder embeddings: one tensor, three names
    "clip": (_clip, "clip", torch.float32, False),  # the vision tower of a CLIPModel checkpoint
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, list[Path]]]:
    """``case -> (base folder, two dense task vectors)``, each built once."""
    from tests.helpers.merge_inputs import write_task_vectors

    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(case: str) -> tuple[Path, list[Path]]:
        if case not in cache:
            builder, family, dtype, _ = CASES[case]
            root = tmp_path_factory.mktemp(case)
            torch.manual_seed(0)
            builder().to(dtype).save_pretrained(root / "base")
            tvs = write_task_vectors(root / "base", root / "tv", 2, family=family, seed=7, drop=TIED_ALIASES.get(case))
            cache[case] = (root / "base", tvs)
        return cache[case]

    return get


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _expected(tvs: list[Path]) -> list[str]:
    return [read_meta(tv).base_fingerprint for tv in tvs]


def _both_ways(tvs: list[Path], root: Path, method: str = "task_arithmetic", **kwargs) -> tuple[Path, Path]:
    """The folder ``merge_to_model`` writes and the one the model class writes from the merged delta."""
    straight, applied = root / "straight" / "out", root / "applied" / "out"
    merge_to_model(tvs, method, straight, LAM, progress=False, **kwargs)
    merge_task_vectors(tvs, method, root / "delta", progress=False)
    save_merged_model(root / "delta", LAM, applied, **kwargs)
    return straight, applied


def _assert_same_folder(straight: Path, applied: Path) -> None:
    a, b = _files(straight), _files(applied)
    assert sorted(a) == sorted(b)
    assert sorted(name for name in a if a[name] != b[name]) == [MERGE_FILE]
    ra, rb = (json.loads((folder / MERGE_FILE).read_text()) for folder in (straight, applied))
    for record in (ra, rb):
        record.pop("timings"), record.pop("merged_delta")
    assert ra == rb  # the architecture and backbone prefix recorded too


@pytest.mark.parametrize("case", list(CASES))
def test_the_checkpoint_writes_what_the_model_class_writes(
    case: str, built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    base, tvs = built(case)
    family, stands = CASES[case][1], CASES[case][3]
    opened = open_checkpoint_base(str(base), family, {"torch_dtype": None, "gguf_file": None}, _expected(tvs), "2GB")
    assert (opened is not None) == stands
    _assert_same_folder(*_both_ways(tvs, tmp_path))


@pytest.mark.parametrize("method", ["ties", "drm_v", "iso_cts"])
def test_every_method_writes_the_same_bytes_either_way(
    method: str, built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    _, tvs = built("llama-causal-untied")
    _assert_same_folder(*_both_ways(tvs, tmp_path, method))


def test_a_base_larger_than_one_shard_goes_the_model_class_way(
    built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """``save_pretrained`` cuts shards in its modules' order, which the checkpoint does not keep."""
    base, tvs = built("llama-causal-untied")
    load = {"torch_dtype": None, "gguf_file": None}
    size = (base / "model.safetensors").stat().st_size
    assert open_checkpoint_base(str(base), "decoder", load, _expected(tvs), size) is not None
    assert open_checkpoint_base(str(base), "decoder", load, _expected(tvs), size // 4) is None
    straight, applied = _both_ways(tvs, tmp_path, max_shard_size=size // 4)
    assert (straight / "model.safetensors.index.json").is_file()
    _assert_same_folder(straight, applied)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("tied-copy", "lm_head.weight stored beside the tied embedding it copies"),
        ("cast", "config dtype float16 over float32 tensors: loading casts"),
        ("other-weights", "the fingerprint differs: another base"),
        ("no-architectures", "config.json names no architecture"),
        ("custom-code", "a model type only code in the folder defines (auto_map)"),
        ("pickle-only", "no safetensors weights"),
    ],
)
def test_a_checkpoint_that_cannot_stand_for_the_model_is_not_used(
    change: str, why: str, built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    source, tvs = built("llama-causal-tied" if change == "tied-copy" else "llama-causal-untied")
    base = tmp_path / "base"
    base.mkdir()
    for file in source.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    tensors = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    if change == "tied-copy":
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    elif change == "cast":
        config["dtype"] = "float16"
    elif change == "other-weights":
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    elif change == "no-architectures":
        config.pop("architectures")
    elif change == "custom-code":
        config.update(model_type="custom-arch", auto_map={"AutoModelForCausalLM": "custom.CustomModel"})
    if change == "pickle-only":
        (base / "model.safetensors").rename(base / "pytorch_model.bin")
    else:
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps(config))
    family = "decoder"
    assert (
        open_checkpoint_base(str(base), family, {"torch_dtype": None, "gguf_file": None}, _expected(tvs), "2GB") is None
    ), why


def test_the_tied_copy_merges_through_the_model_class(
    built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """A tied embedding stored twice: the model class ties them, and the written folder holds the merged one once."""
    from safetensors.torch import load_file, save_file

    source, tvs = built("llama-causal-tied")
    base = tmp_path / "base"
    base.mkdir()
    for file in source.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    tensors = load_file(base / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    merge_to_model(tvs, "task_arithmetic", out, LAM, progress=False, base=str(base))
    written = load_file(out / "model.safetensors")
    delta = sum(load_file(tv / "task_vector.safetensors")["embed_tokens.weight"] for tv in tvs)
    assert "lm_head.weight" not in written
    torch.testing.assert_close(written["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"] + LAM * delta)


_PROBE = """
import sys
from drm_lightning.cli import main
inputs = "[" + ",".join(sys.argv[2:]) + "]"
assert main(["merge", "--task_vectors", inputs, "--lam", "0.5", "--output", sys.argv[1]]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""


def test_a_merge_from_the_checkpoint_imports_no_transformers(
    built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """What makes it fast: ``drm-lightning merge`` never imports ``transformers`` (~0.5 s, and a second or more for
    each model's ``modeling_*`` module); quieting its logging waits for an import that does not come."""
    _, tvs = built("llama-causal-untied")
    command = [sys.executable, "-c", _PROBE, str(tmp_path / "out"), *map(str, tvs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").is_file()


_LOAD = """
import sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
expected = load_file(sys.argv[2])
state = model.state_dict()
assert "drm_lightning" not in sys.modules
for key, value in expected.items():
    torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)
print("loaded", len(expected))
"""


def test_the_folder_written_from_the_checkpoint_loads_in_plain_transformers(
    built: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """In a process that never imports drm_lightning, ``AutoModelForCausalLM`` loads the folder, and its weights are
    ``W_0 + λ·Σ_i Δ_i`` (Task Arithmetic) computed here from the files."""
    from safetensors.torch import load_file, save_file

    base, tvs = built("llama-causal-untied")
    out = tmp_path / "out"
    merge_to_model(tvs, "task_arithmetic", out, LAM, progress=False)
    stored = load_file(base / "model.safetensors")
    deltas = [load_file(tv / "task_vector.safetensors") for tv in tvs]
    expected = {
        f"model.{name}": stored[f"model.{name}"] + LAM * sum(d[name] for d in deltas)
        for name in ("layers.0.self_attn.q_proj.weight", "norm.weight", "embed_tokens.weight")
    }
    expected["lm_head.weight"] = stored["lm_head.weight"]  # not in the backbone: as stored
    save_file(expected, str(tmp_path / "expected.safetensors"))
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(out), str(tmp_path / "expected.safetensors")],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "4"
