"""What every task datamodule shares: loading splits, checking them, mapping labels, carving and sampling.

Why one base class: text and image tasks differ only in how a batch is built (tokenizer vs image processor);
everything that makes a run reproducible and its errors readable (split roles, seeded validation carve, seeded
sub-sampling, a per-epoch seeded shuffle that survives resuming, label checks) must behave identically for both,
and for every task the merger later evaluates.
"""

from __future__ import annotations

import glob
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

SUPPORTED_METRICS: tuple[str, ...] = ("accuracy", "f1", "mcc")
"""Metric names a task may ask its model to report."""

FILE_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File extension -> ``datasets`` builder for ``data_files``."""

ROLES: tuple[str, ...] = ("train", "validation", "test")
_STAGE_ROLES: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "validation"),
}
_SHOWN = 5  # how many offending values an error message quotes


class DataError(ValueError):
    """Bad task data or settings; the message names the task, split, column, file or value at fault."""


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


_NO_DATA = re.compile(r'Instruction "([^"]+)" corresponds to no data')


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


def seeded_subset(dataset: Any, limit: int | None, seed: int) -> Any:
    """The first ``limit`` rows after a seeded shuffle (kept in source order for locality); all rows if None."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return dataset.select(keep.tolist())


def carve_validation(dataset: Any, fraction: float, seed: int, task: str, split: str) -> tuple[Any, Any]:
    """Split ``dataset`` into disjoint (train, validation) parts, the same ones for the same seed."""
    n = len(dataset)
    n_val = math.ceil(n * fraction)
    if not 0 < n_val < n:
        raise DataError(f"task {task!r}: cannot carve val_fraction={fraction} of split {split!r} with {n} rows")
    order = np.random.default_rng(seed).permutation(n)
    return dataset.select(np.sort(order[n_val:]).tolist()), dataset.select(np.sort(order[:n_val]).tolist())


class EpochShuffleSampler(Sampler[int]):
    """A shuffle of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    Why not ``shuffle=True``: a ``RandomSampler`` draws its order from the global torch RNG, whose state a Lightning
    checkpoint does not keep, so a run resumed with ``--ckpt_path`` would replay its first epoch's order instead of
    the one an uninterrupted run sees. Lightning calls ``set_epoch`` with the restored epoch before each training
    epoch (and, under DDP, forwards it through the ``DistributedSamplerWrapper`` that shards this order), so the
    order is a pure function of the configuration. Without ``set_epoch`` every pass repeats epoch 0's order.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (called by Lightning at the start of every training epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes the pair, so (seed, epoch) and (seed + 1, epoch - 1) give unrelated orders.
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _check_label_names(task: str, label_names: Sequence[str]) -> None:
    if len(label_names) < 2 or len(set(label_names)) != len(label_names):
        raise DataError(f"task {task!r}: label_names must hold at least two distinct names, got {list(label_names)}")


def check_text_source(task: str, dataset: str | None, data_files: Mapping[str, str] | None, max_length: int) -> None:
    """A text task's checks: exactly one of a hub ``dataset`` or local ``data_files``, room for two tokens."""
    if (dataset is None) == (data_files is None):
        raise DataError(f"task {task!r}: give exactly one of dataset (hub id) or data_files (local files)")
    if max_length < 2:
        raise DataError(f"task {task!r}: max_length must be >= 2, got {max_length}")


