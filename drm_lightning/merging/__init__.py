"""Model merging, by job: the math (``methods/``, one module per method family, and their ``registry``), the
tensor operations the methods share (``ops/``: ``linalg``, ``elementwise``, ``lowrank``), the streaming engine
(``engine/``: plan, setup, reader, placement, merger, sweep, distributed, record, space, apply), the façade
``functional`` (every method in one namespace) and the float64 oracle ``reference``. The merged-delta files are
``drm_lightning.io.merged_delta``; the merged model folder is ``drm_lightning.export.model_folder``.

The public names below are imported lazily (PEP 562), so ``import drm_lightning.merging.functional`` stays free of
``transformers`` and the merger's other heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MergeResult": "engine.merger",
    "merge_parameters": "engine.merger",
    "merge_task_vectors": "engine.merger",
    "MergeSetup": "engine.setup",
    "prepare_merge": "engine.setup",
    "base_load_options": "engine.setup",
    "MERGE_FILE": "engine.record",
    "HEADS_DIR": "engine.record",
    "read_merge_record": "engine.record",
    "check_merge_space": "engine.space",
    "estimate_merge_bytes": "engine.space",
    "estimate_model_bytes": "engine.space",
    "add_merged_delta": "engine.apply",
    "apply_merged_delta": "engine.apply",
    "MergePlan": "engine.plan",
    "PlanEntry": "engine.plan",
    "TaskVectorReader": "engine.reader",
    "METHODS": "methods.registry",
    "MergeMethod": "methods.registry",
    "get_method": "methods.registry",
    "LowRankDelta": "ops.lowrank",
    "merge_task_vectors_distributed": "engine.distributed",
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
    from drm_lightning.merging.engine.apply import add_merged_delta, apply_merged_delta
    from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
    from drm_lightning.merging.engine.merger import MergeResult, merge_parameters, merge_task_vectors
    from drm_lightning.merging.engine.plan import MergePlan, PlanEntry
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.merging.engine.record import HEADS_DIR, MERGE_FILE, read_merge_record
    from drm_lightning.merging.engine.setup import MergeSetup, base_load_options, prepare_merge
    from drm_lightning.merging.engine.space import check_merge_space, estimate_merge_bytes, estimate_model_bytes
    from drm_lightning.merging.methods.registry import METHODS, MergeMethod, get_method
    from drm_lightning.merging.ops.lowrank import LowRankDelta


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
