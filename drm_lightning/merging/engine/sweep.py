"""A search over a merge method's own parameters: parameter grids, and one streaming pass that writes one Δ_merged
folder per parameter set.

Why one pass: reading the task vectors and, for DRM, the joint decomposition of every matrix are the cost of a merge;
a drop-rate search changes only the pruning, the election and the final product. ``merge_task_vectors_many`` reads
each parameter's deltas once and asks the registry for every set at once (``MergeMethod.merge_many``: DRM's joint
basis serves every drop rate and switch setting, Iso-CTS's decomposition of the summed delta every common fraction,
and sets that agree on a rule's parameters share its result), then appends each result to its own output.

A grid is written in a method's ``params`` as a list, e.g. ``{drop_rate: [0.5, 0.7, 0.8, 0.9], rank_tol: 0.01}``
(``ParamGrid.parse``); every combination of the listed values is one parameter set, and its folder name says
which values it holds (``variant_name``: ``drop_rate-0.5``).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from drm_lightning.io.disk import check_free_space
from drm_lightning.io.shards import DEFAULT_MAX_SHARD_BYTES, check_max_shard_bytes
from drm_lightning.merging.engine.merger import MergeResult, stream_merged, write_merged
from drm_lightning.merging.engine.plan import MergePlan, PlanEntry
from drm_lightning.merging.engine.reader import TaskVectorReader
from drm_lightning.merging.engine.setup import check_output, prepare_merge
from drm_lightning.merging.engine.space import estimate_merge_bytes
from drm_lightning.merging.methods.registry import get_method
from drm_lightning.merging.methods.spec import MergeMethod


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def variant_name(values: Mapping[str, Any]) -> str:
    """A folder-safe name for the searched values of one parameter set: ``drop_rate-0.5``, ``a-1+b-true``."""
    if not values:
        return "default"
    return "+".join(f"{key}-{_value_text(values[key])}" for key in sorted(values))


@dataclass(frozen=True)
class ParamGrid:
    """A method's parameters with some given as lists of values to search.

    Attributes:
        method: the registry name.
        fixed: the parameters given as one value.
        axes: searched parameter -> its values, in the order given (each checked, no repeats).
    """

    method: str
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]

    @classmethod
    def parse(cls, method: str, params: Mapping[str, Any] | None, where: str = "params") -> ParamGrid:
        """Split ``params`` into fixed values and searched lists, checking every value against the method.

        Raises:
            ValueError: naming ``where``, the parameter and the value: an empty list, a repeated value, or a value
                the method refuses.
        """
        merge_method = get_method(method)
        fixed: dict[str, Any] = {}
        axes: dict[str, list[Any]] = {}
        for key, value in dict(params or {}).items():
            if isinstance(value, list | tuple):
                values = list(value)
                if not values:
                    raise ValueError(f"{where}.{key}=[]: give at least one value to search")
                checked = []
                for item in values:
                    try:
                        checked.append(merge_method.check({key: item})[key])
                    except ValueError as err:
                        raise ValueError(f"{where}.{key}={values!r}: {err}") from None
                if len(set(map(repr, checked))) != len(checked):
                    raise ValueError(f"{where}.{key}={values!r}: a value repeats")
                axes[key] = checked
            else:
                fixed[key] = value
        try:
            merge_method.check(fixed)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return cls(method, fixed, axes)

    @property
    def searched(self) -> bool:
        """Whether any parameter has a list of values (a single-value list counts: it names its variant)."""
        return bool(self.axes)

    def combinations(self) -> list[dict[str, Any]]:
        """The searched values of every parameter set, in grid order (the last axis varies fastest)."""
        keys = list(self.axes)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.axes[k] for k in keys))]

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The full checked parameters of one set: the fixed ones, the searched ``values``, the defaults."""
        return get_method(self.method).check({**self.fixed, **values})

    def extended(self, key: str, value: Any) -> ParamGrid:
        """The grid with ``value`` added to axis ``key`` (kept sorted when the axis is numeric)."""
        values = [*self.axes[key], get_method(self.method).check({key: value})[key]]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            values = sorted(values)
        return replace(self, axes={**self.axes, key: values})


