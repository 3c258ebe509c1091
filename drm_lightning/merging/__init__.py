"""Model merging, by job: pure tensor methods (``functional``, ``linalg``, ``lowrank``), the method ``registry``,
the parameter ``plan``, the lazy ``reader`` of task vectors, validation and planning (``setup``), the streaming
``merger``, ``merge.json`` and heads (``record``), disk-space estimates (``space``), applying λ (``apply``) and the
merge shared out between ranks (``distributed``). The merged-delta files are ``drm_lightning.io.merged_delta``.

The public names below are imported lazily (PEP 562), so ``import drm_lightning.merging.functional`` stays free of
``transformers`` and the merger's other heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MergeResult": "merger",
    "merge_parameters": "merger",
    "merge_task_vectors": "merger",
    "MergeSetup": "setup",
    "prepare_merge": "setup",
    "base_load_options": "setup",
    "MERGE_FILE": "record",
    "HEADS_DIR": "record",
    "read_merge_record": "record",
    "check_merge_space": "space",
    "estimate_merge_bytes": "space",
    "estimate_model_bytes": "space",
    "add_merged_delta": "apply",
    "apply_merged_delta": "apply",
    "MergePlan": "plan",
    "PlanEntry": "plan",
    "TaskVectorReader": "reader",
    "METHODS": "registry",
    "MergeMethod": "registry",
    "get_method": "registry",
    "LowRankDelta": "lowrank",
    "merge_task_vectors_distributed": "distributed",
}

__all__ = [
    "HEADS_DIR",
    "LowRankDelta",
    "MERGE_FILE",
    "METHODS",
    "MergeMethod",
    "MergePlan",
    "MergeResult",
    "MergeSetup",
    "PlanEntry",
    "TaskVectorReader",
    "add_merged_delta",
    "apply_merged_delta",
    "base_load_options",
    "check_merge_space",
    "estimate_merge_bytes",
    "estimate_model_bytes",
    "get_method",
    "merge_parameters",
    "merge_task_vectors",
    "merge_task_vectors_distributed",
    "prepare_merge",
    "read_merge_record",
]

if TYPE_CHECKING:
    from drm_lightning.merging.apply import add_merged_delta, apply_merged_delta
    from drm_lightning.merging.distributed import merge_task_vectors_distributed
    from drm_lightning.merging.lowrank import LowRankDelta
    from drm_lightning.merging.merger import MergeResult, merge_parameters, merge_task_vectors
    from drm_lightning.merging.plan import MergePlan, PlanEntry
    from drm_lightning.merging.reader import TaskVectorReader
    from drm_lightning.merging.record import HEADS_DIR, MERGE_FILE, read_merge_record
    from drm_lightning.merging.registry import METHODS, MergeMethod, get_method
    from drm_lightning.merging.setup import MergeSetup, base_load_options, prepare_merge
    from drm_lightning.merging.space import check_merge_space, estimate_merge_bytes, estimate_model_bytes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
