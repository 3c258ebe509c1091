"""Loading a task's splits, from local csv/json/parquet files or a hub dataset, with failures as one ``DataError``.

Why wrap ``datasets.load_dataset``: it raises many types (``ValueError``, ``FileNotFoundError``, pyarrow, pandas...)
that name neither the task nor which of its files is at fault; here a missing file, an unknown extension, mixed
formats or an empty split is reported before or while loading, naming the task, the source and the split.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drm_lightning.data.checks import DataError

FILE_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File extension -> ``datasets`` builder for ``data_files``."""

_NO_DATA = re.compile(r'Instruction "([^"]+)" corresponds to no data')


def builder_for(data_files: Mapping[str, str]) -> str:
    """The ``datasets`` builder (csv/json/parquet) for local files, checking that they exist and agree on format."""
    if not data_files:
        raise DataError("data_files: empty mapping; give at least {'train': <path>}")
    formats: dict[str, str] = {}
    for split, path in data_files.items():
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_FORMATS:
            raise DataError(
                f"data_files[{split!r}] = {path!r}: unknown format; extensions understood: {sorted(FILE_FORMATS)}"
            )
        matches = glob.glob(path) if glob.has_magic(path) else [path] if Path(path).is_file() else []
        if not matches:
            raise DataError(f"data_files[{split!r}]: file not found: {path!r} (relative paths are from {Path.cwd()})")
        formats[split] = FILE_FORMATS[suffix]
    if len(set(formats.values())) > 1:
        raise DataError(f"data_files: all splits must share one format, got {formats}")
    return next(iter(formats.values()))


def load_dataset_checked(task: str, source: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` whose failures become one ``DataError`` naming the task, the source and the split."""
    from datasets import DatasetDict, load_dataset

    try:
        loaded = load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types (ValueError, FileNotFoundError, pyarrow, pandas...)
        empty = _NO_DATA.search(str(err))
        if empty:
            raise DataError(f"task {task!r}: split {empty.group(1)!r} of {source} is empty") from err
        raise DataError(f"task {task!r}: cannot load {source}: {type(err).__name__}: {err}") from err
    if not isinstance(loaded, DatasetDict):
        raise DataError(f"task {task!r}: {source} did not load as named splits (got {type(loaded).__name__})")
    return loaded


def load_hub_dataset(task: str, dataset: str, dataset_config: str | None, cache_dir: str | None, **kwargs: Any) -> Any:
    """Load a hub (or local dataset-folder) ``dataset``; errors name the task and the dataset.

    ``kwargs`` go to ``load_dataset`` (e.g. ``data_dir`` for datasets whose files are downloaded by hand)."""
    source = f"dataset {dataset!r}" + (f" ({dataset_config})" if dataset_config else "")
    return load_dataset_checked(task, source, dataset, dataset_config, cache_dir=cache_dir, **kwargs)


def load_files_or_hub(
    task: str,
    data_files: Mapping[str, str] | None,
    dataset: str | None,
    dataset_config: str | None,
    cache_dir: str | None,
    **kwargs: Any,
) -> Any:
    """Local csv/json/parquet ``data_files`` (split -> file) when given, else the hub ``dataset`` (``kwargs`` go
    to its ``load_dataset``): how the text and multiple-choice tasks load."""
    if data_files is not None:
        files = dict(data_files)
        return load_dataset_checked(
            task, f"data_files {files}", builder_for(files), data_files=files, cache_dir=cache_dir
        )
    if dataset is None:
        raise DataError(f"task {task!r}: give exactly one of dataset (hub id) or data_files (local files)")
    return load_hub_dataset(task, dataset, dataset_config, cache_dir, **kwargs)
