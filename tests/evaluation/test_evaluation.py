"""Evaluation: the λ search on synthetic objectives, and multi-task validation of tiny real models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from drm_lightning.evaluation.lambda_search import (
    ELEMENTWISE_GRID,
    SVD_GRID,
    default_grid,
    make_grid,
    search_lambda,
)
from drm_lightning.evaluation.merged import MergedBackbone
from drm_lightning.evaluation.multitask import evaluate_backbone
from drm_lightning.evaluation.report import build_report
from drm_lightning.evaluation.run import evaluate_merges

EXPERT = {"a": {"accuracy": 0.8}, "b": {"accuracy": 0.5}}


class FakeEvaluate:
    """A merged model whose per-task accuracy peaks at ``best`` (task a sharply, task b flatly); counts calls."""

    def __init__(self, best: float, bump: tuple[float, float] | None = None) -> None:
        self.best = best
        self.bump = bump
        self.calls: list[float] = []

    def __call__(self, lam: float) -> dict[str, dict[str, float]]:
        self.calls.append(lam)
        a = 0.8 - 0.1 * (lam - self.best) ** 2
        if self.bump is not None and abs(lam - self.bump[0]) < 1e-9:
            a += self.bump[1]
        b = 0.5 - 0.02 * abs(lam - self.best)
        return {"a": {"accuracy": a, "f1": 0.1}, "b": {"accuracy": b, "f1": 0.1}}


@pytest.mark.parametrize(
    ("method", "grid"),
    [
        ("task_arithmetic", ELEMENTWISE_GRID),
        ("ties", ELEMENTWISE_GRID),
        ("dare_ties", ELEMENTWISE_GRID),
        ("DARE-TA", ELEMENTWISE_GRID),
        ("drm", SVD_GRID),
        ("drm_v", SVD_GRID),
        ("drm-h", SVD_GRID),
        ("iso_c", SVD_GRID),
        ("iso_cts", SVD_GRID),
        ("tsv_m", SVD_GRID),
    ],
)
def test_default_grid_per_method(method: str, grid: tuple[float, ...]) -> None:
    assert default_grid(method) == list(grid)


def test_default_grids_values() -> None:
    assert ELEMENTWISE_GRID == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert len(SVD_GRID) == 30 and SVD_GRID[0] == 0.1 and SVD_GRID[-1] == 3.0 and 0.3 in SVD_GRID


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start=0.1, stop=1.0, step=0.0), "step=0.0"),
        (dict(start=0.0, stop=1.0, step=0.1), "start=0.0"),
        (dict(start=2.0, stop=1.0, step=0.1), "start=2.0, stop=1.0"),
    ],
)
def test_make_grid_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_grid(**kwargs)


def test_unknown_method_has_no_grid() -> None:
    with pytest.raises(ValueError, match=r"method='magic': no default λ grid; known methods: \["):
        default_grid("magic")


@pytest.mark.parametrize("grid", [SVD_GRID, ELEMENTWISE_GRID], ids=["svd", "elementwise"])
@pytest.mark.parametrize("best", [0.1, 0.3, 0.7, 1.0, 1.3, 2.2, 2.9, 3.0])
def test_refine_finds_the_grid_optimum_with_fewer_evaluations(grid: tuple[float, ...], best: float) -> None:
    full = FakeEvaluate(best)
    exhaustive = search_lambda(full, EXPERT, grid, strategy="grid")
    smart = FakeEvaluate(best)
    refined = search_lambda(smart, EXPERT, grid, strategy="refine")
    expected = min(grid, key=lambda lam: abs(lam - best))
    assert exhaustive.best_lambda == expected and refined.best_lambda == expected
    assert refined.best_score == exhaustive.best_score
    assert len(full.calls) == len(grid) == exhaustive.evaluations
    assert len(set(smart.calls)) == len(smart.calls) == refined.evaluations  # each λ evaluated once
    assert refined.evaluations <= {30: 12, 10: 7}[len(grid)]


def test_grid_curve_scores_are_average_normalised_accuracy() -> None:
    result = search_lambda(FakeEvaluate(0.5), EXPERT, [0.5, 0.1], strategy="grid")
    assert [p.lam for p in result.curve] == [0.1, 0.5]  # increasing λ, whatever the order given
    point = result.curve[0]
    a, b = 0.8 - 0.1 * 0.16, 0.5 - 0.02 * 0.4
    assert point.score == pytest.approx((a / 0.8 + b / 0.5) / 2)
    assert point.metrics["a"] == {"accuracy": pytest.approx(a), "f1": 0.1}
    assert result.best_lambda == 0.5 and result.best_score == pytest.approx(1.0)
    assert result.best_metrics == result.curve[1].metrics
    assert [p.lam for p in result.sorted_curve()] == [0.1, 0.5]


def test_search_on_another_metric() -> None:
    def evaluate(lam: float) -> dict[str, dict[str, float]]:
        return {"a": {"accuracy": 0.5, "f1": 1 - abs(lam - 0.4)}, "b": {"accuracy": 0.5, "f1": 0.5}}

    expert = {"a": {"accuracy": 0.5, "f1": 1.0}, "b": {"accuracy": 0.5, "f1": 0.5}}
    assert search_lambda(evaluate, expert, ELEMENTWISE_GRID, metric="f1").best_lambda == 0.4


@pytest.mark.parametrize("strategy", ["grid", "refine"])
def test_ties_and_nan_go_to_the_smaller_lambda(strategy: str) -> None:
    def flat(lam: float) -> dict[str, dict[str, float]]:
        return {"a": {"accuracy": math.nan if lam < 0.25 else 0.8}, "b": {"accuracy": 0.5}}

    assert search_lambda(flat, EXPERT, ELEMENTWISE_GRID, strategy=strategy).best_lambda == 0.3


def test_refine_can_be_fooled_by_a_narrow_bump_that_grid_finds() -> None:
    """The documented trade-off: ``refine`` assumes one peak near the best coarse λ."""
    bumpy = FakeEvaluate(2.0, bump=(0.3, 1.0))
    assert search_lambda(bumpy, EXPERT, SVD_GRID, strategy="grid").best_lambda == 0.3
    assert search_lambda(FakeEvaluate(2.0, bump=(0.3, 1.0)), EXPERT, SVD_GRID, strategy="refine").best_lambda == 2.0


@pytest.mark.parametrize(
    ("grid", "strategy", "expert", "match"),
    [
        ([], "grid", EXPERT, "grid: empty"),
        ([0.1, 0.1], "grid", EXPERT, r"grid: repeated λ"),
        ([0.1, math.inf], "grid", EXPERT, r"grid: non-finite λ \[inf\]"),
        ([0.1], "golden", EXPERT, "strategy='golden'"),
        ([0.1], "grid", {"a": {"f1": 1.0}}, r"expert metrics\['a'\]: no 'accuracy'"),
        ([0.1], "grid", {"c": {"accuracy": 1.0}}, r"metrics\['c'\]: no 'accuracy'"),
        ([0.1], "grid", {"a": {"accuracy": 0.0}}, r"expert metric of task 'a' is 0.0"),
    ],
)
def test_search_rejects_bad_input(grid: list[float], strategy: str, expert: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        search_lambda(FakeEvaluate(0.5), expert, grid, strategy=strategy)


# ---------------------------------------------------------------- integration: tiny BERT, two tiny tasks

TASKS = {
    # task: (label names, words that mark each label)
    "mood": (["neg", "pos"], [["bad", "awful", "dull"], ["good", "great", "fun"]]),
    "colour": (["warm", "cool"], [["red", "yellow"], ["blue", "green"]]),
}
FILLER = ["the", "movie", "was", "a", "very", "cat", "dog", "one", "two"]


def write_task_csv(folder: Path, task: str, seed: int) -> dict[str, str]:
    """Seeded tiny csv splits: a sentence of filler words plus one word that decides the label."""
    import csv
    import random

    rng = random.Random(seed)
    names, words = TASKS[task]
    files = {}
    for split, rows in (("train", 48), ("validation", 16), ("test", 16)):
        path = folder / task / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(rows):
                label = i % 2
                sentence = rng.sample(FILLER, 3) + [rng.choice(words[label])]
                rng.shuffle(sentence)
                writer.writerow([" ".join(sentence), names[label]])
        files[split] = str(path)
    return files


def make_datamodules(base: str, files: dict[str, dict[str, str]]) -> dict:
    from drm_lightning.data.text import TextClassificationDataModule

    return {
        task: TextClassificationDataModule(
            task=task, tokenizer=base, label_names=TASKS[task][0], data_files=files[task], max_length=16, batch_size=8
        )
        for task in TASKS
    }


EVAL_TRAINER = dict(accelerator="cpu")


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two experts fine-tuned (4 short epochs) from one tiny BERT; their task vectors and own validation metrics."""
    from lightning.pytorch import Trainer

    from drm_lightning.callbacks.task_vector import TaskVectorCallback
    from drm_lightning.models.expert import ExpertModule
    from tests.helpers.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("evaluation")
    base = make_tiny_model("encoder", root / "base")
    files = {task: write_task_csv(root / "data", task, seed) for seed, task in enumerate(TASKS)}
    datamodules = make_datamodules(base, files)
    folders, own = [], {}
    for task in TASKS:
        torch.manual_seed(0)  # head init, dropout and shuffling: the same experts whatever ran before
        expert = ExpertModule(
            base,
            "encoder",
            task,
            TASKS[task][0],
            learning_rate=5e-3,
            warmup_ratio=0.0,
            pooling="mean",
            head_dropout=0.0,
        )
        trainer = Trainer(
            max_epochs=4,  # >= 0.8 validation accuracy for seeds 0-3 (checked), chance is 0.5
            callbacks=[TaskVectorCallback(str(root / "tv" / task))],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            num_sanity_val_steps=0,
        )
        trainer.fit(expert, datamodule=datamodules[task])
        logged = trainer.validate(expert, datamodules[task], verbose=False)[0]
        own[task] = {key.split("/")[-1]: value for key, value in logged.items()}
        folders.append(root / "tv" / task)
    return {"root": root, "base": base, "files": files, "datamodules": datamodules, "task_vectors": folders, "own": own}