def edge_extension(method: str, key: str, values: Sequence[Any], best: Any) -> Any | None:
    """The next value beyond the edge of a numeric axis whose best value is its first or last; ``None`` if none.

    The step is the spacing at that edge; a value the method refuses (a drop rate of 1, a density of 0) is replaced
    by the midpoint between the edge and that bound, and nothing is proposed when even that is refused or the axis
    has fewer than two values, is not numeric, or the best value is inside it.
    """
    numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numeric) != len(values) or len(values) < 2 or best not in (min(values), max(values)):
        return None
    ordered = sorted(values)
    if best == ordered[-1]:
        edge, step = ordered[-1], ordered[-1] - ordered[-2]
    else:
        edge, step = ordered[0], ordered[0] - ordered[1]
    merge_method = get_method(method)
    for candidate in (edge + step, edge + step / 2, edge + step / 4):
        candidate = round(candidate, 10)
        if isinstance(edge, int) and isinstance(step, int):
            candidate = int(candidate)
        if candidate == edge or candidate in values or not math.isfinite(candidate):
            continue
        try:
            return merge_method.check({key: candidate})[key]
        except ValueError:
            continue
    return None


def merge_parameters_many(
    entries: Sequence[PlanEntry],
    readers: Sequence[TaskVectorReader],
    method: MergeMethod,
    param_sets: Sequence[Mapping[str, Any]],
    coefficients: Sequence[float] | None = None,
    *,
    device: torch.device,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """``merger.merge_parameters`` for several parameter sets: yield ``(name, [Δ_merged per set])``, each a
    contiguous float32 CPU tensor (sets whose rule parameters agree share one tensor object)."""
    coeffs = None if coefficients is None else list(coefficients)

    def merge(rule: str, deltas: list, statistics: list[torch.Tensor] | None) -> list[torch.Tensor]:
        return method.merge_many(rule, deltas, param_sets, coeffs, out_dtype=torch.float32, statistics=statistics)

    return stream_merged(
        entries, readers, method, param_sets, merge, device=device, progress=progress, timings=timings,
        desc=f"merge {method.label} x{len(param_sets)}",
    )  # fmt: skip


def merge_task_vectors_many(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    outputs: Sequence[str | os.PathLike[str]],
    param_sets: Sequence[Mapping[str, Any]],
    coefficients: Sequence[float] | None = None,
    *,
    base: str | None = None,
    family: str | None = None,
    plan: MergePlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> list[MergeResult]:
    """``merge_task_vectors`` at several parameter sets in one pass: ``outputs[i]`` gets ``param_sets[i]``'s merge.

    Each output is a complete merged folder (the layout of ``merge_task_vectors``; its ``merge.json`` records
    its own parameters and, under ``sweep``, how many sets shared the pass). All outputs are written atomically:
    an error leaves none of them. ``timings`` are those of the shared pass.

    Raises:
        ValueError: ``outputs`` and ``param_sets`` of different lengths, a repeated output, a bad parameter
            (before anything is read).
    """
    t_start = time.perf_counter()
    check_max_shard_bytes(max_shard_bytes)
    outputs = [Path(o) for o in outputs]
    if not outputs or len(outputs) != len(param_sets):
        raise ValueError(f"outputs ({len(outputs)}) and param_sets ({len(param_sets)}): need one output per set, >= 1")
    if len({o.resolve() for o in outputs}) != len(outputs):
        raise ValueError(f"outputs={[str(o) for o in outputs]}: an output repeats")
    merge_method = get_method(method)
    checked = [merge_method.check(p) for p in param_sets]
    for out in outputs:
        check_output(out, [Path(p) for p in task_vectors])
    setup = prepare_merge(
        task_vectors, method, checked[0], coefficients, base=base, family=family, plan=plan, device=device,
        output=outputs[0], torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip
    if len(outputs) > 1:
        check_free_space({outputs[0]: len(outputs) * estimate_merge_bytes(setup.readers, setup.plan)}, "merged deltas")
    timings = dict(setup.timings)
    stream = merge_parameters_many(
        setup.entries, setup.readers, setup.method, checked, setup.coefficients, device=setup.device,
        progress=progress, timings=timings,
    )  # fmt: skip
    return write_merged(
        setup, outputs, checked, stream, max_shard_bytes=max_shard_bytes, timings=timings, t_start=t_start,
        record={"sweep": {"sets": len(outputs)}},
    )  # fmt: skip
