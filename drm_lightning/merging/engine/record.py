"""The merge record: ``merge.json`` (what was merged, how, against which base) and the ``heads/<task>/`` copies.

Why apart from the merge loop: the single-process and the distributed merge write it, ``save_merged_model``
extends it with λ, and the evaluator and the ``merge``/``pipeline`` commands read it to label and reuse merges.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from drm_lightning.io.json_file import read_json_object
from drm_lightning.io.task_vector import HEAD_FILE, META_FILE, library_versions
from drm_lightning.merging.engine.reader import TaskVectorReader

MERGE_FILE = "merge.json"
HEADS_DIR = "heads"
MERGE_FORMAT_VERSION = 1


def read_merge_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``merge.json`` of a merged (or applied) folder."""
    path = Path(folder) / MERGE_FILE
    data = read_json_object(path, hint=f"is {folder} a folder written by merge_task_vectors?")
    missing = [k for k in ("method", "base_model", "base_fingerprint", "family") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return data


def copy_heads(readers: Sequence[TaskVectorReader], folder: str | os.PathLike[str]) -> None:
    """Copy each task's ``head.safetensors`` and ``meta.json`` to ``folder/heads/<task>/``."""
    for reader in readers:
        dest = Path(folder) / HEADS_DIR / reader.task
        dest.mkdir(parents=True, exist_ok=True)
        for name in (HEAD_FILE, META_FILE):
            shutil.copyfile(reader.folder / name, dest / name)


def write_merge_record(
    folder: str | os.PathLike[str],
    merge: Mapping[str, Any],
    timings: Mapping[str, float],
    merged_parameters: int,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``merge.json``: what was merged, how, from what, against which base (``merge``: the setup's
    ``MergeSetup.record()``), how long it took."""
    record: dict[str, Any] = {
        "format_version": MERGE_FORMAT_VERSION,
        **merge,
        "merged_parameters": merged_parameters,
        "timings": {k: round(float(v), 6) for k, v in timings.items()},
        "versions": library_versions(),
        **extra,
    }
    (Path(folder) / MERGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record


def merge_record(merge: Mapping[str, Any], timings: Mapping[str, float], merged_parameters: int) -> dict[str, Any]:
    """What ``write_merge_record`` writes, without writing it (a merge straight into a model folder extends it)."""
    return {
        "format_version": MERGE_FORMAT_VERSION,
        **merge,
        "merged_parameters": merged_parameters,
        "timings": {k: round(float(v), 6) for k, v in timings.items()},
        "versions": library_versions(),
    }
