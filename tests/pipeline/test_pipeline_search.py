"""``pipeline`` with method parameters searched: lists in ``params``, one merged folder per set, the best
(parameters, λ) on validation, the landscape in the report, edge extension of λ and of the parameters, and a second
recipe reusing the first one's experts (``experts_dir``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drm_lightning.cli import main
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import TINY_TASKS, write_tiny_tasks

METHODS = [
    {"method": "drm_v", "params": {"drop_rate": [0.3, 0.6]}, "lambdas": [0.5, 1.0]},
    {"method": "ties", "params": {"density": [0.3, 0.6]}, "lam": 1.0},
    {"method": "task_arithmetic", "lambdas": [0.5, 1.0]},
]
ABLATION = [
    {"method": "drm_v", "label": f"drm_v_{name}", "params": {"drop_rate": 0.5, **switches}, "lam": 1.0}
    for name, switches in [("full", {}), ("no_renorm", {"renormalise": False})]
]


def _recipe(tmp: Path, name: str, methods: list, **extra) -> Path:
    backbone = make_tiny_model("encoder", tmp / "tiny_bert")
    tasks = write_tiny_tasks(tmp / "data", sizes=(48, 24, 24))
    recipe = {
        "run_dir": str(tmp / name),
        "tasks": [str(tasks["sentiment"]), str(tasks["animal"])],
        "data": {"max_length": 12, "eval_batch_size": 32, "batch_size": 8},
        "model": {"backbone": backbone, "pooling": "mean", "learning_rate": 0.003, "warmup_ratio": 0.0},
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
        },
        "methods": methods,
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text("# drm-lightning pipeline --config recipe.yaml\n" + json.dumps(recipe, indent=1))
    return path


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("search")
    recipe = _recipe(tmp, "run", METHODS, plots=True)
    code = main(["pipeline", "--config", str(recipe)])
    report = json.loads((tmp / "run" / "report.json").read_text())
    return {"tmp": tmp, "code": code, "run": tmp / "run", "report": report}


def test_every_parameter_set_is_merged_and_the_best_pair_chosen(search_run: dict) -> None:
    assert search_run["code"] == 0
    run = search_run["run"]
    methods = {m["label"]: m for m in search_run["report"]["results"]["methods"]}
    drm = methods["drm_v"]
    names = [v["name"] for v in drm["variants"]]
    # two sets on a two-value grid: the best is at an edge, so one more drop rate beyond it was merged and tried
    assert names[:2] == ["drop_rate-0.3", "drop_rate-0.6"] and len(names) == 3
    assert names[2] in ("drop_rate-0", "drop_rate-0.9")  # a step of 0.3 beyond the edge
    for name in names:
        record = json.loads((run / "merged" / "drm_v" / name / "merge.json").read_text())
        assert record["params"]["drop_rate"] == float(name.split("-")[1])
    best = max(drm["variants"], key=lambda v: v["score"])
    assert drm["params"]["drop_rate"] == best["values"]["drop_rate"] and drm["lambda"] == best["lambda"]
    assert drm["evaluations"] == sum(len(v["curve"]) for v in drm["variants"]) >= 6
    assert any("added" in note for note in drm["notes"])
    ties = methods["ties"]  # λ given: each set is scored at that λ on validation, one evaluation each
    assert ties["lambda"] == 1.0 and all(len(v["curve"]) == 1 for v in ties["variants"])
    assert ties["evaluations"] == len(ties["variants"])
    assert methods["task_arithmetic"]["variants"] == []


def test_report_shows_the_landscape(search_run: dict) -> None:
    markdown = (search_run["run"] / "report.md").read_text()
    assert "## Parameter search: drm_v" in markdown and "## Parameter search: ties" in markdown
    assert "drop_rate-0.6" in markdown and "λ evaluations" in markdown
    assert (search_run["run"] / "param_search.png").is_file()
    summary = search_run["report"]["summary"]["methods"]["drm_v"]
    assert summary["evaluations"] == search_run["report"]["results"]["methods"][0]["evaluations"]


def test_second_recipe_reuses_the_experts_and_runs_the_switches(search_run: dict, capsys) -> None:
    tmp = search_run["tmp"]
    recipe = _recipe(tmp, "ablation", ABLATION, experts_dir=str(search_run["run"]), plots=False)
    capsys.readouterr()
    assert main(["pipeline", "--config", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert all(f"{task}: reusing the task vector" in err for task in TINY_TASKS)
    assert not (tmp / "ablation" / "task_vectors").exists()
    methods = json.loads((tmp / "ablation" / "report.json").read_text())["results"]["methods"]
    assert [m["params"]["renormalise"] for m in methods] == [True, False]


@pytest.mark.parametrize(
    ("methods", "words"),
    [
        ("[{method: drm_v, params: {drop_rate: [0.5, 1.5]}}]", ["methods[0].params.drop_rate", "1.5"]),
        ("[{method: drm_v, params: {drop_rate: []}}]", ["drop_rate=[]"]),
        ("[{method: ties, params: {densty: [0.1]}}]", ["densty"]),
    ],
)
def test_bad_grids_fail_before_any_work(
    search_run: dict, tmp_path: Path, methods: str, words: list[str], capsys
) -> None:
    recipe = _recipe(search_run["tmp"], "run", METHODS)
    capsys.readouterr()
    code = main(["pipeline", "--config", str(recipe), "--run_dir", str(tmp_path / "never"), "--methods", methods])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "never").exists()
