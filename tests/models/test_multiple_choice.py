"""Multiple choice: a context and N options, each option scored, the best one the answer.

A small hand-made set (json lines: a question, a list of options or one column per option, the right one named
``A``/``B``/``C`` or ``"1"``/``"2"``) with tiny BERT, T5 and Llama models saved to disk: the batches, the scores of
each family against per-option references, a real fit whose task vector reproduces the expert, and the errors.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from drm_lightning.callbacks.task_vector import TaskVectorCallback
from drm_lightning.data.checks import DataError
from drm_lightning.data.choice import MultipleChoiceDataModule
from drm_lightning.io.task_vector import read_meta
from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.label_words import continuation_ids
from tests.helpers.expert_marks import EXPERT_TEST_MARKS
from tests.helpers.recipes import QUIET_CPU_TRAINER, cli_fit, run_recipe
from tests.helpers.tiny_models import make_tiny_model, tiny_trainer

pytestmark = EXPERT_TEST_MARKS
COLORS = ["red", "green", "blue"]
FORMAT = {"encoder": "pairs", "seq2seq": "targets", "decoder_lm": "continuations"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mc")
    return {family: make_tiny_model(family, root / family) for family in FORMAT}


def _rows(n: int, seed: int) -> list[dict]:
    """``the cat is <color>``: the right option is the one that names that colour (options in a seeded order)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        order = [COLORS[j] for j in torch.randperm(3, generator=gen).tolist()]
        color = COLORS[i % 3]
        rows.append(
            {
                "question": f"the {['cat', 'dog', 'bird'][i % 3]} is {color} and",
                "choices": {"text": [f"it is {c}" for c in order], "label": ["A", "B", "C"]},
                "answerKey": "ABC"[order.index(color)],
                "sentence": f"the {color} cat and the _ dog",
                "option1": color,
                "option2": "fish",
                "answer": "1",
            }
        )
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from datasets import Dataset

    root = tmp_path_factory.mktemp("mc_data")
    out = {}
    for split, (n, seed) in {"train": (12, 0), "validation": (6, 1), "test": (6, 2)}.items():
        path = root / f"{split}.jsonl"
        Dataset.from_list(_rows(n, seed)).to_json(path)
        out[split] = str(path)
    return out


def _qasc_like(tokenizer: str, files: dict[str, str], tmp_path, **kwargs) -> MultipleChoiceDataModule:
    args = {
        "task": "colors",
        "tokenizer": tokenizer,
        "label_names": ["A", "B", "C"],
        "context": "{question}",
        "choices_column": "choices",
        "label_column": "answerKey",
        "data_files": files,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        **kwargs,
    }
    return MultipleChoiceDataModule(**args)


def _batch(dm: MultipleChoiceDataModule) -> dict[str, torch.Tensor]:
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


def test_pairs_batches_hold_every_option_with_its_context(models, files, tmp_path):
    dm = _qasc_like(models["encoder"], files, tmp_path)
    assert dm.task_type == "multiple_choice" and dm.num_labels == 3
    batch = _batch(dm)
    assert batch["input_ids"].shape[:2] == (4, 3) and batch["attention_mask"].shape == batch["input_ids"].shape
    tok = AutoTokenizer.from_pretrained(models["encoder"])
    rows = [dm.split("validation")[i] for i in dm._eval_order(dm.split("validation")) or range(4)][:4]
    for row, ids, label in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        for option, pair in zip(row["choices"]["text"], ids, strict=True):
            assert tok.decode(pair, skip_special_tokens=True) == f"{row['question']} {option}"
        assert row["choices"]["text"][int(label)].endswith(row["question"].split()[3])


def test_blank_is_filled_by_each_option_and_labels_map_by_name(models, files, tmp_path):
    dm = _qasc_like(
        models["decoder_lm"], files, tmp_path, label_names=["1", "2"], context="{sentence}", choices_column=None,
        choice_columns=["option1", "option2"], blank="_", label_column="answer", choice_format="continuations",
    )  # fmt: skip
    batch = _batch(dm)
    tok = AutoTokenizer.from_pretrained(models["decoder_lm"])
    row = dm.split("validation")[0]
    collator = dm._collator({"1": 0, "2": 1})
    context, options = collator.split(row)
    color = row["option1"]
    assert context == f"the {color} cat and the" and options == [f"{color} dog", "fish dog"]
    one = collator([row])
    assert one["choice_ids"].shape[:2] == (1, 2) and one["labels"].tolist() == [0]
    expected = continuation_ids(tok, options)
    for ids, mask, want in zip(one["choice_ids"][0], one["choice_mask"][0], expected, strict=True):
        assert ids[mask.bool()].tolist() == want
    assert batch["labels"].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("names, value, index", [(["1", "2"], 2, 1), (["1", "2"], "1", 0), (["A", "B"], 1, 1)])
