"""The checks of an expert's settings that need no model loaded: ``ExpertModule`` and the pipeline run the same ones.

Why one place: loading the backbone is what makes ``ExpertModule(...)`` expensive, and the pipeline checks a
recipe's shared model settings before its first fit (a typo must not surface only after the first expert trained).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
