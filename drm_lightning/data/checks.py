"""The checks a task's settings and loaded splits must pass, and ``DataError``, the one error they raise.

Why one place: every message names the task, split, column, file or value at fault in the same words, whether the
text, multiple-choice or image datamodule (or the loading in ``sources.py``) found it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SUPPORTED_METRICS: tuple[str, ...] = ("accuracy", "f1", "mcc")
"""Metric names a task may ask its model to report."""

_SHOWN = 5  # how many offending values an error message quotes


class DataError(ValueError):
    """Bad task data or settings; the message names the task, split, column, file or value at fault."""


def check_label_names(task: str, label_names: Sequence[str]) -> None:
    """Raise unless ``label_names`` holds at least two names, all distinct (a head needs two outputs)."""
    if len(label_names) < 2 or len(set(label_names)) != len(label_names):
        raise DataError(f"task {task!r}: label_names must hold at least two distinct names, got {list(label_names)}")


def check_text_source(task: str, dataset: str | None, data_files: Mapping[str, str] | None, max_length: int) -> None:
    """A text task's checks: exactly one of a hub ``dataset`` or local ``data_files``, room for two tokens."""
    if (dataset is None) == (data_files is None):
        raise DataError(f"task {task!r}: give exactly one of dataset (hub id) or data_files (local files)")
    if max_length < 2:
        raise DataError(f"task {task!r}: max_length must be >= 2, got {max_length}")


def label_mapping(label_names: Sequence[str], feature: Any) -> dict[Any, int]:
    """How a split's raw label values map to indices into ``label_names``.

    Strings map by name. A ``ClassLabel`` column maps by its class names when they all appear in ``label_names``
    (so an imagefolder's alphabetical folder order cannot scramble labels), by ``int(name)`` when its names are
    numbers, and otherwise its integer values index ``label_names`` directly (a hub dataset whose labels the
    config renames). Plain integers index ``label_names``.
    """
    from datasets import ClassLabel

    by_name = {name: i for i, name in enumerate(label_names)}
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        if all(name in by_name for name in names):
            return {i: by_name[name] for i, name in enumerate(names)}
        if all(name.isdecimal() for name in names):
            return {i: int(name) for i, name in enumerate(names) if int(name) < len(label_names)}
        return {i: i for i in range(min(len(names), len(label_names)))}
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return by_name
    return {i: i for i in range(len(label_names))}


def check_labels(task: str, split: str, dataset: Any, label_column: str, mapping: Mapping[Any, int]) -> None:
    """Raise if any label value in ``dataset`` has no index (unknown name, out-of-range integer, missing)."""
    bad = [value for value in dataset.unique(label_column) if value is None or value not in mapping]
    if bad:
        shown = ", ".join(repr(v) for v in sorted(bad, key=repr)[:_SHOWN])
        more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
        known = sorted(mapping, key=repr)
        raise DataError(
            f"task {task!r}: split {split!r} column {label_column!r} has labels outside the label set "
            f"{known if len(known) <= 20 else f'of {len(known)}'}: {shown}{more}"
        )


def check_columns(task: str, split: str, dataset: Any, columns: Sequence[str]) -> None:
    """Raise if a needed column is absent (naming the available ones) or holds missing values."""
    available = list(dataset.column_names)
    for column in columns:
        if column not in available:
            raise DataError(f"task {task!r}: split {split!r} has no column {column!r}; available: {available}")
        nulls = dataset.data.column(column).null_count
        if nulls:
            raise DataError(f"task {task!r}: split {split!r} column {column!r} has {nulls} missing value(s)")
