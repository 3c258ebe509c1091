"""Models out: merged weights in forms that load without drm_lightning (``docs/interop.md``).

- ``save_merged_model``: a complete ``save_pretrained`` folder of the base's own architecture (``--save_as model``).
- ``merge_to_adapter`` / ``adapter_from_merged``: LoRA experts merged into a PEFT LoRA adapter (``--save_as adapter``).
- ``factor_delta``: a merged delta as exact low-rank factors through the experts' joint LoRA spans.
- ``load_task_model``: a merged folder plus a task name -> backbone + pooling + head, one ``nn.Module``.

Imported lazily (PEP 562), so ``import drm_lightning`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "save_merged_model": "model_folder",
    "merge_to_adapter": "adapter",
    "adapter_from_merged": "adapter",
    "factor_delta": "factor",
    "load_task_model": "task_model",
    "TaskModel": "task_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
