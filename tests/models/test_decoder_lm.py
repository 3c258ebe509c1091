"""``decoder_lm``: a causal decoder that scores label words through its own LM head and stays a working causal LM.

Checked on a tiny ``LlamaConfig`` model saved to disk: packing of prompts and answers, label-word scores against a
plain per-example reference, the frozen ``lm_head`` (tied embeddings included), task vector + base = expert, and a
merged folder that ``AutoModelForCausalLM`` loads and generates with.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drm_lightning.callbacks.task_vector import TaskVectorCallback
from drm_lightning.export.model_folder import save_merged_model
from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import DELTAS_FILE
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.models.backbone import load_backbone
from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.label_words import causal_logprobs, continuation_ids, label_targets, pack
from drm_lightning.models.lora import LoraSettings
from tests.helpers.expert_marks import EXPERT_TEST_MARKS
from tests.helpers.tiny_models import SyntheticDataModule, make_tiny_model, tiny_trainer

pytestmark = EXPERT_TEST_MARKS
LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_tiny_model("decoder_lm", tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> str:
    return make_tiny_model("decoder_lm", tmp_path_factory.mktemp("tied") / "m", tie_word_embeddings=True)


def _batch(path: str, n: int = 6) -> dict[str, torch.Tensor]:
    dm = SyntheticDataModule("decoder_lm", path, n=2 * n, batch_size=n, label_names=tuple(LABELS))
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def _reference_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """Sum of log p(answer | prompt) from one unpadded forward of the whole causal LM (float64 log-softmax)."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return float(sum(logits[len(prompt) - 1 + j, tok] for j, tok in enumerate(answer)))