def assert_metrics_in_unit_interval(metrics: dict[str, dict[str, float]]) -> None:
    assert set(metrics) == set(TASKS)
    for task, values in metrics.items():
        assert 0.0 <= values["accuracy"] <= 1.0, (task, values)


def test_with_task_vector_reproduces_each_expert(experts: dict) -> None:
    got = evaluate_backbone(
        None, experts["task_vectors"], experts["datamodules"], "validation", EVAL_TRAINER, with_task_vector=True
    )
    for task in TASKS:
        assert got[task]["accuracy"] == experts["own"][task]["accuracy"]
        assert got[task]["loss"] == pytest.approx(experts["own"][task]["loss"], rel=1e-4)
    assert min(v["accuracy"] for v in got.values()) >= 0.75  # the experts learnt their tasks (chance: 0.5)


def test_evaluate_merges_end_to_end(experts: dict) -> None:
    """Merge, search λ on validation, report on test; the merged backbone is W_0 + λ·Δ exactly."""
    from drm_lightning.merging.engine.apply import apply_merged_delta
    from drm_lightning.merging.engine.merger import merge_task_vectors

    root, tvs, dms = experts["root"], experts["task_vectors"], experts["datamodules"]
    merge_task_vectors(tvs, "task_arithmetic", root / "merged_ta", progress=False)
    merge_task_vectors(tvs, "ties", root / "merged_ties", progress=False)
    results = evaluate_merges(
        tvs,
        [root / "merged_ta", root / "merged_ties"],
        dms,
        split="test",
        lambdas={"TIES": 0.7},  # labels come from each merge.json
        strategy="refine",
        grids={"Task Arithmetic": [0.3, 0.6, 1.0]},
        trainer_kwargs=EVAL_TRAINER,
    )
    assert results.tasks == list(TASKS) and results.split == "test"
    for metrics in (results.expert, results.pretrained, *(m.metrics for m in results.methods)):
        assert_metrics_in_unit_interval(metrics)
    ta, ties = results.method("Task Arithmetic"), results.method("TIES")
    assert ta.method == "task_arithmetic" and ta.lam in (0.3, 0.6, 1.0) and ta.merge_seconds > 0
    assert ties.lam == 0.7 and ties.curve == []
    assert max(p.score for p in ta.curve) == next(p.score for p in ta.curve if p.lam == ta.lam)
    for point in ta.curve:
        assert_metrics_in_unit_interval(point.metrics)

    # MergedBackbone.at(λ) gives exactly apply_merged_delta's weights, at every λ, in any order.
    backbone = MergedBackbone(root / "merged_ta")
    for lam in (0.6, 0.3, 0.6):
        expected = apply_merged_delta(root / "merged_ta", lam).state_dict()
        got = backbone.at(lam).state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)

    # A shared module passed in comes back unchanged after expert evaluation (deltas are undone).
    module = backbone.at(1.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    evaluate_backbone(module, tvs[:1], dms, "test", EVAL_TRAINER, with_task_vector=True)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    md = build_report(results, root / "run", tvs, {"Task Arithmetic": root / "merged_ta"})
    assert "| task | pretrained | expert | Task Arithmetic | Task Arithmetic norm. | TIES | TIES norm. |" in md
    assert {"report.json", "report.md", "accuracy_by_task.png", "lambda_curves.png", "singular_values.png"} <= {
        p.name for p in (root / "run").iterdir()
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(split="train"), "split='train'"),
        (dict(task_vectors=[]), "task_vectors: empty"),
        (dict(datamodules={}), r"no datamodule for task\(s\) \['mood'\]"),
        (dict(twice=True), r"task\(s\) \['mood'\] appear more than once"),
    ],
)
def test_evaluate_backbone_rejects(experts: dict, kwargs: dict, match: str) -> None:
    tvs = experts["task_vectors"][:1] * (2 if kwargs.pop("twice", False) else 1)
    args = dict(backbone=None, task_vectors=tvs, datamodules=experts["datamodules"], split="validation") | kwargs
    with pytest.raises(ValueError, match=match):
        evaluate_backbone(**args)


