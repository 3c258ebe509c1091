"""Backbones, task heads, LoRA settings and the expert ``LightningModule``.

- ``backbone``: ``load_backbone(name, family)``, ``load_recorded_base(meta)``, ``FAMILIES``
- ``heads``: ``EncoderHead``, ``DecoderHead``, ``VisionHead``, ``build_head(config)``
- ``lora``: ``LoraSettings`` (peft LoRA on the backbone)
- ``expert``: ``ExpertModule`` (full or LoRA fine-tuning; ``from_task_vector`` for evaluation)
  and what it is made of: ``settings``, ``forward``, ``metrics``, ``optim``, ``checkpoint``, ``rebuild``
- ``resolve``: ``resolve_pretrained`` (``package://`` names)

Names are exported lazily: importing ``drm_lightning.models.backbone`` (as the merger does) must not pay for
Lightning and torchmetrics.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAMILIES": "backbone",
    "load_backbone": "backbone",
    "load_recorded_base": "backbone",
    "EncoderHead": "heads",
    "DecoderHead": "heads",
    "VisionHead": "heads",
    "build_head": "heads",
    "LoraSettings": "lora",
    "ExpertModule": "expert",
    "resolve_pretrained": "resolve",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drm_lightning.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drm_lightning.models.{_EXPORTS[name]}"), name)
