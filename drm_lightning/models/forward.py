"""The forward pass of each family on a batch: class logits from a backbone and its head, or a label-word
family's candidate answers.

``ExpertModule.forward`` dispatches here; the batch keys are those of the datamodules in ``data/``: ``input_ids``,
``attention_mask``, ``token_type_ids``, ``pixel_values`` and multiple choice's ``choice_ids`` / ``choice_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def head_logits(
    backbone: nn.Module, head: nn.Module, family: str, task_type: str, batch: Mapping[str, torch.Tensor], task: str
) -> torch.Tensor:
    """Class logits ``[B, num_labels]`` of a family with a head (``encoder | decoder | vision | clip``)."""
    if family == "vision":
        hidden = backbone(pixel_values=batch["pixel_values"]).last_hidden_state
        return head(hidden)
    if family == "clip":
        return head(backbone(pixel_values=batch["pixel_values"]).image_embeds)
    if task_type == "multiple_choice":
        return choice_logits(backbone, head, batch, task)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if family == "encoder" and "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    if family == "decoder":
        kwargs["use_cache"] = False
    hidden = backbone(**kwargs).last_hidden_state
    return head(hidden, batch["attention_mask"])


def choice_logits(backbone: nn.Module, head: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """Encoder multiple choice: each (context, option) pair ``[B, C, T]`` through backbone and head: ``[B, C]``."""
    ids = batch["input_ids"]
    if ids.dim() != 3:
        raise ValueError(
            f"task {task!r}: a multiple-choice batch for an encoder needs input_ids [batch, options, tokens] "
            f"(choice_format: pairs), got shape {tuple(ids.shape)}"
        )
    size, num = ids.shape[:2]
    flat = {k: batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    hidden = backbone(**flat).last_hidden_state
    return head(hidden, flat["attention_mask"]).view(size, num)


def batch_candidates(
    batch: Mapping[str, torch.Tensor],
    family: str,
    task_type: str,
    task: str,
    label_targets: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target tokens ``(ids [B, C, L], mask [B, C, L])`` of a label-word family: ``label_targets`` (``[C, L]``, the
    same for every input), or (multiple choice) each input's own options."""
    if task_type == "multiple_choice":
        if "choice_ids" not in batch:
            kind = "targets" if family == "seq2seq" else "continuations"
            raise ValueError(
                f"task {task!r}: a multiple-choice batch for {family} needs choice_ids and choice_mask "
                f"(choice_format: {kind})"
            )
        return batch["choice_ids"], batch["choice_mask"]
    if label_targets is None:
        raise ValueError(f"task {task!r}: label_names unknown")
    size = batch["attention_mask"].shape[0]
    ids, mask = label_targets
    return ids.expand(size, *ids.shape), mask.expand(size, *mask.shape)
