"""Model merging: pure tensor methods (``functional``), factored LoRA deltas (``lowrank``), the method registry,
the parameter plan and the streaming merger of whole models.

The public names below are imported lazily (PEP 562), so ``import drm_lightning.merging.functional`` stays free of
``transformers`` and the merger's other heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "merge_task_vectors": "merger",
    "apply_merged_delta": "merger",
    "add_merged_delta": "merger",
    "merge_parameters": "merger",
    "prepare_merge": "merger",
    "iter_merged_delta": "merger",
    "read_merge_record": "merger",
    "MergeResult": "merger",
    "MergeSetup": "merger",
    "ShardWriter": "merger",
    "MergePlan": "plan",
    "PlanEntry": "plan",
    "TaskVectorReader": "reader",
    "METHODS": "registry",
    "MergeMethod": "registry",
    "get_method": "registry",
    "LowRankDelta": "lowrank",
}

__all__ = [
    "LowRankDelta",
    "METHODS",
    "MergeMethod",
    "MergePlan",
    "MergeResult",
    "MergeSetup",
    "PlanEntry",
    "ShardWriter",
    "TaskVectorReader",
    "add_merged_delta",
    "apply_merged_delta",
    "get_method",
    "iter_merged_delta",
    "merge_parameters",
    "merge_task_vectors",
    "prepare_merge",
    "read_merge_record",
]

if TYPE_CHECKING:
    from drm_lightning.merging.lowrank import LowRankDelta
    from drm_lightning.merging.merger import (
        MergeResult,
        MergeSetup,
        ShardWriter,
        add_merged_delta,
        apply_merged_delta,
        iter_merged_delta,
        merge_parameters,
        merge_task_vectors,
        prepare_merge,
        read_merge_record,
    )
    from drm_lightning.merging.plan import MergePlan, PlanEntry
    from drm_lightning.merging.reader import TaskVectorReader
    from drm_lightning.merging.registry import METHODS, MergeMethod, get_method


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
