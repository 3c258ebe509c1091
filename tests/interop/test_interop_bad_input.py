"""Bad experts from elsewhere: one error line naming the folder and the value, exit 1, nothing written.

A table of what users actually hand in: a fine-tuned model of another architecture or size, added tokens (another
vocabulary size: refused with both sizes and the ``--skip`` that merges the rest, which then works), adapters of
another PEFT type (IA3) or variant (DoRA), an adapter of another model, an adapter over another-sized base, an
adapter whose recorded base is not available offline. Each goes through ``extract`` and ``merge`` (``main``, the
console script's function), and the refusal comes before any model is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from drm_lightning.cli import main
from drm_lightning.io.task_vector import read_meta
from tests.helpers.interop_models import (
    bert_base,
    bert_classifier,
    bert_config,
    bert_lora,
    llama_base,
    llama_lora,
    lora_adapter,
)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import IA3Config, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("interop_bad")
    base = bert_base(root / "base")
    wide = bert_base(root / "wide", hidden_size=48, num_attention_heads=2)
    llama = llama_base(root / "llama")
    ia3 = root / "ia3"
    model = BertForSequenceClassification.from_pretrained(base, config=bert_config())
    get_peft_model(model, IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["query", "value"],
                                    feedforward_modules=[])).save_pretrained(ia3)  # fmt: skip
    added = bert_classifier(base, root / "added_tokens", seed=5)
    _resize_vocab(added, 70)
    orphan = bert_lora(base, root / "orphan", seed=9)
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nobody/nothing"}))
    dora_model = BertForSequenceClassification.from_pretrained(base, config=bert_config())
    grown = BertForSequenceClassification.from_pretrained(base, config=bert_config())
    grown.resize_token_embeddings(70)  # added tokens, trained in full beside the LoRA
    grown_lora = lora_adapter(grown, root / "adapter_added_tokens", 10, r=4, lora_alpha=8, target_modules=["query"],
                              modules_to_save=["word_embeddings", "classifier"])  # fmt: skip
    config = json.loads((grown_lora / "adapter_config.json").read_text())
    (grown_lora / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return {
        "root": root,
        "base": base,
        "llama_full": llama,
        "wide_full": bert_classifier(wide, root / "wide_full", seed=6, hidden_size=48),
        "added_tokens": added,
        "ia3": ia3,
        "dora": lora_adapter(dora_model, root / "dora", 7, r=4, lora_alpha=8, target_modules=["query"], use_dora=True),
        "llama_lora": llama_lora(llama, root / "llama_lora", seed=8),
        "wide_lora": bert_lora(wide, root / "wide_lora", seed=8),
        "orphan": orphan,
        "adapter_added_tokens": grown_lora,
        "renamed": _renamed(bert_classifier(base, root / "renamed", seed=11)),
    }


def _renamed(folder: Path) -> Path:
    """A checkpoint whose tensors were saved under names no loader knows (another framework's export, say)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        save_file({f"encoder_stack.{k}": v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return folder


def _resize_vocab(folder: Path, vocab: int) -> None:
    """What ``tokenizer.add_tokens`` + ``model.resize_token_embeddings`` leave behind: a larger vocabulary."""
    model = BertForSequenceClassification.from_pretrained(folder)
    model.resize_token_embeddings(vocab)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[64:] = 0.1
    model.save_pretrained(folder)


# (case, command line with {placeholders}, words the one error line must hold)
CASES = [
    ("architecture", ["--model", "{llama_full}", "--base", "{base}"], ["{llama_full}", "model_type='llama'", "'bert'"]),
    ("size", ["--model", "{wide_full}", "--base", "{base}"], ["{wide_full}", "hidden_size=48", "hidden_size=32"]),
    (
        "added_tokens",
        ["--model", "{added_tokens}", "--base", "{base}"],
        ["{added_tokens}", "vocab_size=70", "vocab_size=64", "--skip", "word_embeddings"],
    ),
    ("ia3", ["--adapter", "{ia3}"], ["{ia3}", "peft_type='IA3'", "only LoRA"]),
    ("dora", ["--adapter", "{dora}"], ["{dora}", "use_dora=True", "DoRA"]),
    ("other_model", ["--adapter", "{llama_lora}", "--base", "{base}"], ["{llama_lora}", "q_proj", "not a linear"]),
    ("other_base", ["--adapter", "{wide_lora}", "--base", "{base}"], ["{wide_lora}", "[32, 32]", "another base"]),
    ("orphan", ["--adapter", "{orphan}"], ["{orphan}", "nobody/nothing", "--base"]),
    (
        "adapter_added_tokens",
        ["--adapter", "{adapter_added_tokens}"],
        ["{adapter_added_tokens}", "70 token embeddings", "has 64", "--skip", "word_embeddings"],
    ),
    ("no_base", ["--model", "{wide_full}"], ["{wide_full}", "--base"]),
    ("renamed", ["--model", "{renamed}", "--base", "{base}"], ["{renamed}", "none of its", "backbone"]),
]


def _fill(items: list[str], bad: dict[str, Path]) -> list[str]:
    return [item.format(**{k: str(v) for k, v in bad.items()}) for item in items]


@pytest.mark.parametrize("command", ["extract", "merge"])
@pytest.mark.parametrize(("case", "args", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_expert_is_one_line_exit_1_nothing_written(
    bad: dict[str, Path], capsys: pytest.CaptureFixture[str], command: str, case: str, args: list, words: list
) -> None:
    if command == "merge" and case in ("orphan", "no_base"):
        pytest.skip("in a merge the other input's task vector names the base (test_interop.py)")
    out = bad["root"] / f"out_{command}_{case}"
    argv = _fill(args, bad)
    if command == "merge":  # the bad expert beside a good one, as --task_vectors
        flag_free = [a for a in argv if a not in ("--model", "--adapter")]
        good = str(bad["root"] / "good_tv")
        if not Path(good).is_dir():
            assert main(["extract", "--model", str(bad["added_tokens"]), "--base", str(bad["base"]),
                         "--skip", "[word_embeddings]", "--output", good]) == 0  # fmt: skip
        argv = ["--task_vectors", f"[{good},{flag_free[0]}]", *flag_free[1:], "--lam", "1.0"]
    capsys.readouterr()
    status = main([command, *argv, "--output", str(out)])
    err = capsys.readouterr().err.strip()
    print("\nMSG", err, file=sys.__stdout__)
    assert status == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("drm-lightning: error:"), err
    for word in _fill(words, bad):
        assert word in err, (word, err)
    leftovers = [p.name for p in bad["root"].iterdir() if p.name.startswith((out.name, f".{out.name}"))]
    assert leftovers == [], leftovers


def test_added_tokens_merge_with_the_embeddings_skipped(bad: dict[str, Path], tmp_path: Path) -> None:
    """The way out the error names works: the embeddings stay the base's, everything else is the expert's, and
    the exported classifier uses the base's vocabulary."""
    tv = tmp_path / "tv"
    args = ["--model", str(bad["added_tokens"]), "--base", str(bad["base"]), "--skip", "[word_embeddings]"]
    assert main(["extract", *args, "--output", str(tv)]) == 0
    meta = read_meta(tv)
    assert meta.source["skipped"] == ["embeddings.word_embeddings.weight"]
    from safetensors import safe_open

    with safe_open(str(tv / "task_vector.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "embeddings.word_embeddings.weight" not in names and "encoder.layer.0.attention.self.query.weight" in names
    assert main(["merge", "--task_vectors", f"[{tv}]", "--lam", "1.0", "--output", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "tasks" / "added_tokens" / "config.json").read_text())
    assert config["vocab_size"] == 64 and config["architectures"] == ["BertForSequenceClassification"]


def test_adapter_with_added_tokens_merges_with_the_embeddings_skipped(bad: dict[str, Path], tmp_path: Path) -> None:
    args = ["--adapter", str(bad["adapter_added_tokens"]), "--skip", "[word_embeddings]"]
    assert main(["extract", *args, "--output", str(tmp_path / "tv")]) == 0
    meta = read_meta(tmp_path / "tv")
    assert meta.kind == "lora" and meta.head["num_labels"] == 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tv" / "task_vector.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "embeddings.word_embeddings.weight" not in names
    assert "encoder.layer.0.attention.self.query.weight.lora_A" in names
