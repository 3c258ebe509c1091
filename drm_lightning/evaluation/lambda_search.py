"""Choose the scaling coefficient λ of a merged model on validation data only.

The merged weight is ``W_0 + λ·Δ_merged`` (docs/methods.md); Δ_merged is computed once per method and each λ only
rescales it (``apply_merged_delta(merged, lam)`` in memory). λ is chosen by the **average normalised accuracy**:
for each task the merged model's validation accuracy divided by the expert's, averaged over tasks, so every task
counts the same whatever its difficulty. Test splits are never looked at here.

Two strategies:

``grid``
    Evaluate every λ of the grid. Default grids per method (``default_grid``): 0.1–1.0 step 0.1 for Task Arithmetic,
    TIES and DARE, whose Δ is a (trimmed) sum of deltas; 0.1–3.0 step 0.1 for the SVD methods (DRM, Iso-C, Iso-CTS,
    TSV-M), whose renormalised or isotropic Δ often wants λ > 1.

``refine``
    Fewer evaluations on the same grid: evaluate every k-th λ (k ≈ √n, plus the last one), then run a discrete
    golden-section search over the grid points between the best coarse λ's two coarse neighbours. About
    ``√n + log₁.₆₂(2√n)`` evaluations instead of n: 8–10 instead of 30 on the SVD grid, 4–7 instead of 10 on the
    Task Arithmetic grid (measured on smooth curves in ``tests/evaluation/test_evaluation.py``). It returns the grid's
    best λ whenever the curve is unimodal within that bracket; validation curves usually are, but noise can trap it on a
    local bump, so ``grid`` stays the exhaustive choice. Ties go to the smaller λ in both strategies.

An edge never decides silently: with ``extend=k`` a best λ at the first or last point of the grid adds
``EXTEND_POINTS`` λ beyond it (at the edge's spacing; downward never to 0) and searches again, at most ``k``
rounds, each said in the result's ``notes`` (and so in the report).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info

from drm_lightning.evaluation.results import LambdaPoint, TaskMetrics, average_normalised

if TYPE_CHECKING:
    from drm_lightning.evaluation.merged import MergedBackbone

Strategy = Literal["grid", "refine"]
STRATEGIES: tuple[str, ...] = ("grid", "refine")

_GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.382: the golden-section probe fraction


def make_grid(start: float, stop: float, step: float) -> list[float]:
    """``start, start+step, …, stop`` (inclusive), rounded so 0.1-steps give 0.3 and not 0.30000000000000004."""
    if not step > 0:
        raise ValueError(f"step={step!r}: must be > 0")
    if not 0 < start <= stop:
        raise ValueError(f"start={start!r}, stop={stop!r}: need 0 < start <= stop")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


ELEMENTWISE_GRID: tuple[float, ...] = tuple(make_grid(0.1, 1.0, 0.1))
SVD_GRID: tuple[float, ...] = tuple(make_grid(0.1, 3.0, 0.1))

# Method name (as in the merging registry, or a label that starts with it) -> its default λ grid.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "task_arithmetic": ELEMENTWISE_GRID,
    "ta": ELEMENTWISE_GRID,
    "ties": ELEMENTWISE_GRID,
    "dare": ELEMENTWISE_GRID,
    "drm": SVD_GRID,
    "iso_c": SVD_GRID,
    "iso_cts": SVD_GRID,
    "tsv_m": SVD_GRID,
    "tsv": SVD_GRID,
}


def default_grid(method: str) -> list[float]:
    """The default λ grid of a merge method; ``drm_v``, ``DRM-H``, ``dare_ties`` … resolve by their longest prefix.

    A registered method that no name above matches (a new method module) gets the grid of its kind: the SVD grid for
    ``matrix_only`` methods, the elementwise grid otherwise.
    """
    key = method.strip().lower().replace("-", "_")
    matches = [name for name in DEFAULT_GRIDS if key == name or key.startswith(name + "_")]
    if not matches:
        from drm_lightning.merging.methods.registry import (
            METHODS,  # lazy: the registry imports every method (and torch)
        )

        if key in METHODS:
            return list(SVD_GRID if METHODS[key].matrix_only else ELEMENTWISE_GRID)
        raise ValueError(f"method={method!r}: no default λ grid; known methods: {sorted(DEFAULT_GRIDS)}")
    return list(DEFAULT_GRIDS[max(matches, key=len)])


@dataclass
class LambdaSearchResult:
    """The chosen λ, its score and metrics, and every evaluated point in evaluation order."""

    best_lambda: float
    best_score: float
    best_metrics: TaskMetrics
    curve: list[LambdaPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.curve)

    def sorted_curve(self) -> list[LambdaPoint]:
        """The curve by increasing λ (what a plot wants)."""
        return sorted(self.curve, key=lambda p: p.lam)


def _check_grid(grid: Sequence[float]) -> list[float]:
    values = sorted(float(x) for x in grid)
    if not values:
        raise ValueError("grid: empty; give at least one λ")
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise ValueError(f"grid: non-finite λ {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"grid: repeated λ in {values}")
    return values


EXTEND_POINTS = 2
"""λ values one extension round adds beyond the edge of the grid."""


def extend_grid(values: Sequence[float], upward: bool, points: int = EXTEND_POINTS) -> list[float]:
    """``points`` new λ beyond the top (``upward``) or bottom of a sorted grid, at the grid's spacing at that edge.

    Downward, λ stays positive: a step that would reach 0 halves the smallest λ instead. A one-point grid steps by
    half its value.
    """
    values = sorted(values)
    if upward:
        step = values[-1] - values[-2] if len(values) > 1 else values[-1] / 2
        return [round(values[-1] + (i + 1) * step, 10) for i in range(points)]
    step = values[1] - values[0] if len(values) > 1 else values[0] / 2
    out, low = [], values[0]
    for _ in range(points):
        low = round(low - step, 10) if low - step > 1e-9 * max(1.0, abs(low)) else round(low / 2, 10)
        out.append(low)
    return sorted(out)


def search_lambda(
    evaluate: Callable[[float], Mapping[str, Mapping[str, float]]],
    expert_metrics: Mapping[str, Mapping[str, float]],
    grid: Sequence[float],
    strategy: Strategy = "grid",
    metric: str = "accuracy",
    coarse_stride: int | None = None,
    extend: int = 0,
) -> LambdaSearchResult:
    """Find the λ of ``grid`` with the best average normalised ``metric``.

    Args:
        evaluate: λ -> ``{task: {metric: value}}`` on validation data; called at most once per λ.
        expert_metrics: the experts' validation metrics, the normalisation reference (its tasks are the ones
            averaged over).
        grid: the candidate λ values (any order; searched in increasing order).
        strategy: ``grid`` (every λ) or ``refine`` (coarse grid, then golden-section inside the best bracket).
        metric: the metric to normalise and average.
        coarse_stride: ``refine`` only: evaluate every k-th grid point first (default ⌈√n⌉, at least 2).
        extend: rounds of edge extension: while the best λ is the first or last of the (extended) grid of a grid
            with several values, add ``EXTEND_POINTS`` λ beyond that edge (``extend_grid``) and search again; each
            round is said in ``notes``. Evaluations are never repeated.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if isinstance(extend, bool) or not isinstance(extend, int) or extend < 0:
        raise ValueError(f"extend={extend!r}: expected a number of rounds >= 0")
    values = _check_grid(grid)
    memo: dict[float, Mapping[str, Mapping[str, float]]] = {}

    def cached(lam: float) -> Mapping[str, Mapping[str, float]]:
        if lam not in memo:
            memo[lam] = evaluate(lam)
        return memo[lam]

    curve: list[LambdaPoint] = []
    notes: list[str] = []
    for round_ in range(extend + 1):
        result = _search_once(cached, expert_metrics, values, strategy, metric, coarse_stride)
        seen = {p.lam for p in curve}
        curve += [p for p in result.curve if p.lam not in seen]
        at_top, at_bottom = result.best_lambda == values[-1], result.best_lambda == values[0]
        if round_ == extend or len(values) < 2 or not (at_top or at_bottom):
            break
        added = extend_grid(values, upward=at_top)
        notes.append(
            f"best λ {result.best_lambda:g} at the {'top' if at_top else 'bottom'} of the grid: extended it with "
            f"{', '.join(f'{x:g}' for x in added)}"
        )
        values = sorted({*values, *added})
    return LambdaSearchResult(result.best_lambda, result.best_score, result.best_metrics, curve, notes)