class ClassificationDataModule(LightningDataModule):
    """Base of the task datamodules: split roles, checks, carving, sampling, loaders.

    Subclasses pass their arguments up (``base_arguments(locals())``), call ``save_hyperparameters(logger=False)``, and
    implement ``_input_columns``, ``_load_splits`` and ``_collator``. Data is loaded in ``setup`` (per process),
    never in ``__init__``, so a config can be parsed and checked without touching any file.
    """

    def __init__(
        self,
        *,
        task: str,
        label_names: list[str] | None,
        label_column: str,
        train_split: str,
        validation_split: str | None,
        test_split: str | None,
        val_fraction: float,
        seed: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        max_train_samples: int | None,
        max_eval_samples: int | None,
        metrics: list[str] | None,
    ) -> None:
        super().__init__()
        if not task:
            raise DataError("task: must be a non-empty name")
        if label_names is not None:
            _check_label_names(task, label_names)
        metrics = ["accuracy"] if metrics is None else list(metrics)
        unknown = [m for m in metrics if m not in SUPPORTED_METRICS]
        if unknown or not metrics:
            raise DataError(f"task {task!r}: metrics {unknown or metrics} not in {list(SUPPORTED_METRICS)}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"task {task!r}: val_fraction must lie in (0, 1), got {val_fraction}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise DataError(f"task {task!r}: {name} must be >= 1, got {value}")
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                raise DataError(f"task {task!r}: {name} must be >= 1 or None, got {value}")
        if num_workers < 0:
            raise DataError(f"task {task!r}: num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise DataError(f"task {task!r}: seed must be >= 0, got {seed}")
        self.task = task
        self._given_label_names = list(label_names) if label_names is not None else None
        self._metrics = metrics
        self._label_column = label_column
        self._split_names = {"train": train_split, "validation": validation_split, "test": test_split}
        self._val_fraction = val_fraction
        self._seed = seed
        self._batch_size = batch_size
        self._eval_batch_size = eval_batch_size or batch_size
        self._num_workers = num_workers
        self._max_samples = {"train": max_train_samples, "validation": max_eval_samples, "test": max_eval_samples}
        self._raw: Any = None  # datasets.DatasetDict once loaded
        self._carved: tuple[Any, Any] | None = None
        self._ready: dict[str, tuple[Any, dict[Any, int]]] = {}

    @property
    def _label_names(self) -> list[str]:
        """The given label names, or (``label_names: null``) the train split's ``ClassLabel`` names, in index order.

        Why: image benchmarks have hundreds of classes (SUN397: 397) whose names and order the hub dataset already
        carries; reading them from it cannot misalign a hand-copied list. Reading them loads the dataset.
        """
        if self._given_label_names is None:
            from datasets import ClassLabel

            if self._raw is None:
                self._raw = self._load_splits()
            name = self._split_names["train"]
            if name not in self._raw:
                raise DataError(f"task {self.task!r}: label_names is null and there is no train split {name!r}")
            feature = self._raw[name].features.get(self._label_column)
            if not isinstance(feature, ClassLabel):
                raise DataError(
                    f"task {self.task!r}: label_names is null but column {self._label_column!r} of split {name!r} "
                    f"is {type(feature).__name__}, not a ClassLabel with names: give label_names"
                )
            _check_label_names(self.task, list(feature.names))
            self._given_label_names = list(feature.names)
        return self._given_label_names

    @classmethod
    def base_arguments(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Pick this base's keyword arguments out of a subclass ``__init__``'s ``locals()``.

        Why: every subclass spells out the shared parameters in its own signature (the CLI and ``hparams`` read
        them there) and would otherwise repeat the whole hand-over list.
        """
        own = inspect.signature(ClassificationDataModule.__init__).parameters
        return {name: values[name] for name, p in own.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def _load_files_or_hub(
        self,
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
                self.task, f"data_files {files}", builder_for(files), data_files=files, cache_dir=cache_dir
            )
        return self._load_hub_dataset(dataset, dataset_config, cache_dir, **kwargs)

    def _load_hub_dataset(self, dataset: str, dataset_config: str | None, cache_dir: str | None, **kwargs: Any) -> Any:
        """Load a hub (or local dataset-folder) ``dataset``; errors name the task and the dataset.

        ``kwargs`` go to ``load_dataset`` (e.g. ``data_dir`` for datasets whose files are downloaded by hand)."""
        source = f"dataset {dataset!r}" + (f" ({dataset_config})" if dataset_config else "")
        return load_dataset_checked(self.task, source, dataset, dataset_config, cache_dir=cache_dir, **kwargs)

    # -- what the model reads -----------------------------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        """Class names in index order; the model's head has one output per name."""
        return list(self._label_names)

    @property
    def num_labels(self) -> int:
        return len(self._label_names)

    @property
    def metrics(self) -> list[str]:
        """Metric names this task reports (a subset of ``SUPPORTED_METRICS``)."""
        return list(self._metrics)

    @property
    def task_type(self) -> str:
        """``classification`` (one label per input) or ``multiple_choice`` (one of several options per input)."""
        return "classification"

    # -- subclass hooks -----------------------------------------------------------------------------------------

    def _label_mapping(self, feature: Any) -> dict[Any, int]:
        """How a split's raw label values map to indices (``label_mapping``; subclasses may map otherwise)."""
        return label_mapping(self._label_names, feature)

    def _input_columns(self) -> list[str]:
        """Columns the collator reads besides the label column."""
        raise NotImplementedError

    def _load_splits(self) -> Any:
        """Return a ``datasets.DatasetDict`` with every available split."""
        raise NotImplementedError

    def _collator(self, label_map: dict[Any, int]) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Build the batch function for a split whose raw labels map through ``label_map``."""
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------------------------------

    @override
    def prepare_data(self) -> None:
        """Load (for a hub dataset: download and cache) once on each node's first process before ``setup``."""
        if self._raw is None:
            self._raw = self._load_splits()

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the splits once, then check and prepare the ones ``stage`` needs (a bad test split cannot stop fit)."""
        if self._raw is None:
            self._raw = self._load_splits()
        for role in _STAGE_ROLES.get(stage, ROLES):
            self.split(role)

    def split(self, role: str) -> Any:
        """The checked, sub-sampled ``datasets.Dataset`` for ``role`` (train / validation / test)."""
        if role not in ROLES:
            raise DataError(f"task {self.task!r}: unknown split role {role!r}; expected one of {list(ROLES)}")
        if role not in self._ready:
            if self._raw is None:
                self._raw = self._load_splits()
            dataset = self._select(role)
            mapping = self._label_mapping(dataset.features[self._label_column])
            self._ready[role] = (seeded_subset(dataset, self._max_samples[role], self._seed), mapping)
        return self._ready[role][0]

    def _raw_split(self, name: str, role: str) -> Any:
        """A loaded split, checked (non-empty, columns present and complete, labels known), cut to needed columns.

        Checks run on whole loaded splits, before any carve or sub-sample: ``unique`` and column selection on a
        row subset would first copy the rows.
        """
        dataset = self._raw[name]
        if len(dataset) == 0:
            raise DataError(f"task {self.task!r}: split {name!r} ({role}) is empty")
        columns = [*self._input_columns(), self._label_column]
        check_columns(self.task, name, dataset, columns)
        mapping = self._label_mapping(dataset.features[self._label_column])
        check_labels(self.task, name, dataset, self._label_column, mapping)
        return dataset.select_columns(columns)

    def _select(self, role: str) -> Any:
        """The checked dataset for a role; carves validation off train when the validation split is absent."""
        available = list(self._raw)
        validation = self._split_names["validation"]
        if role in ("train", "validation") and (validation is None or validation not in self._raw):
            train_name = self._required(self._split_names["train"], "train", available)
            if self._carved is None:
                train = self._raw_split(train_name, "train")
                rank_zero_info(
                    f"task {self.task!r}: no validation split {validation!r} among {available}; carving "
                    f"{self._val_fraction:.0%} of {train_name!r} (seed {self._seed})"
                )
                self._carved = carve_validation(train, self._val_fraction, self._seed, self.task, train_name)
            train, val = self._carved
            return train if role == "train" else val
        name = self._required(self._split_names[role], role, available)
        return self._raw_split(name, role)

    def _required(self, name: str | None, role: str, available: list[str]) -> str:
        if name is None:
            raise DataError(f"task {self.task!r}: no {role} split configured ({role}_split is None)")
        if name not in self._raw:
            raise DataError(f"task {self.task!r}: {role}_split {name!r} not found; available splits: {available}")
        return name

    def _loader(self, role: str, shuffle: bool, by_length: bool = True) -> DataLoader:
        """A loader for ``role``; a shuffled one orders each epoch by ``(seed, epoch)`` so resumed runs match."""
        dataset = self.split(role)
        _, mapping = self._ready[role]
        sampler: Any = None
        if shuffle:
            sampler = EpochShuffleSampler(len(dataset), self._seed)
        elif by_length:
            sampler = self._eval_order(dataset)
        return DataLoader(
            dataset,
            batch_size=self._batch_size if role == "train" else self._eval_batch_size,
            sampler=sampler,
            collate_fn=self._collator(mapping),
            num_workers=self._num_workers,
            persistent_workers=self._num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_order(self, dataset: Any) -> list[int] | None:
        """Order of validation/test rows (None: as stored). Metrics are order-free; subclasses may batch alike rows."""
        return None

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, by_length=False)  # predictions come back in the stored order
