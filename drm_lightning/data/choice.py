"""Multiple-choice tasks (a context and N options, one right) as a ``LightningDataModule`` on ``datasets``.

Why a task type of its own: WinoGrande, StoryCloze, QASC and QuaRTz ask which of N texts fits a context; the N
options differ per example, so they cannot be class labels with one fixed head output each. Every option is scored
against the context and the highest score wins:

- ``choice_format: pairs`` (encoders, as ``*ForMultipleChoice``): each (context, option) is tokenised as a sentence
  pair; batches hold ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) of shape ``[B, N, T]`` and the
  model's one-output head scores each pair.
- ``choice_format: targets`` (T5) and ``continuations`` (causal ``decoder_lm``): the context is the input
  (``input_ids [B, T]``) and the options are answer token sequences, ``choice_ids`` / ``choice_mask`` ``[B, N, L]``,
  scored by their likelihood under the LM head (``models/label_words.py``): T5 targets end with EOS, causal
  continuations follow the context after one space.

``label_names`` names the options' positions (``["1", "2"]`` for WinoGrande's answer column, ``[A, B, ...]`` for
QASC's answerKey); string labels map by name, integers by their decimal name when the names are numbers
(StoryCloze's 1-based ``answer_right_ending``), else they index the options.

A config::

    class_path: drm_lightning.data.choice.MultipleChoiceDataModule
    init_args:
      task: winogrande
      tokenizer: microsoft/deberta-v3-base
      dataset: allenai/winogrande
      dataset_config: winogrande_xl
      context: "{sentence}"
      choice_columns: [option1, option2]
      blank: _                       # the option fills the blank: context = text before it, option + text after
      label_column: answer
      label_names: ["1", "2"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from typing_extensions import override

from drm_lightning.data.checks import DataError, check_text_source
from drm_lightning.data.common import ClassificationDataModule
from drm_lightning.data.sources import load_files_or_hub
from drm_lightning.data.text import load_tokenizer, prompt_fields

CHOICE_FORMATS = ("pairs", "targets", "continuations")


def _options(row: Mapping[str, Any], choices_column: str | None, choice_columns: Sequence[str] | None) -> list[str]:
    if choice_columns:
        return [str(row[c]) for c in choice_columns]
    value = row[choices_column]
    if isinstance(value, Mapping):  # QASC / QuaRTz: {"text": [...], "label": [...]}
        value = value.get("text")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise DataError(
            f"column {choices_column!r}: expected a list of option texts (or {{text: [...]}}), got {value!r}"
        )
    return list(value)


@dataclass
class ChoiceCollator:
    """Turn rows into a multiple-choice batch (see the module docstring); picklable, for loader workers."""

    tokenizer: Any
    context: str
    label_column: str
    label_map: Mapping[Any, int]
    num_choices: int
    choice_format: str = "pairs"
    choices_column: str | None = None
    choice_columns: Sequence[str] | None = None
    blank: str | None = None
    max_length: int = 256

    def split(self, row: Mapping[str, Any]) -> tuple[str, list[str]]:
        """``(context, options)`` of one row; with a blank, the options take the text after it."""
        text = self.context.format_map(row)
        options = _options(row, self.choices_column, self.choice_columns)
        if len(options) != self.num_choices:
            raise DataError(f"a row has {len(options)} options, the task's label_names name {self.num_choices}")
        if self.blank is not None:
            if self.blank not in text:
                raise DataError(f"blank {self.blank!r} not found in context {text!r}")
            before, after = text.split(self.blank, 1)
            text, options = before.rstrip(), [option + after for option in options]
        return text, options

    def _answers(self, options: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        from drm_lightning.models.label_words import continuation_ids

        flat = [option for row in options for option in row]
        if self.choice_format == "targets":
            ids = self.tokenizer(flat, truncation=True, max_length=self.max_length)["input_ids"]
        else:
            ids = [row[: self.max_length] for row in continuation_ids(self.tokenizer, flat)]
        if any(not row for row in ids):
            raise DataError(f"an option tokenises to nothing: {[o for o, r in zip(flat, ids, strict=True) if not r]}")
        length = max(len(row) for row in ids)
        out = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros_like(out)
        for i, row in enumerate(ids):
            out[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        shape = (len(options), self.num_choices, length)
        return out.view(shape), mask.view(shape)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        contexts, options = zip(*(self.split(row) for row in rows), strict=True)
        labels = torch.tensor([self.label_map[row[self.label_column]] for row in rows], dtype=torch.long)
        if self.choice_format == "pairs":
            first = [c for c in contexts for _ in range(self.num_choices)]
            second = [o for row in options for o in row]
            encoded = self.tokenizer(
                first, second, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            batch = {k: v.view(len(rows), self.num_choices, -1) for k, v in encoded.items()}
        else:
            encoded = self.tokenizer(
                list(contexts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            batch = dict(encoded)
            batch["choice_ids"], batch["choice_mask"] = self._answers(list(options))
        batch["labels"] = labels
        return batch


class MultipleChoiceDataModule(ClassificationDataModule):
    """One multiple-choice task: a context template, N options per row, the index of the right one."""

    def __init__(
        self,
        task: str,
        tokenizer: str,
        label_names: list[str],
        context: str,
        choices_column: str | None = None,
        choice_columns: list[str] | None = None,
        blank: str | None = None,
        choice_format: Literal["pairs", "targets", "continuations"] = "pairs",
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        data_dir: str | None = None,
        label_column: str = "label",
        train_split: str = "train",
        validation_split: str | None = "validation",
        test_split: str | None = "test",
        val_fraction: float = 0.1,
        seed: int = 0,
        max_length: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        metrics: list[str] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """Describe one task; nothing is loaded until ``setup``.

        Args:
            task: Task name; keys task vectors, metrics and reports.
            tokenizer: Hub id, local folder or ``package://module/sub`` of the backbone's tokenizer.
            label_names: Names of the option positions, in order (``["1", "2"]``, ``[A, B, C, D]``); their number
                is the number of options every row must have.
            context: Template of the shared context over the row's columns, e.g. ``"{para}\\n{question}"``.
            choices_column: Column holding the options as a list of texts (or ``{text: [...]}``, as QASC stores
                them); excludes ``choice_columns``.
            choice_columns: One column per option (WinoGrande ``option1``, ``option2``).
            blank: A placeholder in the context that each option fills (WinoGrande ``_``): the context becomes the
                text before it and each option is followed by the text after it.
            choice_format: ``pairs`` for encoders, ``targets`` for T5, ``continuations`` for ``decoder_lm``.
            dataset: Hub id (or local dataset folder); excludes ``data_files``.
            dataset_config: The hub dataset's configuration (e.g. ``winogrande_xl``).
            data_files: Split name -> local csv/json/parquet file.
            data_dir: Passed to ``load_dataset`` for hub datasets whose files are downloaded by hand (StoryCloze).
            label_column: Column with the right option (its name, or an index).
            train_split, validation_split, test_split, val_fraction, seed: as for text classification: a missing
                validation split is carved from train with ``seed``.
            max_length: Tokens per (context, option) pair, context or option.
            batch_size: Training batch size (rows, each with all its options).
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            max_train_samples: Keep this many training rows (a seeded random subset).
            max_eval_samples: Same for validation and test.
            metrics: ``accuracy``, ``f1``, ``mcc`` over the chosen option index.
            cache_dir: Where ``datasets`` keeps its Arrow cache.
        """
        super().__init__(**self.base_arguments(locals()))
        where = f"task {task!r}"
        prompt_fields(context, where)
        if (choices_column is None) == (not choice_columns):
            raise DataError(f"{where}: give exactly one of choices_column or choice_columns")
        if choice_columns and len(choice_columns) != len(label_names):
            raise DataError(f"{where}: {len(choice_columns)} choice_columns but {len(label_names)} label_names")
        if choice_format not in CHOICE_FORMATS:
            raise DataError(f"{where}: choice_format={choice_format!r}, expected one of {CHOICE_FORMATS}")
        if blank is not None and not blank:
            raise DataError(f"{where}: blank must be a non-empty placeholder or null")
        check_text_source(task, dataset, data_files, max_length)
        self.save_hyperparameters(logger=False)

    @property
    @override
    def task_type(self) -> str:
        return "multiple_choice"

    @property
    def choice_format(self) -> str:
        """How options are encoded: ``pairs`` (encoders), ``targets`` (T5), ``continuations`` (causal LMs)."""
        return self.hparams.choice_format

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.hparams.tokenizer)

    @override
    def _input_columns(self) -> list[str]:
        hp = self.hparams
        options = list(hp.choice_columns) if hp.choice_columns else [hp.choices_column]
        return list(dict.fromkeys([*prompt_fields(hp.context, f"task {self.task!r}"), *options]))

    @override
    def _label_mapping(self, feature: Any) -> dict[Any, int]:
        """Names map by name; integers by their decimal name when the names are numbers, else as indices."""
        names = self._label_names
        mapping: dict[Any, int] = {name: i for i, name in enumerate(names)}
        if all(name.isdecimal() for name in names):
            mapping.update({int(name): i for i, name in enumerate(names)})
        else:
            mapping.update({i: i for i in range(len(names))})
        return mapping

    @override
    def _load_splits(self) -> Any:
        hp = self.hparams
        extra = {"data_dir": hp.data_dir} if hp.data_dir is not None else {}
        return load_files_or_hub(self.task, hp.data_files, hp.dataset, hp.dataset_config, hp.cache_dir, **extra)

    @override
    def _collator(self, label_map: dict[Any, int]) -> ChoiceCollator:
        hp = self.hparams
        return ChoiceCollator(
            tokenizer=self.tokenizer,
            context=hp.context,
            label_column=hp.label_column,
            label_map=label_map,
            num_choices=len(self._label_names),
            choice_format=hp.choice_format,
            choices_column=hp.choices_column,
            choice_columns=hp.choice_columns,
            blank=hp.blank,
            max_length=hp.max_length,
        )
