"""The four offline demo tasks under ``data/demo`` (built by ``data/build_demo.py``; origins in its SOURCES.md).

Why a module for them: the quickstart, the end-to-end test and the benchmarks all need the same tasks with the
same label names, and label names must stay distinct across tasks. The csv files live in the repository (not in
the wheel); configs name them relative to the repository root, so run commands from there, or pass ``root``
(or set ``DRM_LIGHTNING_DEMO_DATA``) to point elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drm_lightning.data.checks import DataError
from drm_lightning.data.text import TextClassificationDataModule

DEMO_DATA_ENV = "DRM_LIGHTNING_DEMO_DATA"
SPLIT_FILES: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class DemoTask:
    """A demo task's name, its label names in head order, and what it is."""

    name: str
    label_names: tuple[str, ...]
    description: str


DEMO_TASKS: dict[str, DemoTask] = {
    task.name: task
    for task in (
        DemoTask("rotten_tomatoes", ("rotten", "fresh"), "movie review snippet: fresh or rotten"),
        DemoTask("fine_food", ("other", "great"), "Amazon fine-food review: rated great or other"),
        DemoTask("tweet_device", ("android", "iphone", "web_client"), "which client posted a tweet"),
        DemoTask("quote_topic", ("computers", "politics", "science", "work"), "topic of a fortune-cookie quote"),
    )
}


def demo_root(root: str | Path | None = None) -> Path:
    """The folder holding ``<task>/{train,validation,test}.csv``: ``root``, else $DRM_LIGHTNING_DEMO_DATA, else the
    checkout's ``data/demo``."""
    if root is None:
        root = os.environ.get(DEMO_DATA_ENV) or Path(__file__).resolve().parents[2] / "data" / "demo"
    return Path(root)


def demo_data_files(name: str, root: str | Path | None = None) -> dict[str, str]:
    """Split name -> csv path of demo task ``name``; raises if the task is unknown or a file is missing."""
    if name not in DEMO_TASKS:
        raise DataError(f"demo task {name!r} unknown; demo tasks: {sorted(DEMO_TASKS)}")
    folder = demo_root(root) / name
    files = {split: str(folder / f"{split}.csv") for split in SPLIT_FILES}
    missing = [path for path in files.values() if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"demo task {name!r}: missing {missing}; run from a repository checkout, set {DEMO_DATA_ENV}, "
            "or rebuild with python data/build_demo.py"
        )
    return files


def demo_task(name: str, tokenizer: str, root: str | Path | None = None, **kwargs: Any) -> TextClassificationDataModule:
    """A ``TextClassificationDataModule`` for demo task ``name``; ``kwargs`` go to its ``__init__``."""
    files = demo_data_files(name, root)
    return TextClassificationDataModule(
        task=name, tokenizer=tokenizer, label_names=list(DEMO_TASKS[name].label_names), data_files=files, **kwargs
    )