def test_evaluate_merges_rejects_unknown_labels(experts: dict) -> None:
    with pytest.raises(ValueError, match=r"lambdas: label\(s\) \['nope'\] are not among the merged models \['x'\]"):
        evaluate_merges(experts["task_vectors"], {"x": "unused"}, experts["datamodules"], lambdas={"nope": 1.0})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_evaluation_matches_cpu(experts: dict) -> None:
    """On a GPU the shared backbone goes to the device per task and comes back; the numbers do not change."""
    tvs, dms = experts["task_vectors"], experts["datamodules"]
    cpu = evaluate_backbone(None, tvs, dms, "validation", EVAL_TRAINER, with_task_vector=True)
    gpu = evaluate_backbone(None, tvs, dms, "validation", {"accelerator": "gpu"}, with_task_vector=True)
    for task in TASKS:
        assert gpu[task]["accuracy"] == cpu[task]["accuracy"]
        assert gpu[task]["loss"] == pytest.approx(cpu[task]["loss"], rel=1e-3)


# ------------------------------------------------------------------------------------------ shared-out evaluation


@pytest.mark.parametrize(
    ("rank", "world", "mine"),
    [(0, 1, ["u0", "u1", "u2", "u3", "u4"]), (0, 2, ["u0", "u2", "u4"]), (1, 2, ["u1", "u3"]), (2, 3, ["u2"])],
)
def test_shared_units_are_dealt_out_and_every_rank_gets_all(
    monkeypatch: pytest.MonkeyPatch, rank: int, world: int, mine: list[str]
) -> None:
    """Unit i is done by rank i mod W; the gathered shares come back in unit order on every rank."""
    from drm_lightning import world as world_module
    from drm_lightning.evaluation import run as run_module

    units = [f"u{i}" for i in range(5)]
    done: list[str] = []

    def work(unit: str) -> dict:
        done.append(unit)
        return {"by": rank, "unit": unit}

    def gather(error, payload):  # the other ranks' shares, as they would arrive
        assert error is None
        shares = [{u: {"by": r, "unit": u} for u in units[r::world]} for r in range(world)]
        shares[rank] = payload
        return shares

    monkeypatch.setattr(world_module, "gather_results", gather)
    got = run_module._shared(units, work, rank, world)
    assert done == mine
    assert list(got) == units and all(got[u] == {"by": i % world, "unit": u} for i, u in enumerate(units))


