"""Evaluation: the λ search on synthetic objectives, and multi-task validation of tiny real models."""

from __future__ import annotations

import math

import pytest

from drm_lightning.evaluation.lambda_search import (
    ELEMENTWISE_GRID,
    SVD_GRID,
    default_grid,
    make_grid,
    search_lambda,
)

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
