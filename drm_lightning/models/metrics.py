"""The metrics an expert logs: their names and the torchmetrics collections of its validation and test steps."""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics import Accuracy, F1Score, MatthewsCorrCoef, Metric, MetricCollection

METRICS = ("accuracy", "mcc", "f1")


def check_metrics(metrics: Sequence[str]) -> None:
    """Raise unless ``metrics`` is a non-empty list drawn from ``METRICS``."""
    if isinstance(metrics, str) or not metrics or any(m not in METRICS for m in metrics):
        raise ValueError(f"metrics={metrics!r}: expected a non-empty list drawn from {METRICS}")


def metric(name: str, num_classes: int) -> Metric:
    """One multiclass metric (F1 is macro-averaged)."""
    if name == "accuracy":
        return Accuracy(task="multiclass", num_classes=num_classes)
    if name == "mcc":
        return MatthewsCorrCoef(task="multiclass", num_classes=num_classes)
    return F1Score(task="multiclass", num_classes=num_classes, average="macro")


def metric_collection(names: Sequence[str], num_classes: int, prefix: str) -> MetricCollection:
    """The metrics ``names`` logged as ``<prefix><name>`` (e.g. ``val/<task>/accuracy``)."""
    return MetricCollection({name: metric(name, num_classes) for name in names}, prefix=prefix)
