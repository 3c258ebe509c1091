"""Zero-shot class embeddings of a CLIP model: what the ``clip`` family's task heads hold.

Why computed once, here: the benchmarks CLIP merging papers report (Task Arithmetic, TIES, TSV-M, Iso-C, DRM)
fine-tune and merge only the vision tower and classify with frozen heads made from the text encoder. Each class
embedding is the mean, over the task's prompt templates, of the normalised text embeddings of the class name in
that template, normalised again (as the CLIP paper's prompt ensembling and the task-vectors code do). The result
goes into the task's ``ZeroShotHead`` and its ``head.safetensors``, so the text encoder is needed only when an
expert is created.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from drm_lightning.models.heads import ZeroShotHead
from drm_lightning.models.resolve import resolve_pretrained


@torch.no_grad()
def class_embeddings(
    name: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    batch_size: int = 256,
) -> tuple[torch.Tensor, float]:
    """``(weight [C, D] with unit rows, logit_scale)`` of a ``CLIPModel`` checkpoint for the classes and templates.

    Args:
        name: a CLIP checkpoint (hub id, folder or ``package://``) with its text tower.
        class_names: the task's class names, in label order.
        templates: prompt templates, ``{}`` where the class name goes.
        tokenizer: where the tokenizer is (default: ``name``).
        trust_remote_code: passed to ``from_pretrained``.
        batch_size: prompts encoded at once.
    """
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_pretrained(name)
    try:
        model = CLIPModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    except (OSError, ValueError) as err:
        raise ValueError(
            f"backbone {name!r}: the clip family needs a CLIPModel checkpoint with its text tower ({err})"
        ) from None
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer or name), trust_remote_code=trust_remote_code)
    prompts = [template.format(c) for c in class_names for template in templates]
    embeds = []
    for start in range(0, len(prompts), batch_size):
        encoded = tok(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        embeds.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    text = torch.nn.functional.normalize(torch.cat(embeds).float(), dim=-1)
    weight = torch.nn.functional.normalize(text.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)
    return weight, float(model.logit_scale.exp())


def zero_shot_head(
    name: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> ZeroShotHead:
    """The frozen ``ZeroShotHead`` holding ``class_embeddings`` of ``name`` (same arguments)."""
    weight, scale = class_embeddings(
        name, class_names, templates, tokenizer=tokenizer, trust_remote_code=trust_remote_code
    )
    head = ZeroShotHead(weight.shape[1], len(class_names), scale)
    head.weight.copy_(weight)
    return head
