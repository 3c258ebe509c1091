"""The base task datamodule: split roles, settings checks, the validation carve, sub-sampling and the loaders.

Why one base class: text and image tasks differ only in how a batch is built (tokenizer vs image processor);
everything that makes a run reproducible and its errors readable (split roles, seeded validation carve, seeded
sub-sampling, a per-epoch seeded shuffle that survives resuming, label checks) must behave identically for both,
and for every task the merger later evaluates. The pieces live one job per module: the checks and ``DataError`` in
``checks.py``, loading files or a hub dataset in ``sources.py``, the seeded row choice and order in ``sampling.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from drm_lightning.data.checks import (
    SUPPORTED_METRICS,
    DataError,
    check_columns,
    check_label_names,
    check_labels,
    label_mapping,
)
from drm_lightning.data.sampling import EpochShuffleSampler, carve_validation, seeded_subset

__all__ = ["ROLES", "ClassificationDataModule"]

ROLES: tuple[str, ...] = ("train", "validation", "test")
_STAGE_ROLES: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "validation"),
}


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
            check_label_names(task, label_names)
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
            check_label_names(self.task, list(feature.names))
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