def test_integer_answers_map_through_decimal_names(models, files, tmp_path, names, value, index):
    from datasets import Value

    dm = _qasc_like(models["encoder"], files, tmp_path, label_names=names, choices_column=None,
                    choice_columns=["option1", "option2"])  # fmt: skip
    assert dm._label_mapping(Value("int64"))[value] == index


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"choice_columns": ["option1"]}, "exactly one of choices_column or choice_columns"),
        ({"choices_column": None, "choice_columns": ["option1"]}, "1 choice_columns but 3 label_names"),
        ({"choice_format": "words"}, "choice_format='words'"),
        ({"context": "no fields"}, "must name columns"),
        ({"blank": ""}, "blank must be"),
    ],
)
def test_bad_settings_name_the_setting(models, files, tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        _qasc_like(models["encoder"], files, tmp_path, **kwargs)


def test_rows_with_another_number_of_options_or_no_blank_are_refused(models, files, tmp_path):
    dm = _qasc_like(models["encoder"], files, tmp_path, label_names=["A", "B"], label_column="answer")
    with pytest.raises(DataError, match="3 options, the task's label_names name 2"):
        dm._collator({})(list(_rows(1, 0)))
    dm = _qasc_like(models["encoder"], files, tmp_path, blank="@")
    with pytest.raises(DataError, match="blank '@' not found"):
        dm._collator({"A": 0})(list(_rows(1, 0)))


def _reference_scores(family: str, path: str, context: str, options: list[str]) -> list[float]:
    """Per option, one unpadded forward of the plain HF model: T5 target log-likelihood, or causal continuation."""
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        if family == "seq2seq":
            model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
            inputs = tok(context, return_tensors="pt")
            for option in options:
                target = tok(option, return_tensors="pt")["input_ids"]
                logp = model(**inputs, labels=target).logits[0].double().log_softmax(-1)
                out.append(float(logp.gather(-1, target[0].unsqueeze(-1)).sum()))
        else:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            prompt = tok(context)["input_ids"]
            for answer in continuation_ids(tok, options):
                logp = model(input_ids=torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
                out.append(float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))))
    return out


@pytest.mark.parametrize("family", ["seq2seq", "decoder_lm"])
def test_label_word_families_score_each_option_by_its_likelihood(models, files, tmp_path, family):
    dm = _qasc_like(models[family], files, tmp_path, choice_format=FORMAT[family])
    dm.setup("fit")
    row = dm.split("train")[0]
    batch = dm._collator({"A": 0, "B": 1, "C": 2})([row])
    model = ExpertModule(models[family], family, label_names=["A", "B", "C"], task_type="multiple_choice").eval()
    with torch.no_grad():
        scores = model(batch)
    expected = _reference_scores(family, models[family], row["question"], row["choices"]["text"])
    torch.testing.assert_close(scores[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_encoder_scores_each_pair_alone(models, files, tmp_path):
    dm = _qasc_like(models["encoder"], files, tmp_path)
    batch = _batch(dm)
    model = ExpertModule(models["encoder"], "encoder", label_names=["A", "B", "C"], task_type="multiple_choice").eval()
    with torch.no_grad():
        logits = model(batch)
        assert logits.shape == (4, 3)
        for b in range(4):
            for c in range(3):
                mask = batch["attention_mask"][b, c].bool()
                one = {k: batch[k][b, c][mask].unsqueeze(0) for k in ("input_ids", "attention_mask", "token_type_ids")}
                hidden = model.backbone(**one).last_hidden_state
                torch.testing.assert_close(
                    model.head(hidden, one["attention_mask"])[0], logits[b, c], atol=1e-5, rtol=1e-5
                )


@pytest.mark.parametrize("family", ["encoder", "seq2seq", "decoder_lm"])
def test_fit_writes_a_multiple_choice_task_vector_that_reproduces_the_expert(models, files, tmp_path, family):
    dm = _qasc_like(models[family], files, tmp_path, choice_format=FORMAT[family])
    expert = ExpertModule(models[family], family, task="colors", task_type="multiple_choice", learning_rate=5e-2)
    callback = TaskVectorCallback(str(tmp_path / "tv"))
    tiny_trainer(max_steps=3, callbacks=[callback], limit_val_batches=1).fit(expert, dm)
    meta = read_meta(callback.written)
    assert meta.task_type == "multiple_choice" and meta.label_names == ["A", "B", "C"]
    assert "val/colors/accuracy" in meta.metrics
    rebuilt = ExpertModule.from_task_vector(callback.written, with_task_vector=True)
    assert rebuilt.task_type == "multiple_choice"
    batch = _batch(dm)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch), expert.eval()(batch), atol=1e-5, rtol=1e-5)


