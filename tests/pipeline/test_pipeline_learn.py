"""A recipe method with a ``learn`` block: coefficients learned on top of the chosen λ, reported and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.recipes import run_recipe, tiny_two_task_recipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LEARN_METHODS = [
    {"method": "iso_c", "label": "iso_c_layers", "lambdas": [1.0],
     "learn": {"objective": "cross_entropy", "max_steps": 2, "lr": 0.05}},
    {"method": "task_arithmetic", "label": "adamerging", "lambdas": [0.5],
     "learn": {"form": "task", "granularity": "block", "max_steps": 2, "lr": 0.05}},
]  # fmt: skip


def test_learned_methods_run_end_to_end(tmp_path: Path) -> None:
    recipe = tiny_two_task_recipe(tmp_path, methods=LEARN_METHODS, export="all")
    recipe["trainer"]["max_epochs"] = 1
    run = run_recipe(tmp_path, recipe)
    report = json.loads((run / "report.json").read_text())
    methods = {m["label"]: m for m in report["results"]["methods"]}
    for label, form in (("iso_c_layers", "layer"), ("adamerging", "task")):
        learned = methods[label]["learned"]
        assert learned["form"] == form and learned["steps"] == 2
        assert learned["validation_score"] is not None
        folder = Path(learned["folder"])
        assert folder == run / "merged" / label / "learned"
        assert (folder / "coefficients.json").is_file()
        exported = json.loads((run / "models" / label / "merge.json").read_text())
        assert exported["merged_delta"] == str(folder.resolve()) and exported["lam"] == 1.0
    assert methods["adamerging"]["learned"]["columns"] == ["sentiment", "animal"]
    assert "labels unused" in methods["adamerging"]["learned"]["data"]
    assert "labelled validation" in methods["iso_c_layers"]["learned"]["data"]
    markdown = (run / "report.md").read_text()
    assert "## Learned coefficients" in markdown and "adamerging" in markdown


@pytest.mark.parametrize(
    ("learn", "method", "match"),
    [
        ({"form": "task"}, "iso_c", r"methods\[0\]\.learn\.form='task': method 'iso_c'"),
        ({"objective": "kl"}, "iso_c", r"methods\[0\]\.learn\.objective='kl'"),
        ({"split": "test"}, "ties", r"methods\[0\]\.learn\.split='test'.*transductive: true"),
    ],
)
def test_a_bad_learn_block_fails_before_any_fit(tmp_path: Path, learn: dict, method: str, match: str) -> None:
    from drm_lightning.commands.pipeline_recipe import build_pipeline_parser, load_recipe
    from tests.helpers.recipes import write_recipe

    recipe = tiny_two_task_recipe(tmp_path, methods=[{"method": method, "learn": learn}])
    config = build_pipeline_parser().parse_args(["--config", str(write_recipe(tmp_path, recipe))])
    with pytest.raises(ValueError, match=match):
        load_recipe(config)
    assert not Path(recipe["run_dir"]).exists()
