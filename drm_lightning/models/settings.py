"""The checks of an expert's settings that need no model loaded: ``ExpertModule`` and the pipeline run the same ones.

Also what an expert takes from its datamodule at ``setup`` (``datamodule_settings``), checked the same way.

Why one place: loading the backbone is what makes ``ExpertModule(...)`` expensive, and the pipeline checks a
recipe's shared model settings before its first fit (a typo must not surface only after the first expert trained).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drm_lightning.models.backbone import LABEL_WORD_FAMILIES, check_family, parse_dtype
from drm_lightning.models.heads import POOLINGS
from drm_lightning.models.lora import LoraSettings
from drm_lightning.models.metrics import check_metrics

#: Families that can answer multiple-choice tasks: a one-output head per (context, option) pair, or option likelihood.
CHOICE_FAMILIES = ("encoder", *LABEL_WORD_FAMILIES)
TASK_TYPES = ("classification", "multiple_choice")
#: The ``MultipleChoiceDataModule(choice_format=...)`` each family reads.
CHOICE_FORMAT_OF = {"encoder": "pairs", "seq2seq": "targets", "decoder_lm": "continuations"}


def check_expert_settings(
    *,
    family: str = "encoder",
    task: str = "task",
    task_type: str = "classification",
    lora: LoraSettings | Mapping[str, Any] | None = None,
    learning_rate: float = 2e-5,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.06,
    metrics: Sequence[str] | None = None,
    pooling: str = "cls",
    torch_dtype: str | None = None,
    where: str = "",
) -> LoraSettings | None:
    """Raise on a bad setting (the message names ``<where><argument>``); return ``lora`` as ``LoraSettings``.

    The arguments are ``ExpertModule``'s, with its defaults; a ``lora`` mapping is how hyperparameters come back
    from a checkpoint (and how a recipe gives them).
    """
    check_family(family)
    if task_type not in TASK_TYPES:
        raise ValueError(f"{where}task_type={task_type!r}: expected one of {TASK_TYPES}")
    if task_type == "multiple_choice" and family not in CHOICE_FAMILIES:
        raise ValueError(
            f"{where}task_type='multiple_choice': family {family!r} cannot score options; use one of {CHOICE_FAMILIES}"
        )
    if isinstance(lora, Mapping):
        lora = LoraSettings(**lora)  # validates in __post_init__
    if lora is not None and not isinstance(lora, LoraSettings):
        raise ValueError(f"{where}lora={lora!r}: expected LoraSettings, a dict of its fields, or None")
    if not learning_rate > 0:
        raise ValueError(f"{where}learning_rate={learning_rate!r}: expected a positive number")
    if not weight_decay >= 0:
        raise ValueError(f"{where}weight_decay={weight_decay!r}: expected a number >= 0")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"{where}warmup_ratio={warmup_ratio!r}: expected a number in [0, 1)")
    if pooling not in POOLINGS:
        raise ValueError(f"{where}pooling={pooling!r}: expected one of {POOLINGS}")
    if not task or "/" in task:
        raise ValueError(f"{where}task={task!r}: expected a non-empty name without '/' (it is part of metric keys)")
    if metrics is not None:
        check_metrics(metrics)
    parse_dtype(torch_dtype)
    return lora


@dataclass(frozen=True)
class DatamoduleSettings:
    """What an expert may take from its datamodule at ``setup``; None where the datamodule does not say."""

    metrics: list[str] | None
    templates: list[str] | None
    label_names: list[str] | None


def datamodule_settings(datamodule: Any, *, task: str, family: str, task_type: str) -> DatamoduleSettings:
    """Check that ``datamodule`` (None: no datamodule) serves an expert of this ``family`` and ``task_type``, and
    read what the expert takes from it (metrics, CLIP templates, label names) when not given its own.

    Raises:
        ValueError: the datamodule's ``task_type`` differs, or its ``choice_format`` is not what ``family`` reads.
    """
    if datamodule is None:
        return DatamoduleSettings(None, None, None)
    dm_type = getattr(datamodule, "task_type", "classification")
    if dm_type != task_type:
        raise ValueError(
            f"task {task!r}: the model's task_type={task_type!r} differs from the datamodule's {dm_type!r}"
        )
    dm_format = getattr(datamodule, "choice_format", None)
    if task_type == "multiple_choice" and dm_format not in (None, CHOICE_FORMAT_OF[family]):
        raise ValueError(
            f"task {task!r}: the datamodule's choice_format={dm_format!r} is not what a {family} model "
            f"reads; set choice_format: {CHOICE_FORMAT_OF[family]}"
        )

    def listed(name: str) -> list[str] | None:
        value = getattr(datamodule, name, None)
        return list(value) if value is not None else None

    return DatamoduleSettings(listed("metrics"), listed("templates"), listed("label_names"))
