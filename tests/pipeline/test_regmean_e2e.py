"""RegMean end to end through the command line: two tiny experts fitted by ``drm-lightning fit`` (their statistics
recorded when fitting ends), ``drm-lightning merge --method regmean``, the one line for a task vector without
statistics, ``drm-lightning statistics`` adding them back (the same Grams), and a pipeline recipe with RegMean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from drm_lightning.cli import main
from drm_lightning.io.task_vector import META_FILE, read_meta
from tests.helpers.expert_marks import KNOWN_DEPRECATIONS
from tests.helpers.recipes import QUIET_TRAINER, run_recipe, tiny_two_task_recipe
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import write_tiny_tasks

pytestmark = KNOWN_DEPRECATIONS


def _grams(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "statistics.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("regmean_cli")
    backbone = make_tiny_model("encoder", tmp / "bert")
    tasks = write_tiny_tasks(tmp / "data", sizes=(40, 8, 8))
    model = tmp / "model.yaml"
    model.write_text(json.dumps({"model": {"backbone": backbone, "pooling": "mean", "learning_rate": 0.003}}))
    folders = {}
    for task, config in tasks.items():
        args = ["fit", "--config", str(config), "--config", str(model), *QUIET_TRAINER, "--trainer.max_steps=2"]
        args += ["--trainer.limit_val_batches=1", f"--task_vector_dir={tmp / 'tv' / task}"]
        assert main([*args, f"--trainer.default_root_dir={tmp / 'fit' / task}"]) == 0
        folders[task] = tmp / "tv" / task
    return {"tmp": tmp, "tasks": tasks, "folders": folders}


def test_fit_records_statistics_and_merge_uses_them(experts: dict, capsys: pytest.CaptureFixture) -> None:
    folders = list(experts["folders"].values())
    for folder in folders:
        stats = read_meta(folder).statistics
        assert stats is not None and stats["examples"] == 40  # every example of the 40-row training split (< 256)
    out = experts["tmp"] / "merged"
    args = ["merge", "--method", "regmean", "--params", '{"alpha": 0.5}', "--lam", "1.0", "--output", str(out)]
    assert main([*args, "--task_vectors", json.dumps([str(f) for f in folders])]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "regmean" and record["params"]["alpha"] == 0.5
    assert record["lam"] == 1.0 and (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def test_without_statistics_one_line_then_the_statistics_command(experts: dict, tmp_path: Path, capsys) -> None:
    """A copy with the statistics removed is refused in one line naming the command; the command adds the same
    Grams the callback recorded (the same examples through the same weights, rebuilt from the task vector)."""
    task, original = next(iter(experts["folders"].items()))
    other = list(experts["folders"].values())[1]
    copy = tmp_path / task
    shutil.copytree(original, copy)
    meta = json.loads((copy / META_FILE).read_text())
    meta["statistics"] = None
    (copy / META_FILE).write_text(json.dumps(meta))
    (copy / "statistics.safetensors").unlink()
    capsys.readouterr()
    args = ["merge", "--method", "regmean", "--lam", "1.0", "--output", str(tmp_path / "m")]
    assert main([*args, "--task_vectors", json.dumps([str(copy), str(other)])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no input statistics, which regmean needs" in err[0]
    assert f"drm-lightning statistics --task_vector {copy}" in err[0] and not (tmp_path / "m").exists()

    assert main(["statistics", "--task_vector", str(copy), "--task", str(experts["tasks"][task])]) == 0
    added, recorded = _grams(copy), _grams(original)
    assert set(added) == set(recorded)
    size = sum(g.numel() * 4 for g in added.values())  # printed before the recording, from the layers' widths
    line = f"statistics: {task}: {len(added)} layers, {size / 1e6:.1f} MB of float32 Grams to record ({size} bytes)"
    assert line in capsys.readouterr().err
    assert read_meta(copy).statistics == read_meta(original).statistics
    for name, gram in recorded.items():
        torch.testing.assert_close(added[name], gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()))


def test_fit_statistics_examples_zero_records_none(experts: dict, tmp_path: Path) -> None:
    task, config = next(iter(experts["tasks"].items()))
    model = experts["tmp"] / "model.yaml"
    args = ["fit", "--config", str(config), "--config", str(model), *QUIET_TRAINER, "--trainer.max_steps=1"]
    args += ["--trainer.limit_val_batches=0", "--statistics_examples=0", f"--task_vector_dir={tmp_path / 'tv'}"]
    assert main([*args, f"--trainer.default_root_dir={tmp_path}"]) == 0
    assert read_meta(tmp_path / "tv").statistics is None and not (tmp_path / "tv" / "statistics.safetensors").exists()


def test_recipe_chooses_the_layers_that_get_statistics(tmp_path: Path) -> None:
    """``statistics_layers`` in a recipe: the fits record only the matching layers' Grams (the two MLP output and
    two attention output matrices of the tiny encoder), and RegMean merges with them (the other layers by the mean)."""
    recipe = tiny_two_task_recipe(
        tmp_path, methods=[{"method": "regmean", "lambdas": [1.0]}], split="validation",
        statistics_layers=[r"output\.dense\.weight$"],
    )  # fmt: skip
    run = run_recipe(tmp_path, recipe)
    for task in ("sentiment", "animal"):
        rows = read_meta(run / "task_vectors" / task).statistics["rows"]
        kinds = ("attention.output.", "output.")
        expected = [f"encoder.layer.{i}.{kind}dense.weight" for i in range(2) for kind in kinds]
        assert sorted(rows) == sorted(expected)
        assert set(_grams(run / "task_vectors" / task)) == set(rows)
    report = json.loads((run / "report.json").read_text())
    assert [m["method"] for m in report["results"]["methods"]] == ["regmean"]


def test_pipeline_recipe_with_regmean(tmp_path: Path) -> None:
    """RegMean in a recipe's method list: the pipeline's fits record the statistics, its merge and λ search use
    them; reused experts without statistics get them before the merge (the same Grams)."""
    recipe = tiny_two_task_recipe(tmp_path, methods=[{"method": "regmean", "lambdas": [0.5, 1.0]}], split="validation")
    run = run_recipe(tmp_path, recipe)
    report = json.loads((run / "report.json").read_text())
    assert [m["method"] for m in report["results"]["methods"]] == ["regmean"]
    assert '| regmean | regmean | {"alpha": 0.9, "ridge": 1e-08} |' in (run / "report.md").read_text()
    recorded = {}
    for task in ("sentiment", "animal"):
        folder = run / "task_vectors" / task
        assert read_meta(folder).statistics is not None
        recorded[task] = _grams(folder)
        meta = json.loads((folder / META_FILE).read_text())  # as an expert fitted before statistics existed
        (folder / META_FILE).write_text(json.dumps({**meta, "statistics": None}))
    run_recipe(tmp_path, recipe)  # reuses the experts, adds their statistics, merges again
    for task, grams in recorded.items():
        added = _grams(run / "task_vectors" / task)
        assert set(added) == set(grams)
        for name, gram in grams.items():
            torch.testing.assert_close(added[name], gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()))
