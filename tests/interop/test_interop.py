"""Experts from ``transformers`` and ``peft`` in, ``AutoModelForSequenceClassification`` folders out.

Every expert here is made by the libraries themselves (``tests/helpers/interop_models.py``): a sharded
``BertForSequenceClassification``, a bf16 ``LlamaForCausalLM``, LoRA adapters with rsLoRA, ``rank_pattern``,
``alpha_pattern`` and ``modules_to_save``. What is checked:

- an imported expert's task vector on its base reproduces the original model (logits / hidden states);
- ``drm-lightning merge`` (a subprocess) takes model and adapter folders directly, and the result equals, byte for
  byte, ``extract`` of each followed by a merge of the task vectors;
- the per-task export loads in a fresh interpreter that never imports drm_lightning, with logits equal to the
  project's own evaluation of the same merged model;
- a backbone-only expert (a causal LM, no classification head) merges, and evaluation refuses it up front.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

from drm_lightning.cli import main
from drm_lightning.interop.inputs import convert
from drm_lightning.io.task_vector import TaskVectorError, read_meta
from drm_lightning.models.expert import ExpertModule
from drm_lightning.task_vectors.apply import apply_task_vector
from tests.helpers.interop_models import (
    LABELS,
    bert_base,
    bert_classifier,
    bert_lora,
    llama_base,
    llama_causal,
    llama_lora,
    token_batch,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    bert = bert_base(root / "bert_base")
    llama = llama_base(root / "llama_base", dtype=torch.bfloat16)
    return {
        "root": root,
        "bert_base": bert,
        "bert_full": bert_classifier(bert, root / "sst_full", seed=1, shard="40KB"),
        "bert_lora": bert_lora(
            bert, root / "nli_lora", seed=2, use_rslora=True, rank_pattern={"value": 2}, alpha_pattern={"query": 3}
        ),
        "llama_base": llama,
        "llama_full": llama_causal(llama, root / "chat_full", seed=3),
        "llama_lora": llama_lora(llama, root / "code_lora", seed=4),
    }


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "drm_lightning.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def _assert_expert_reproduces(tv: Path, original: torch.nn.Module) -> None:
    """The expert rebuilt from ``tv`` with its deltas gives ``original``'s classifier logits on one token batch."""
    expert = ExpertModule.from_task_vector(tv, with_task_vector=True)
    ids, mask = token_batch()
    with torch.no_grad():
        want = original.eval()(input_ids=ids, attention_mask=mask).logits
        got = expert({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sharded_bf16_and_adapter_inputs_are_what_the_libraries_wrote(experts: dict[str, Path]) -> None:
    assert (experts["bert_full"] / "model.safetensors.index.json").is_file()
    assert len(list(experts["bert_full"].glob("model-*.safetensors"))) > 1
    config = json.loads((experts["llama_full"] / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    adapter = json.loads((experts["bert_lora"] / "adapter_config.json").read_text())
    assert adapter["use_rslora"] and adapter["rank_pattern"] == {"value": 2}
    assert "classifier" in adapter["modules_to_save"]


def test_full_classifier_task_vector_reproduces_its_logits(experts: dict[str, Path], tmp_path: Path) -> None:
    tv = convert(str(experts["bert_full"]), tmp_path / "tv", base=str(experts["bert_base"]))
    meta = read_meta(tv)
    assert meta.kind == "dense" and meta.label_names == LABELS and meta.head["type"] == "encoder"
    assert meta.source["type"] == "transformers" and meta.source["head"]["layout"] == "bert_pooler_classifier"
    assert meta.base_fingerprint.startswith("sampled1:")
    _assert_expert_reproduces(tv, BertForSequenceClassification.from_pretrained(experts["bert_full"]))


def test_rslora_rank_pattern_adapter_reproduces_peft(experts: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    tv = convert(str(experts["bert_lora"]), tmp_path / "tv")  # base from adapter_config.json
    meta = read_meta(tv)
    assert (
        meta.kind == "lora"
        and meta.lora.r == 4
        and meta.source["ranks"]["encoder.layer.0.attention.self.value.weight"] == 2
    )
    assert meta.head["num_labels"] == 3
    base = BertForSequenceClassification.from_pretrained(experts["bert_base"], num_labels=3)
    _assert_expert_reproduces(tv, PeftModel.from_pretrained(base, experts["bert_lora"]))


@pytest.mark.parametrize("which", ["llama_full", "llama_lora"])
def test_causal_lm_backbone_is_reproduced_and_has_no_head(experts: dict[str, Path], tmp_path: Path, which: str) -> None:
    from peft import PeftModel

    from drm_lightning.models.backbone import load_backbone

    tv = convert(str(experts[which]), tmp_path / "tv", base=str(experts["llama_base"]))
    meta = read_meta(tv)
    assert meta.head == {} and "no classification head" in meta.source["no_head_reason"]
    if which == "llama_full":
        assert meta.source["dropped"] == ["lm_head.weight"]
        original = LlamaForCausalLM.from_pretrained(experts[which], dtype=torch.float32).model
    else:
        base = LlamaForCausalLM.from_pretrained(experts["llama_base"], dtype=torch.float32)
        original = PeftModel.from_pretrained(base, experts[which]).base_model.model.model
    backbone = load_backbone(meta.base_model, "decoder", torch_dtype="float32")
    apply_task_vector(backbone, tv, check_fingerprint=False)  # the bf16 base, upcast: same values
    ids, mask = token_batch()
    with torch.no_grad():
        want = original.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        got = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two fresh interpreters
def test_merge_takes_folders_directly_equals_extract_then_merge_and_exports(
    experts: dict[str, Path], tmp_path: Path
) -> None:
    inputs = f"[{experts['bert_full']},{experts['bert_lora']}]"
    base = str(experts["bert_base"])
    direct = _cli("merge", "--task_vectors", inputs, "--base", base, "--method", "ties", "--lam", "0.7",
                  "--output", str(tmp_path / "direct"), "--keep_delta", "true")  # fmt: skip
    assert direct.returncode == 0, direct.stderr[-3000:]
    for name in ("bert_full", "bert_lora"):
        flag = "--model" if name == "bert_full" else "--adapter"
        assert main(["extract", flag, str(experts[name]), "--base", base, "--output", str(tmp_path / name)]) == 0
    tvs = f"[{tmp_path / 'bert_full'},{tmp_path / 'bert_lora'}]"
    staged = ["merge", "--task_vectors", tvs, "--method", "ties", "--lam", "0.7", "--output", str(tmp_path / "staged")]
    staged += ["--keep_delta", "true"]
    assert main(staged) == 0  # in-process: the same code path as the console script, one interpreter start less
    for rel in ("model.safetensors", "tasks/sst_full/model.safetensors", "tasks/nli_lora/model.safetensors"):
        assert (tmp_path / "direct" / rel).read_bytes() == (tmp_path / "staged" / rel).read_bytes(), rel
    delta = "merged_delta/delta-00001.safetensors"
    assert (tmp_path / "direct_delta" / delta).read_bytes() == (tmp_path / "staged_delta" / delta).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the converted inputs are gone

    # The exports load with plain transformers, in a process that never imports drm_lightning...
    ids, mask = token_batch()
    probe = textwrap.dedent(
        """
        import json, sys, torch
        from transformers import AutoModelForSequenceClassification
        ids = torch.tensor(json.loads(sys.argv[2]))
        out = {}
        for task in ("sst_full", "nli_lora"):
            model = AutoModelForSequenceClassification.from_pretrained(f"{sys.argv[1]}/tasks/{task}").eval()
            with torch.no_grad():
                out[task] = {"logits": model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.tolist(),
                             "labels": [model.config.id2label[i] for i in range(model.config.num_labels)]}
        assert not any(m.startswith("drm_lightning") for m in sys.modules)
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "direct"), json.dumps(ids.tolist())],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    exported = json.loads(done.stdout.strip().splitlines()[-1])
    # ... and their logits equal the project's own evaluation of the merged model under each task's head.
    for task in ("sst_full", "nli_lora"):
        expert = ExpertModule.from_task_vector(tmp_path / "direct" / "heads" / task, backbone=str(tmp_path / "direct"))
        with torch.no_grad():
            ours = expert({"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(torch.tensor(exported[task]["logits"]), ours, rtol=1e-5, atol=1e-6)
        assert exported[task]["labels"] == LABELS  # config.id2label (the adapter: of its base config)


@pytest.mark.slow  # a fresh interpreter
def test_causal_lm_experts_merge_backbone_only_and_evaluation_says_no_head(
    experts: dict[str, Path], tmp_path: Path
) -> None:
    from drm_lightning.evaluation.multitask import evaluate_backbone

    out = tmp_path / "merged"
    done = _cli("merge", "--task_vectors", f"[{experts['llama_full']},{experts['llama_lora']}]", "--base",
                str(experts["llama_base"]), "--lam", "0.5", "--output", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("no head") == 1 and not (out / "tasks").exists()  # said once for both experts
    assert read_meta(out / "heads" / "chat_full").source["type"] == "transformers"
    with pytest.raises(TaskVectorError, match=r"task 'chat_full' has no head \(imported from .*chat_full\)"):
        evaluate_backbone(str(out), [out / "heads" / "chat_full"], {"chat_full": None})


def _head_case(kind: str, root: Path) -> tuple[Path, Path, dict]:
    """A base and a perturbed task model of another head layout, both saved by transformers."""
    import transformers as tf

    from tests.helpers.interop_models import perturb

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    labels = {"id2label": {0: "no", 1: "yes"}, "label2id": {"no": 0, "yes": 1}}
    if kind == "roberta":
        config = tf.RobertaConfig(**small, vocab_size=64, max_position_embeddings=80, **labels)
        base_cls, task_cls = tf.RobertaModel, tf.RobertaForSequenceClassification
    elif kind == "deberta_v2":
        config = tf.DebertaV2Config(**small, vocab_size=64, max_position_embeddings=64, pooler_hidden_act="tanh",
                                    pooler_hidden_size=32, **labels)  # fmt: skip
        base_cls, task_cls = tf.DebertaV2Model, tf.DebertaV2ForSequenceClassification
    elif kind == "llama_seq_cls":
        config = tf.LlamaConfig(**small, num_key_value_heads=1, vocab_size=64, pad_token_id=0, **labels)
        base_cls, task_cls = tf.LlamaModel, tf.LlamaForSequenceClassification
    else:
        config = tf.ViTConfig(**small, image_size=16, patch_size=8, **labels)
        base_cls, task_cls = tf.ViTModel, tf.ViTForImageClassification
    torch.manual_seed(0)
    base_cls(config).save_pretrained(root / "base")
    perturb(task_cls.from_pretrained(root / "base", config=config), seed=1).save_pretrained(root / "task")
    if kind == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    else:
        ids, mask = token_batch()
        inputs = {"input_ids": ids, "attention_mask": mask}
    return root / "base", root / "task", inputs


@pytest.mark.parametrize("kind", ["roberta", "deberta_v2", "llama_seq_cls", "vit"])
def test_every_head_layout_of_the_table_reproduces_its_logits(tmp_path: Path, kind: str) -> None:
    """Each row of docs/interop.md's head table: the imported expert computes what the task model computed, and
    the export puts it back into that architecture."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from drm_lightning.export.task_folders import build_task_model
    from drm_lightning.io.task_vector import read_head
    from drm_lightning.models.backbone import load_backbone

    base, task, inputs = _head_case(kind, tmp_path)
    tv = convert(str(task), tmp_path / "tv", base=str(base))
    meta = read_meta(tv)
    assert meta.head and meta.label_names == ["no", "yes"], meta.source["no_head_reason"]
    auto = AutoModelForImageClassification if kind == "vit" else AutoModelForSequenceClassification
    original = auto.from_pretrained(task).eval()
    expert = ExpertModule.from_task_vector(tv, with_task_vector=True)
    backbone = load_backbone(str(base), meta.family)
    apply_task_vector(backbone, tv)
    rebuilt = build_task_model(backbone.state_dict(), meta.source, read_head(tv), tv)
    with torch.no_grad():
        want = original(**inputs).logits
        torch.testing.assert_close(expert(inputs), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rebuilt(**inputs).logits, want, rtol=1e-5, atol=1e-6)


def test_two_peft_adapters_in_one_peft_adapter_out(experts: dict[str, Path], tmp_path: Path) -> None:
    """The LoRA user's path: adapters from elsewhere, merged into an adapter that PEFT loads, equal to the dense
    merge (rsLoRA, rank_pattern and alpha_pattern survive the padding and scale folding)."""
    from peft import PeftModel

    from drm_lightning.models.backbone import load_backbone

    second = bert_lora(experts["bert_base"], tmp_path / "qa_lora", seed=5, r=2, lora_alpha=4)
    inputs = f"[{experts['bert_lora']},{second}]"
    common = ["merge", "--task_vectors", inputs, "--method", "task_arithmetic", "--lam", "0.8"]
    assert main([*common, "--save_as", "adapter", "--output", str(tmp_path / "adapter")]) == 0
    assert main([*common, "--output", str(tmp_path / "dense")]) == 0
    ids, mask = token_batch()
    base = load_backbone(str(experts["bert_base"]), "encoder")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    dense = load_backbone(str(tmp_path / "dense"), "encoder")
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = adapted(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "dense" / "merge.json").read_text())
    assert [(i["path"], i["converted_from"]) for i in record["inputs"]] == [
        (str(experts["bert_lora"].resolve()), "adapter"),
        (str(second.resolve()), "adapter"),
    ]  # the folders given, not the temporary conversions (gone by now)
    for out in ("dense", "adapter"):  # and so does each model card's experts table
        card = (tmp_path / out / "README.md").read_text()
        assert str(second.resolve()) in card and "inputs-" not in card, card


def test_hub_id_is_read_from_the_local_cache_only(
    experts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id resolves through the Hugging Face cache layout (refs/main -> snapshots/<commit>), never the hub."""
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--sst-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(experts["bert_full"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tv = convert("someone/sst-bert", tmp_path / "tv", base=str(experts["bert_base"]))
    assert read_meta(tv).task == "sst-bert" and read_meta(tv).source["path"] == str(snapshot.resolve())
    with pytest.raises(ValueError, match="someone/absent: not a local folder and not in the local Hugging Face cache"):
        convert("someone/absent", tmp_path / "tv2", base=str(experts["bert_base"]))


@pytest.mark.parametrize("which", ["llama_full", "llama_lora"])
def test_causal_lm_into_the_decoder_lm_family_keeps_its_lm_head(
    experts: dict[str, Path], tmp_path: Path, which: str
) -> None:
    """``family=decoder_lm`` (labels scored as words by the LM head): the backbone is the whole ``*ForCausalLM``,
    so its checkpoint names are the backbone's as they are and a fine-tuned ``lm_head`` is part of the delta."""
    from peft import PeftModel

    from drm_lightning.models.backbone import load_backbone

    tv = convert(str(experts[which]), tmp_path / "tv", base=str(experts["llama_base"]), family="decoder_lm")
    meta = read_meta(tv)
    assert meta.family == "decoder_lm" and meta.source["dropped"] == [] and meta.source.get("missing", []) == []
    if which == "llama_full":
        original = LlamaForCausalLM.from_pretrained(experts[which], dtype=torch.float32)
    else:
        base = LlamaForCausalLM.from_pretrained(experts["llama_base"], dtype=torch.float32)
        original = PeftModel.from_pretrained(base, experts[which])
    backbone = load_backbone(meta.base_model, "decoder_lm", torch_dtype="float32")
    apply_task_vector(backbone, tv, check_fingerprint=False)
    ids, mask = token_batch()
    with torch.no_grad():
        want = original.eval()(input_ids=ids, attention_mask=mask).logits
        got = backbone(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fp16_checkpoint_imports_exactly(experts: dict[str, Path], tmp_path: Path) -> None:
    """An fp16 save of a float32 fine-tune: the float32 delta against the float32 base lands on the fp16 values."""
    folder = tmp_path / "fp16"
    BertForSequenceClassification.from_pretrained(experts["bert_full"]).half().save_pretrained(folder)
    tv = convert(str(folder), tmp_path / "tv", base=str(experts["bert_base"]))
    _assert_expert_reproduces(tv, BertForSequenceClassification.from_pretrained(folder, dtype=torch.float32))


def test_a_task_vector_beside_a_model_folder_names_the_base(experts: dict[str, Path], tmp_path: Path) -> None:
    """``merge --task_vectors [tv, checkpoint]`` without --base: the task vector says which base it was taken
    against, and the checkpoint is converted against that one."""
    tv = convert(str(experts["bert_lora"]), tmp_path / "tv")  # records the adapter's base
    args = ["merge", "--task_vectors", f"[{tv},{experts['bert_full']}]", "--lam", "0.5", "--output"]
    assert main([*args, str(tmp_path / "merged")]) == 0
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record["base_model"] == str(experts["bert_base"].resolve())


def test_a_base_rewritten_in_place_is_described_afresh(tmp_path: Path) -> None:
    """``describe_base`` remembers skeletons (a merge of T experts describes one base T times), but by the config's
    text: a base folder rewritten with another size is never described from the stale skeleton."""
    from drm_lightning.interop.base import describe_base
    from tests.helpers.merge_inputs import build_tiny_model

    folder = build_tiny_model(tmp_path / "base", "bert")
    first = describe_base(str(folder), "encoder")
    assert describe_base(str(folder), "encoder").shapes == first.shapes
    build_tiny_model(folder, "bert", hidden_size=48)
    again = describe_base(str(folder), "encoder")
    assert (
        again.shapes["embeddings.word_embeddings.weight"][1]
        == 48
        != first.shapes["embeddings.word_embeddings.weight"][1]
    )
