"""Task vectors: the on-disk format, the extraction callback, and adding a task vector onto a backbone.

- ``format``: ``write_task_vector``, ``read_meta``, ``read_head``, ``TaskVectorMeta``, ``LoraMeta`` (the contract)
- ``callback``: ``TaskVectorCallback`` (writes an expert's task vector when fitting ends)
- ``apply``: ``apply_task_vector(backbone, folder, lam)``

Names are exported lazily so that reading a task vector never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TaskVectorCallback": "callback",
    "apply_task_vector": "apply",
    "write_task_vector": "format",
    "read_meta": "format",
    "read_head": "format",
    "TaskVectorMeta": "format",
    "LoraMeta": "format",
    "TaskVectorError": "format",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drm_lightning.task_vectors' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drm_lightning.task_vectors.{_EXPORTS[name]}"), name)
