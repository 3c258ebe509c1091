"""drm_lightning: fine-tune per-task experts with Lightning, merge them (DRM, Iso-C/CTS, TSV-M, TIES, ...), validate."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_task_model"]


def __getattr__(name: str) -> Any:
    """``drm_lightning.load_task_model`` without importing torch/transformers at ``import drm_lightning``."""
    if name == "load_task_model":
        from drm_lightning.export.task_model import load_task_model

        return load_task_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