def test_a_failing_unit_still_joins_the_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank whose own unit fails hands its error to the gather (which raises on every rank), never skips it."""
    from drm_lightning import world as world_module
    from drm_lightning.evaluation import run as run_module

    seen: list[BaseException | None] = []

    def gather(error, payload):
        seen.append(error)
        raise RuntimeError("raised on every rank")

    def work(unit: str) -> dict:
        raise ValueError(f"{unit}: broken")

    monkeypatch.setattr(world_module, "gather_results", gather)
    with pytest.raises(RuntimeError, match="every rank"):
        run_module._shared(["a", "b"], work, 1, 2)
    assert [str(e) for e in seen] == ["b: broken"]


def test_gather_results_without_a_group_is_local() -> None:
    from drm_lightning.world import gather_results

    assert gather_results(None, {"x": 1}) == [{"x": 1}]
    with pytest.raises(KeyError):
        gather_results(KeyError("own"), {"x": 1})


def test_evaluation_metrics_never_sync_across_ranks(experts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks that evaluate different models must not meet in a metric sync: LocalMetrics turns every sync off."""
    import torchmetrics

    synced: list[str] = []
    real_sync = torchmetrics.Metric.sync

    def sync(self, *args, should_sync: bool = True, **kwargs):
        if should_sync:
            synced.append(type(self).__name__)
        return real_sync(self, *args, should_sync=should_sync, **kwargs)

    monkeypatch.setattr(torchmetrics.Metric, "sync", sync)
    evaluate_backbone(
        None, experts["task_vectors"][:1], experts["datamodules"], "validation", EVAL_TRAINER, with_task_vector=True
    )
    assert synced == []


