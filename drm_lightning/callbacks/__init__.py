"""Lightning callbacks: ``TaskVectorCallback`` (``task_vector``) writes an expert's task vector when fitting ends.

Why a package above ``models`` and ``task_vectors``: a callback needs both the expert module it watches and the
format it writes, so it cannot live in either without an import cycle. Exported lazily (Lightning is heavy).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TaskVectorCallback": "task_vector"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drm_lightning.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drm_lightning.callbacks.{_EXPORTS[name]}"), name)
