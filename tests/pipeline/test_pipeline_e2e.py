"""``drm-lightning pipeline`` end to end on a tiny BERT and two tiny csv tasks with two merge methods.

All three stages run (fit, merge with λ search, evaluation + report); a second run must reuse the experts' task
vectors and the merges, and a change of a model setting must make the experts stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drm_lightning.cli import main
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import TINY_TASKS, write_tiny_tasks

METHODS = [
    {"method": "task_arithmetic", "lambdas": [0.5, 1.0]},
    {"method": "drm_v", "params": {"drop_rate": 0.5}, "label": "drm_v_half", "lam": 1.0},
]


def _recipe(tmp: Path) -> Path:
    backbone = make_tiny_model("encoder", tmp / "tiny_bert")
    tasks = write_tiny_tasks(tmp / "data", sizes=(64, 24, 24))
    recipe = {
        "run_dir": str(tmp / "run"),
        "tasks": [str(tasks["sentiment"]), {"config": str(tasks["animal"]), "init_args": {"batch_size": 8}}],
        "data": {"max_length": 12, "eval_batch_size": 32},
        "model": {"backbone": backbone, "pooling": "mean", "learning_rate": 0.003, "warmup_ratio": 0.0},
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 3,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
        },
        "methods": METHODS,
        "plots": True,
        # the grids below are the whole search (edge extension: tests/pipeline/test_pipeline_search.py)
        "extend_edges": 0,
    }
    path = tmp / "recipe.yaml"
    path.write_text("# drm-lightning pipeline --config recipe.yaml\n" + json.dumps(recipe, indent=1))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("pipeline")
    recipe = _recipe(tmp)
    code = main(["pipeline", "--config", str(recipe)])
    return {"tmp": tmp, "recipe": recipe, "code": code, "run": tmp / "run"}


def test_first_run_writes_every_stage(first_run: dict) -> None:
    assert first_run["code"] == 0
    run = first_run["run"]
    for task in TINY_TASKS:
        assert (run / "task_vectors" / task / "meta.json").is_file()
        assert (run / "experts" / task / "fit.json").is_file()
    for label in ("task_arithmetic", "drm_v_half"):
        assert (run / "merged" / label / "merge.json").is_file()
    assert (run / "report.md").is_file() and (run / "report.json").is_file()
    assert list(run.glob("*.png")), "matplotlib is installed: the report has plots"


def test_report_matches_the_recipe(first_run: dict) -> None:
    report = json.loads((first_run["run"] / "report.json").read_text())["results"]
    assert report["tasks"] == list(TINY_TASKS)
    assert [m["label"] for m in report["methods"]] == ["task_arithmetic", "drm_v_half"]
    assert [m["method"] for m in report["methods"]] == ["task_arithmetic", "drm_v"]
    ta, drm = report["methods"]
    assert [p["lambda"] for p in sorted(ta["curve"], key=lambda p: p["lambda"])] == [0.5, 1.0]
    assert ta["lambda"] in (0.5, 1.0)
    assert (drm["lambda"], drm["curve"], drm["params"]["drop_rate"]) == (1.0, [], 0.5)
    assert report["split"] == "test" and sorted(report["expert"]) == sorted(TINY_TASKS)
    assert sorted(report["pretrained"]) == sorted(TINY_TASKS)
    markdown = (first_run["run"] / "report.md").read_text()
    assert "task_arithmetic" in markdown and "drm_v_half" in markdown and "sentiment" in markdown


def test_the_best_model_is_exported_and_the_report_ends_with_its_python(first_run: dict) -> None:
    """drm_v_half has a fixed λ (no validation score), so the best on validation is task_arithmetic; the report's
    last lines run in a fresh interpreter without drm_lightning and predict what load_task_model predicts."""
    import subprocess
    import sys

    import torch
    from transformers import AutoTokenizer

    from drm_lightning import load_task_model

    run = first_run["run"]
    report = json.loads((run / "report.json").read_text())
    exported = report["exported"]
    assert exported["label"] == "task_arithmetic" and exported["save_as"] == "model"
    assert exported["lambda"] == report["results"]["methods"][0]["lambda"]
    folder = run / "models" / "task_arithmetic"
    assert (folder / "model.safetensors").is_file() and not (run / "models" / "drm_v_half").exists()
    markdown = (run / "report.md").read_text()
    code = markdown.split("## Use the merged model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "AutoModel.from_pretrained" in code and "heads/" in code  # the plain form: backbone, then the task's head
    done = subprocess.run(
        [sys.executable, "-c", code + "import sys; assert 'drm_lightning' not in sys.modules"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    label, values = done.stdout.strip().splitlines()[-1].split(" ", 1)
    model = load_task_model(folder, exported["task"])
    inputs = AutoTokenizer.from_pretrained(folder)(*[[x] for x in exported["example"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
    assert label == model.label_names[int(logits.argmax())]
    assert torch.allclose(torch.tensor(json.loads(values)), logits, rtol=1e-4, atol=1e-5)


def test_second_run_reuses_experts_and_merges(first_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    run = first_run["run"]
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("task_vectors/*/meta.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in run.glob("merged/*/merge.json")}
    capsys.readouterr()
    assert main(["pipeline", "--config", str(first_run["recipe"]), "--plots", "false"]) == 0
    err = capsys.readouterr().err
    for task in TINY_TASKS:
        assert f"{task}: reusing the task vector" in err
    assert "task_arithmetic: reusing the merge" in err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_changed_model_settings_make_experts_stale(first_run: dict) -> None:
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_fit import expert_is_current
    from drm_lightning.commands.pipeline_folder import RunFolder
    from drm_lightning.commands.pipeline_recipe import load_recipe

    same = RunFolder(load_recipe(parse("pipeline", ["--config", str(first_run["recipe"])])))
    changed = RunFolder(
        load_recipe(parse("pipeline", ["--config", str(first_run["recipe"]), "--model.learning_rate", "0.01"]))
    )
    assert all(expert_is_current(same, t) for t in TINY_TASKS)
    assert not any(expert_is_current(changed, t) for t in TINY_TASKS)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (["--methods", "[{method: nope}]"], ["nope", "drm_v"]),
        (["--methods", "[{method: ties, params: {density: 0}}]"], ["density"]),
        (["--methods", "[{method: ties}, {method: ties}]"], ["ties", "label"]),
        (["--data.max_length", "1"], ["max_length"]),
        (["--tasks", "[no/such/task.yaml]"], ["no/such/task.yaml"]),
        (["--model.family", "fancy"], ["family"]),
        (["--procs_per_expert", "0"], ["procs_per_expert=0"]),
        (["--statistics_examples", "-1"], ["statistics_examples=-1"]),
        (["--statistics_examples", "0", "--methods", "[{method: regmean}]"], ["statistics_examples=0", "regmean"]),
        (["--statistics_layers", "['(']"], ["statistics_layers", "invalid regex"]),
    ],
)
def test_bad_recipes_fail_before_any_work(
    first_run: dict, tmp_path: Path, override: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "never"
    capsys.readouterr()
    code = main(["pipeline", "--config", str(first_run["recipe"]), "--run_dir", str(run_dir), *override])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("drm-lightning: error: "), lines
    assert all(w in lines[0] for w in words), lines
    assert not run_dir.exists()