def test_the_model_refuses_a_datamodule_of_another_format_or_type(models, files, tmp_path):
    dm = _qasc_like(models["seq2seq"], files, tmp_path, choice_format="pairs")
    expert = ExpertModule(models["seq2seq"], "seq2seq", task="colors", task_type="multiple_choice")
    with pytest.raises(ValueError, match="set choice_format: targets"):
        tiny_trainer(max_steps=1).fit(expert, dm)
    expert = ExpertModule(models["encoder"], "encoder", task="colors")
    with pytest.raises(ValueError, match="task_type='classification' differs from the datamodule's 'multiple_choice'"):
        tiny_trainer(max_steps=1).fit(expert, _qasc_like(models["encoder"], files, tmp_path))
    with pytest.raises(ValueError, match="family 'vision' cannot score options"):
        ExpertModule(models["encoder"], "vision", task_type="multiple_choice")


def test_pipeline_fits_merges_and_reports_a_choice_task_beside_a_prompted_one(models, files, tmp_path):
    """decoder_lm end to end: a multiple-choice task and a prompted classification task, merged and evaluated."""
    import json

    from datasets import Dataset

    texts = [f"the {w} movie" for w in ("good", "bad", "great", "awful", "fine", "dull")] * 4
    labels = ["yes" if i % 2 == 0 else "no" for i in range(len(texts))]
    path = tmp_path / "sentiment.csv"
    Dataset.from_dict({"text": texts, "label": labels}).to_csv(path, index=False)
    sentiment = {
        "class_path": "drm_lightning.data.text.TextClassificationDataModule",
        "init_args": {"task": "liked", "label_names": ["no", "yes"], "data_files": {"train": str(path),
                      "test": str(path)}, "validation_split": None, "val_fraction": 0.25,
                      "prompt": "{text} was it liked? answer:"},
    }  # fmt: skip
    colors = {
        "class_path": "drm_lightning.data.choice.MultipleChoiceDataModule",
        "init_args": {"task": "colors", "label_names": ["A", "B", "C"], "data_files": files, "context": "{question}",
                      "choices_column": "choices", "label_column": "answerKey"},
    }  # fmt: skip
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "tasks": [colors, sentiment],
        "data": {"batch_size": 4, "eval_batch_size": 8, "choice_format": "continuations"},
        "model": {"backbone": models["decoder_lm"], "family": "decoder_lm", "learning_rate": 0.01},
        "trainer": {**QUIET_CPU_TRAINER, "max_steps": 2},
        "methods": [{"method": "task_arithmetic", "lam": 0.5}, {"method": "ties", "lambdas": [0.5, 1.0]}],
        "plots": False,
    }  # fmt: skip
    run = run_recipe(tmp_path, recipe)
    assert read_meta(run / "task_vectors" / "colors").task_type == "multiple_choice"
    assert read_meta(run / "task_vectors" / "liked").task_type == "classification"
    report = json.loads((run / "report.json").read_text())
    assert "colors" in json.dumps(report) and "ties" in json.dumps(report)
    from drm_lightning.export.model_folder import save_merged_model

    save_merged_model(run / "merged" / "ties", 1.0, tmp_path / "ties_model")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ties_model")  # still a whole causal LM
    assert merged.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_cli_fit_takes_the_task_type_from_the_datamodule(models, files, tmp_path):
    """``drm-lightning fit`` links the datamodule's task_type to the model: a multiple-choice expert, no flag."""
    data = {
        "class_path": "drm_lightning.data.choice.MultipleChoiceDataModule",
        "init_args": {"task": "colors", "label_names": ["A", "B", "C"], "data_files": files, "context": "{question}",
                      "choices_column": "choices", "label_column": "answerKey", "batch_size": 4},
    }  # fmt: skip
    meta = cli_fit(tmp_path, {"backbone": models["encoder"], "family": "encoder"}, data)
    assert meta.task_type == "multiple_choice" and meta.head["type"] == "choice"
