"""The results of one evaluation run, as plain data: what the report, the plots and ``report.json`` are made of.

Why a module of its own: the evaluation (which needs Lightning and models) produces these objects, while the
report and the plots only consume them. Keeping them plain dataclasses that round-trip through JSON makes the
report a pure function of data, easy to test and to rebuild from a saved ``report.json``.

Metrics are nested ``{task: {metric: value}}`` mappings, the shape ``evaluate_backbone`` returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TaskMetrics = dict[str, dict[str, float]]
"""``{task: {metric: value}}``."""


class ResultsError(ValueError):
    """Results that cannot be reported; the message names the key and the offending value."""


def _check_metrics(metrics: Mapping[str, Mapping[str, Any]], where: str) -> TaskMetrics:
    """Copy a ``{task: {metric: value}}`` mapping into plain floats, rejecting anything else by name."""
    if not isinstance(metrics, Mapping):
        raise ResultsError(f"{where}: expected a mapping task -> {{metric: value}}, got {type(metrics).__name__}")
    out: TaskMetrics = {}
    for task, values in metrics.items():
        if not isinstance(values, Mapping):
            raise ResultsError(f"{where}[{task!r}]: expected a mapping metric -> value, got {values!r}")
        row: dict[str, float] = {}
        for name, value in values.items():
            if value is None:  # how report.json stores a non-finite number (JSON has no NaN)
                value = math.nan
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ResultsError(f"{where}[{task!r}][{name!r}]: expected a number, got {value!r}")
            row[str(name)] = float(value)
        out[str(task)] = row
    return out


@dataclass
class LambdaPoint:
    """One evaluated λ: its score (average normalised metric over tasks) and the per-task metrics behind it."""

    lam: float
    score: float
    metrics: TaskMetrics = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "score": self.score, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "curve") -> LambdaPoint:
        for key in ("lambda", "score"):
            if key not in data:
                raise ResultsError(f"{where}: missing key {key!r} in {dict(data)!r}")
        return cls(
            lam=float(data["lambda"]),
            score=math.nan if data["score"] is None else float(data["score"]),
            metrics=_check_metrics(data.get("metrics", {}), f"{where}.metrics"),
        )


@dataclass
class VariantResult:
    """One parameter set of a search over a method's own parameters, with its λ chosen on validation.

    ``values`` are the searched parameters' values (``{"drop_rate": 0.5}``); ``score`` is the validation average
    normalised metric at ``lam``; ``curve`` its λ search (one point when λ was given); ``notes`` say how its λ grid
    was extended at an edge.
    """

    name: str
    values: dict[str, Any]
    lam: float | None
    score: float | None
    curve: list[LambdaPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    merge_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "values": self.values,
            "lambda": self.lam,
            "score": self.score,
            "curve": [point.to_dict() for point in self.curve],
            "notes": list(self.notes),
            "merge_seconds": self.merge_seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "variants") -> VariantResult:
        if "name" not in data or "values" not in data:
            raise ResultsError(f"{where}: needs 'name' and 'values', got keys {sorted(data)}")
        lam, score, seconds = data.get("lambda"), data.get("score"), data.get("merge_seconds")
        return cls(
            name=str(data["name"]),
            values=dict(data["values"]),
            lam=None if lam is None else float(lam),
            score=None if score is None else float(score),
            curve=[LambdaPoint.from_dict(p, f"{where}.curve") for p in data.get("curve", [])],
            notes=[str(n) for n in data.get("notes", [])],
            merge_seconds=None if seconds is None else float(seconds),
        )


@dataclass
class MethodResult:
    """One merged model: its label (e.g. ``drm_v``), the λ used, the merge time and the per-task metrics.

    ``curve`` holds the λ search, in the order λ was evaluated; empty when λ was given. With a search over the
    method's own parameters, ``variants`` holds every parameter set tried (the chosen one's ``params``, ``lam`` and
    ``curve`` are the method's) and ``notes`` what the search extended at an edge. ``learned``: when coefficients
    were learned on top of the chosen λ (``evaluation/learn.py``), what was learned, on which data, the validation
    score before and after, and the learned folder; ``metrics`` are then the learned model's.
    """

    label: str
    metrics: TaskMetrics
    lam: float | None = None
    merge_seconds: float | None = None
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    curve: list[LambdaPoint] = field(default_factory=list)
    variants: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    learned: dict[str, Any] = field(default_factory=dict)

    def chosen(self) -> VariantResult | None:
        """The variant the search chose: its values are in ``params`` and its λ is ``lam`` (``None`` without a
        parameter search)."""
        for v in self.variants:
            if v.lam == self.lam and all(self.params.get(k) == value for k, value in v.values.items()):
                return v
        return None

    @property
    def evaluations(self) -> int:
        """Validation runs of the whole search (every λ of every parameter set)."""
        return sum(len(v.curve) for v in self.variants) if self.variants else len(self.curve)

    def __post_init__(self) -> None:
        if not self.label:
            raise ResultsError("methods[].label: must be a non-empty string")
        self.metrics = _check_metrics(self.metrics, f"methods[{self.label!r}].metrics")

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "params": self.params,
            "lambda": self.lam,
            "merge_seconds": self.merge_seconds,
            "metrics": self.metrics,
            "curve": [point.to_dict() for point in self.curve],
            "variants": [v.to_dict() for v in self.variants],
            "notes": list(self.notes),
            "evaluations": self.evaluations,
            "learned": dict(self.learned),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodResult:
        if "label" not in data or "metrics" not in data:
            raise ResultsError(f"methods[]: needs 'label' and 'metrics', got keys {sorted(data)}")
        label = str(data["label"])
        lam = data.get("lambda")
        seconds = data.get("merge_seconds")
        return cls(
            label=label,
            metrics=data["metrics"],
            lam=None if lam is None else float(lam),
            merge_seconds=None if seconds is None else float(seconds),
            method=data.get("method"),
            params=dict(data.get("params") or {}),
            curve=[LambdaPoint.from_dict(p, f"methods[{label!r}].curve") for p in data.get("curve", [])],
            variants=[VariantResult.from_dict(v, f"methods[{label!r}].variants") for v in data.get("variants", [])],
            notes=[str(n) for n in data.get("notes", [])],
            learned=dict(data.get("learned") or {}),
        )


@dataclass
class EvaluationResults:
    """Everything one report shows.

    Attributes:
        tasks: task names, in report order.
        expert: each task's expert (base + its own task vector + its head) on its own task; the reference that
            normalised numbers divide by.
        methods: one entry per merged model.
        pretrained: the pretrained backbone under each task's expert head; tasks without a usable head are absent.
        metric: the metric the tables and the λ search use (``accuracy`` unless told).
        split: the split the numbers come from (``validation`` or ``test``).
    """

    tasks: list[str]
    expert: TaskMetrics
    methods: list[MethodResult] = field(default_factory=list)
    pretrained: TaskMetrics = field(default_factory=dict)
    metric: str = "accuracy"
    split: str = "validation"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ResultsError("tasks: must name at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ResultsError(f"tasks: duplicate names in {self.tasks}")
        self.expert = _check_metrics(self.expert, "expert")
        self.pretrained = _check_metrics(self.pretrained, "pretrained")
        missing = [t for t in self.tasks if self.metric not in self.expert.get(t, {})]
        if missing:
            raise ResultsError(f"expert: no {self.metric!r} for task(s) {missing}")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ResultsError(f"methods: duplicate labels in {labels}")
        for m in self.methods:
            missing = [t for t in self.tasks if self.metric not in m.metrics.get(t, {})]
            if missing:
                raise ResultsError(f"methods[{m.label!r}].metrics: no {self.metric!r} for task(s) {missing}")

    def value(self, source: str, task: str) -> float | None:
        """The report metric of ``task`` under ``source`` (``pretrained``, ``expert`` or a method label)."""
        if source == "pretrained":
            table = self.pretrained
        elif source == "expert":
            table = self.expert
        else:
            table = self.method(source).metrics
        return table.get(task, {}).get(self.metric)

    def method(self, label: str) -> MethodResult:
        for m in self.methods:
            if m.label == label:
                return m
        raise ResultsError(f"method label {label!r}: not among {[m.label for m in self.methods]}")

    def normalised(self, source: str, task: str) -> float | None:
        """``source`` ÷ expert on ``task``: how much of the expert's performance survives the merge."""
        value = self.value(source, task)
        if value is None:
            return None
        return normalise(value, self.expert[task][self.metric], task)

    def average(self, source: str, normalised: bool = False) -> float | None:
        """Mean over all tasks; ``None`` when any task lacks a value (a partial mean would mislead)."""
        values = [self.normalised(source, t) if normalised else self.value(source, t) for t in self.tasks]
        if any(v is None for v in values):
            return None
        return math.fsum(values) / len(values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "metric": self.metric,
            "split": self.split,
            "pretrained": self.pretrained,
            "expert": self.expert,
            "methods": [m.to_dict() for m in self.methods],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResults:
        """Rebuild from ``to_dict()`` output (also the ``results`` section of ``report.json``)."""
        for key in ("tasks", "expert"):
            if key not in data:
                raise ResultsError(f"results: missing key {key!r} (have {sorted(data)})")
        return cls(
            tasks=[str(t) for t in data["tasks"]],
            expert=data["expert"],
            methods=[MethodResult.from_dict(m) for m in data.get("methods", [])],
            pretrained=data.get("pretrained", {}),
            metric=str(data.get("metric", "accuracy")),
            split=str(data.get("split", "validation")),
        )


def normalise(value: float, reference: float, task: str = "?") -> float:
    """``value / reference``; a non-positive reference (an expert at 0 accuracy) has no meaningful ratio."""
    if not reference > 0:
        raise ResultsError(f"expert metric of task {task!r} is {reference!r}: cannot normalise by it (must be > 0)")
    return value / reference


def average_normalised(
    metrics: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    metric: str = "accuracy",
    tasks: Sequence[str] | None = None,
) -> float:
    """Mean over tasks of ``metrics[t][metric] / reference[t][metric]``: the λ search's objective.

    Why the mean of ratios (not the ratio of means): every task then counts the same, whatever its difficulty.
    """
    tasks = list(reference) if tasks is None else list(tasks)
    if not tasks:
        raise ResultsError("average_normalised: no tasks")
    ratios = []
    for task in tasks:
        if metric not in metrics.get(task, {}):
            raise ResultsError(f"metrics[{task!r}]: no {metric!r} (have {sorted(metrics.get(task, {}))})")
        if metric not in reference.get(task, {}):
            raise ResultsError(f"expert metrics[{task!r}]: no {metric!r} (have {sorted(reference.get(task, {}))})")
        ratios.append(normalise(metrics[task][metric], reference[task][metric], task))
    return math.fsum(ratios) / len(ratios)