def test_pack_ignores_the_prompts_padding_side():
    prompts = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    left = torch.tensor([[5, 6, 7], [0, 8, 9]])
    left_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    targets, tmask = torch.tensor([[3, 4], [2, 0]]), torch.tensor([[1, 1], [1, 0]])
    right = pack(prompts, mask, targets, tmask)
    for a, b in zip(right, pack(left, left_mask, targets, tmask), strict=True):
        assert torch.equal(a, b)
    ids, attn, positions = right
    assert ids.tolist() == [[5, 6, 7, 3, 4], [8, 9, 2, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert positions.tolist() == [[3, 4], [2, 3]]
    with pytest.raises(ValueError, match="prompt is empty"):
        pack(prompts, torch.tensor([[1, 1, 1], [0, 0, 0]]), targets, tmask)


def test_label_words_are_in_context_continuations(llama):
    tok = AutoTokenizer.from_pretrained(llama)
    rows = continuation_ids(tok, ["positive", "not good"])
    assert rows[0] == tok(" positive", add_special_tokens=False)["input_ids"] and len(rows[1]) == 2
    with pytest.raises(ValueError, match="tokenise identically"):
        label_targets(tok, ["good", "good"], "decoder_lm")
    with pytest.raises(ValueError, match="only for seq2seq and decoder_lm"):
        label_targets(tok, LABELS, "encoder")


def test_scores_are_label_word_log_likelihoods_of_the_causal_lm(llama):
    model = ExpertModule(llama, "decoder_lm", label_names=["negative", "positive", "not good"]).eval()
    tok = AutoTokenizer.from_pretrained(llama)
    tok.padding_side = "left"  # packing makes the padding side irrelevant
    texts = ["the movie was good", "so bad", "this plot is very dull and the cast weak"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        scores = model(batch)
    lm = AutoModelForCausalLM.from_pretrained(llama).eval()
    answers = continuation_ids(tok, model.label_names)
    expected = [[_reference_logprob(lm, tok(t)["input_ids"], a) for a in answers] for t in texts]
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("fixture", ["llama", "tied"])
def test_lm_head_stays_frozen_and_the_loss_is_the_answer_nll(request, fixture):
    path = request.getfixturevalue(fixture)
    model = ExpertModule(path, "decoder_lm", label_names=LABELS)
    head = model.backbone.get_output_embeddings().weight
    assert not head.requires_grad
    if fixture == "tied":  # one tensor: the input embeddings are frozen with it
        assert head is model.backbone.get_input_embeddings().weight
    batch = _batch(path)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert head.grad is None
    assert any(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    logp = causal_logprobs(
        model.backbone,
        batch["input_ids"],
        batch["attention_mask"],
        model.label_target_ids[batch["labels"]],
        model.label_target_mask[batch["labels"]],
    )
    torch.testing.assert_close(loss, -logp.sum() / model.label_target_mask[batch["labels"]].sum())


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_task_vector_plus_base_reproduces_the_expert_and_the_merge_generates(llama, tmp_path, lora):
    folders = []
    experts = []
    for i, labels in enumerate((LABELS, ["bad", "good"])):
        dm = SyntheticDataModule("decoder_lm", llama, n=16, batch_size=8, label_names=tuple(labels), seed=i)
        expert = ExpertModule(llama, "decoder_lm", task=f"t{i}", lora=lora, learning_rate=5e-2)
        callback = TaskVectorCallback(str(tmp_path / f"tv{i}"))
        tiny_trainer(max_steps=2, callbacks=[callback]).fit(expert, dm)
        folders.append(callback.written)
        experts.append(expert.eval())
    with open_safetensors(folders[0] / DELTAS_FILE) as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith("lm_head.")]  # the head is the base's, in every task

    batch = _batch(llama)
    for folder, expert in zip(folders, experts, strict=True):
        rebuilt = ExpertModule.from_task_vector(folder, with_task_vector=True)
        assert rebuilt.family == "decoder_lm" and rebuilt.label_names == expert.label_names
        with torch.no_grad():  # the expert's own logits (LoRA: through its adapters) from base + task vector
            torch.testing.assert_close(rebuilt(batch), expert(batch), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(rebuilt(batch), ExpertModule.from_task_vector(folder)(batch), atol=1e-3)

    merge_task_vectors(folders, "ties", tmp_path / "delta", progress=False)
    save_merged_model(tmp_path / "delta", 0.5, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = load_backbone(llama, "decoder_lm")
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tok("the movie was", return_tensors="pt")
    out = merged.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)


def _write_csv(folder, rows: list[tuple[str, str, str]]) -> str:
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "split.csv"
    columns = {"premise": [r[0] for r in rows], "claim": [r[1] for r in rows], "label": [r[2] for r in rows]}
    Dataset.from_dict(columns).to_csv(path, index=False)
    return str(path)


PROMPT = "{premise}\nQuestion: does it follow that {claim}?\nAnswer:"


def test_prompt_template_formats_each_row_and_is_checked(llama, tmp_path):
    from drm_lightning.data.checks import DataError
    from drm_lightning.data.text import TextClassificationDataModule

    rows = [("the cat is red", "the cat has a colour", "yes"), ("a dog", "a fish", "no")] * 4
    path = _write_csv(tmp_path / "d", rows)
    dm = TextClassificationDataModule(
        task="nli",
        tokenizer=llama,
        label_names=["no", "yes"],
        data_files={"train": path, "test": path},
        validation_split=None,
        prompt=PROMPT,
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    tok = AutoTokenizer.from_pretrained(llama)
    got = sorted(
        tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )
    formatted = [PROMPT.format(premise=premise, claim=claim) for premise, claim, _ in rows]
    assert got == sorted(tuple(tok(text)["input_ids"]) for text in formatted)
    assert sorted(batch["labels"].tolist()) == [0] * 4 + [1] * 4
    for prompt, match in [("no fields", "must name columns"), ("{0} x", "must name columns"), ("{a", "valid")]:
        with pytest.raises(DataError, match=match):
            TextClassificationDataModule(
                task="t", tokenizer=llama, label_names=["a", "b"], data_files={"train": path}, prompt=prompt
            )
    dm = TextClassificationDataModule(
        task="t",
        tokenizer=llama,
        label_names=["no", "yes"],
        prompt="{missing} x",
        data_files={"train": path},
        validation_split=None,
        cache_dir=str(tmp_path / "c2"),
    )
    with pytest.raises(DataError, match="no column 'missing'"):
        dm.setup("fit")


def test_single_token_answers_take_one_forward_per_prompt_and_match_the_packed_pairs(llama, monkeypatch):
    from drm_lightning.models import label_words

    model = ExpertModule(llama, "decoder_lm", label_names=["good", "bad", "fine"]).eval()
    assert model.label_target_ids.shape[1] == 1  # one token each with the tiny vocabulary
    tok = AutoTokenizer.from_pretrained(llama)
    tok.padding_side = "left"
    batch = dict(tok(["the movie was", "so dull and weak", "a"], padding=True, return_tensors="pt"))
    packed_calls = []
    real = label_words.causal_logprobs
    monkeypatch.setattr(label_words, "causal_logprobs", lambda *a, **k: packed_calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fast = model(batch)
        ids, mask = model._candidates(batch)
        size, num, _ = ids.shape
        packed = real(
            model.backbone,
            batch["input_ids"].repeat_interleave(num, 0),
            batch["attention_mask"].repeat_interleave(num, 0),
            ids.reshape(size * num, 1),
            mask.reshape(size * num, 1),
        ).view(size, num)
    assert not packed_calls  # the fast path ran, not the packed pairs
    torch.testing.assert_close(fast, packed, atol=1e-5, rtol=1e-5)
