"""Task vectors: the weight fingerprint, adding a task vector onto a backbone.

The on-disk format (the contract: ``write_task_vector``, ``read_meta``, ``read_head``, ``TaskVectorMeta``) is
``drm_lightning.io.task_vector``.

- ``fingerprint``: ``fingerprint(module)``, ``fingerprint_state(state)`` (``meta.json``'s ``base_fingerprint``)
- ``apply``: ``apply_task_vector(backbone, folder, lam)``

The extraction callback that writes them is ``drm_lightning.callbacks.TaskVectorCallback`` (it needs the expert
module, a layer above). Names are exported lazily so that reading a task vector never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fingerprint": "fingerprint",
    "fingerprint_state": "fingerprint",
    "apply_task_vector": "apply",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drm_lightning.task_vectors' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drm_lightning.task_vectors.{_EXPORTS[name]}"), name)
