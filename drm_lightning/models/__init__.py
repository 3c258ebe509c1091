"""Backbones, task heads, LoRA settings and the expert ``LightningModule``.

- ``backbone``: ``load_backbone(name, family)``, ``load_recorded_base(meta)``, ``FAMILIES``
- ``heads``: ``EncoderHead``, ``DecoderHead``, ``VisionHead``, ``build_head(config)``
- ``lora``: ``LoraSettings`` (peft LoRA on the backbone)
- ``expert``: ``ExpertModule`` (full or LoRA fine-tuning) and what it is made of: ``settings``, ``forward``,
  ``metrics``, ``optim``, ``checkpoint``; ``rebuild``: an expert rebuilt from a task vector folder for evaluation
- ``resolve``: ``resolve_pretrained`` (``package://`` names)

Import from the modules: ``drm_lightning.models.backbone`` (as the merger does) must not pay for Lightning and
torchmetrics.
"""