def _search_once(
    evaluate: Callable[[float], Mapping[str, Mapping[str, float]]],
    expert_metrics: Mapping[str, Mapping[str, float]],
    values: list[float],
    strategy: Strategy,
    metric: str,
    coarse_stride: int | None,
) -> LambdaSearchResult:
    """One search over a checked, sorted grid (see ``search_lambda``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    tasks = list(expert_metrics)
    curve: list[LambdaPoint] = []
    scores: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in scores:
            lam = values[i]
            metrics = {t: dict(m) for t, m in evaluate(lam).items()}
            point = LambdaPoint(lam, average_normalised(metrics, expert_metrics, metric, tasks), metrics)
            curve.append(point)
            scores[i] = point.score
            rank_zero_info(f"λ={lam:g}: average normalised {metric} {point.score:.4f}")
        return scores[i]

    n = len(values)
    if strategy == "grid" or n <= 3:
        for i in range(n):
            score(i)
    else:
        stride = coarse_stride if coarse_stride is not None else max(2, math.ceil(math.sqrt(n)))
        if stride < 1:
            raise ValueError(f"coarse_stride={coarse_stride!r}: must be >= 1")
        coarse = sorted(set(range(0, n, stride)) | {n - 1})
        best = _best_index(coarse, score)
        k = coarse.index(best)
        lo = coarse[k - 1] if k > 0 else best
        hi = coarse[k + 1] if k + 1 < len(coarse) else best
        _golden_section(lo, best, hi, score)

    i = _best_index(sorted(scores), score)
    point = next(p for p in curve if p.lam == values[i])
    return LambdaSearchResult(best_lambda=point.lam, best_score=point.score, best_metrics=point.metrics, curve=curve)


def _best_index(indices: Sequence[int], score: Callable[[int], float]) -> int:
    """The index with the highest score; ties (and NaN scores, which never win) go to the smaller λ."""
    best = indices[0]
    for i in indices[1:]:
        s, b = score(i), score(best)
        if s > b or (math.isnan(b) and not math.isnan(s)):
            best = i
    return best


def _golden_section(lo: int, c: int, hi: int, score: Callable[[int], float]) -> None:
    """Discrete golden-section search for the maximum on grid indices ``lo..hi`` given the best point ``c``.

    Invariant: ``lo <= c <= hi`` and ``c`` has the best score seen inside; each step probes the longer side at the
    golden fraction and shrinks the bracket, until every neighbour of ``c`` inside it has been evaluated.
    """
    while True:
        left, right = c - lo, hi - c
        if max(left, right) <= 1:
            if left == 1:
                score(lo)
            if right == 1:
                score(hi)
            return
        if right >= left:
            x = c + max(1, round(_GOLDEN * right))
            if score(x) > score(c):
                lo, c = c, x
            else:
                hi = x
        else:
            x = c - max(1, round(_GOLDEN * left))
            if score(x) > score(c):
                hi, c = c, x
            else:
                lo = x


def search_merged_lambda(
    merged: str | os.PathLike[str] | MergedBackbone,
    task_vectors: Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    expert_metrics: Mapping[str, Mapping[str, float]] | None = None,
    grid: Sequence[float] | None = None,
    strategy: Strategy = "grid",
    metric: str = "accuracy",
    method: str | None = None,
    trainer_kwargs: dict | None = None,
    extend: int = 0,
) -> LambdaSearchResult:
    """λ search for one merged folder (written by ``merge_task_vectors``) on the tasks' validation splits.

    Args:
        merged: the merged folder (or a ``MergedBackbone`` of it); Δ_merged is only rescaled per λ.
        task_vectors: the experts' task vector folders (their heads go on the merged backbone).
        datamodules: task name -> its datamodule.
        expert_metrics: the experts' validation metrics; evaluated here (base + own task vector) when ``None``.
        grid: candidate λ values; the method's ``default_grid`` when ``None``.
        strategy: ``grid`` or ``refine`` (see the module docstring).
        metric: the metric to normalise and average.
        method: the method name for the default grid; read from the folder's ``merge.json`` when ``None``.
        trainer_kwargs: extra ``Trainer`` arguments for every evaluation.
        extend: rounds of λ grid extension at an edge (``search_lambda``).
    """
    from drm_lightning.evaluation.merged import MergedBackbone
    from drm_lightning.evaluation.multitask import evaluate_backbone
    from drm_lightning.merging.engine.record import read_merge_record

    backbone = merged if isinstance(merged, MergedBackbone) else None
    folder = backbone.merged if backbone is not None else Path(merged)
    if grid is None:
        grid = default_grid(method or read_merge_record(folder)["method"])
    _check_grid(grid)
    if expert_metrics is None:
        expert_metrics = evaluate_backbone(
            None, task_vectors, datamodules, "validation", trainer_kwargs, with_task_vector=True
        )
    if backbone is None:
        backbone = MergedBackbone(folder)

    def evaluate(lam: float) -> TaskMetrics:
        return evaluate_backbone(backbone.at(lam), task_vectors, datamodules, "validation", trainer_kwargs)

    return search_lambda(evaluate, expert_metrics, grid, strategy=strategy, metric=metric, extend=extend)
