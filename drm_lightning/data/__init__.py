"""Task datamodules on ``datasets``: text (``text.py``), multiple choice (``choice.py``), image (``image.py``), the
offline demo tasks (``demo.py``).

Exports resolve lazily so that ``import drm_lightning.data`` stays cheap for code that only needs one of them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextClassificationDataModule": "drm_lightning.data.text",
    "ImageClassificationDataModule": "drm_lightning.data.image",
    "MultipleChoiceDataModule": "drm_lightning.data.choice",
    "ClassificationDataModule": "drm_lightning.data.common",
    "DataError": "drm_lightning.data.checks",
    "SUPPORTED_METRICS": "drm_lightning.data.checks",
    "DEMO_TASKS": "drm_lightning.data.demo",
    "demo_task": "drm_lightning.data.demo",
    "demo_data_files": "drm_lightning.data.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drm_lightning.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
