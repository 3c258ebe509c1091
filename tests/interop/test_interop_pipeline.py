"""A recipe's ``experts``: a task whose expert was fine-tuned elsewhere is imported, the others are fitted, and the
pipeline merges, searches λ, tests and reports them all; a second run reuses the import; a bad entry fails first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from drm_lightning.cli import main
from tests.helpers.interop_models import perturb
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import write_tiny_tasks

pytestmark = pytest.mark.slow  # fits one tiny expert and runs the whole pipeline


def _recipe(tmp: Path, experts: dict[str, str]) -> Path:
    tasks = write_tiny_tasks(tmp / "data", sizes=(48, 16, 16))
    recipe = {
        "run_dir": str(tmp / "run"),
        "tasks": [str(tasks["sentiment"]), str(tasks["animal"])],
        "experts": experts,
        "data": {"max_length": 12, "eval_batch_size": 32},
        "model": {"backbone": str(tmp / "bert"), "learning_rate": 0.003, "warmup_ratio": 0.0},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0},
        "methods": [{"method": "task_arithmetic", "lam": 0.5}],
        "plots": False,
        "extend_edges": 0,
    }  # fmt: skip
    path = tmp / "recipe.yaml"
    path.write_text("# drm-lightning pipeline --config recipe.yaml\n" + json.dumps(recipe))
    return path


def test_recipe_imports_an_expert_and_reuses_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_model("encoder", tmp_path / "bert")
    model = BertForSequenceClassification.from_pretrained(
        tmp_path / "bert", id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    torch.manual_seed(0)
    perturb(model, seed=1).save_pretrained(tmp_path / "sentiment_ckpt")
    recipe = _recipe(tmp_path, {"sentiment": str(tmp_path / "sentiment_ckpt")})
    assert main(["pipeline", "--config", str(recipe)]) == 0
    run = tmp_path / "run"
    meta = json.loads((run / "task_vectors" / "sentiment" / "meta.json").read_text())
    assert meta["task"] == "sentiment" and meta["source"]["type"] == "transformers"
    assert (run / "experts" / "sentiment" / "import.json").is_file()
    assert (run / "task_vectors" / "animal" / "meta.json").is_file()  # fitted
    exported = list(run.glob("models/*/tasks/sentiment/config.json"))  # the imported classifier, merged, as itself
    assert len(exported) == 1 and not list(run.glob("models/*/tasks/animal"))
    report = json.loads((run / "report.json").read_text())
    assert "sentiment" in json.dumps(report) and "animal" in json.dumps(report)
    capsys.readouterr()
    assert main(["pipeline", "--config", str(recipe)]) == 0
    assert "sentiment: reusing the imported expert" in capsys.readouterr().err


def test_bad_experts_entry_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_model("encoder", tmp_path / "bert")
    recipe = _recipe(tmp_path, {"weather": str(tmp_path / "bert")})
    assert main(["pipeline", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err.strip()
    assert "experts: ['weather'] are not tasks of the recipe" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "task_vectors").exists()


def test_expert_with_the_labels_in_another_order_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its logits would score every example against the other class; said before anything is fitted."""
    make_tiny_model("encoder", tmp_path / "bert")
    model = BertForSequenceClassification.from_pretrained(
        tmp_path / "bert", id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1}
    )
    model.save_pretrained(tmp_path / "flipped")
    recipe = _recipe(tmp_path, {"sentiment": str(tmp_path / "flipped")})
    assert main(["pipeline", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err.strip()
    assert "['pos', 'neg']" in err and "['neg', 'pos']" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "task_vectors").exists()


def test_check_labels_table() -> None:
    from drm_lightning.interop.names import check_labels

    check_labels("x", ["neg", "pos"], ["neg", "pos"])
    check_labels("x", ["LABEL_0", "LABEL_1"], ["neg", "pos"])  # generic names: the task's order is taken
    check_labels("x", [], ["neg", "pos"])  # no head: nothing to compare
    for expert in (["pos", "neg"], ["LABEL_0", "LABEL_1", "LABEL_2"], ["good", "bad"]):
        with pytest.raises(ValueError, match=r"x: the expert's labels"):
            check_labels("x", expert, ["neg", "pos"])