def test_evaluation_skips_lightnings_prepare_data_barrier(experts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning wraps prepare_data in a barrier of all ranks; shared-out evaluations must never enter it (setup
    loads the data), and the datamodule keeps its own prepare_data afterwards."""
    from lightning.pytorch.trainer.connectors import data_connector
    from lightning.pytorch.utilities.model_helpers import is_overridden

    entered: list[int] = []

    class Barrier:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(data_connector, "_InfiniteBarrier", Barrier)
    dms = list(experts["datamodules"].values())
    assert all(is_overridden("prepare_data", dm) for dm in dms)
    evaluate_backbone(
        None, experts["task_vectors"], experts["datamodules"], "validation", EVAL_TRAINER, with_task_vector=True
    )
    assert entered == []
    assert all(is_overridden("prepare_data", dm) and "prepare_data" not in vars(dm) for dm in dms)


def test_extend_grid_steps_at_the_edge_spacing_and_stays_positive() -> None:
    from drm_lightning.evaluation.lambda_search import extend_grid

    assert extend_grid([0.5, 1.0, 1.5], upward=True) == [2.0, 2.5]
    assert extend_grid([0.2, 0.4, 0.6], upward=False) == [0.05, 0.1]  # 0.2 - 0.2 = 0: halve instead
    assert extend_grid([1.0, 2.0, 3.0], upward=False) == [0.25, 0.5]
    assert extend_grid([1.0], upward=True) == [1.5, 2.0]


@pytest.mark.parametrize("strategy", ["grid", "refine"])
def test_best_lambda_at_an_edge_extends_the_grid(strategy: str) -> None:
    """A peak at 2.2 beyond a grid ending at 1.5: two rounds reach it, each said in the notes; no λ twice."""
    evaluate = FakeEvaluate(2.2)
    result = search_lambda(evaluate, EXPERT, [0.5, 1.0, 1.5], strategy=strategy, extend=2)
    assert result.best_lambda == 2.0
    assert len(result.notes) >= 1 and "top of the grid" in result.notes[0]
    lams = [p.lam for p in result.curve]
    assert len(lams) == len(set(lams)) == result.evaluations
    bounded = search_lambda(FakeEvaluate(9.0), EXPERT, [0.5, 1.0, 1.5], strategy=strategy, extend=1)
    assert bounded.best_lambda == 2.5 and len(bounded.notes) == 1  # one round only
    inside = search_lambda(FakeEvaluate(1.0), EXPERT, [0.5, 1.0, 1.5], strategy=strategy, extend=3)
    assert inside.best_lambda == 1.0 and inside.notes == [] and inside.evaluations <= 3
    with pytest.raises(ValueError, match="extend=-1"):
        search_lambda(evaluate, EXPERT, [0.5], extend=-1)
