"""Validate a merge's inputs and plan it before any delta is read: ``prepare_merge`` -> ``MergeSetup``.

Why first and apart: every check is cheap next to a merge, so a typo in a method parameter fails in milliseconds,
not after loading a model; the single-process merge runs it once, the distributed merge on rank 0 and sends the
plan to the others. How the base is loaded (``torch_dtype``, ``gguf_file``) defaults to what the task vectors'
meta.json record, as their fingerprint is of the weights as loaded (``base_load_options``).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.statistics import missing_statistics_message
from drm_lightning.io.task_vector import HEAD_FILE, META_FILE, TaskVectorError, TaskVectorMeta
from drm_lightning.merging.engine.plan import MergePlan, PlanEntry, summarize
from drm_lightning.merging.engine.reader import TaskVectorReader
from drm_lightning.merging.engine.record import MERGE_FILE
from drm_lightning.merging.engine.space import check_merge_space
from drm_lightning.merging.methods.registry import get_method
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.models.backbone import check_family, dtype_name, load_backbone, parse_dtype
from drm_lightning.task_vectors.fingerprint import (
    fingerprint_matches,
    fingerprint_state,
    scheme_of,
    task_vector_fingerprint,
)
from drm_lightning.world import resolve_device

_SAFE_TASK = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass
class MergeSetup:
    """Everything validated and planned before any delta is read (see ``prepare_merge``)."""

    method: MergeMethod
    params: dict[str, Any]
    coefficients: list[float] | None
    readers: list[TaskVectorReader]
    base: str
    family: str
    base_fingerprint: str
    shapes: dict[str, tuple[int, ...]]
    plan: MergePlan
    entries: list[PlanEntry]
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    torch_dtype: str | None = None
    gguf_file: str | None = None

    def record(self) -> dict[str, Any]:
        """What ``merge.json`` says of this merge: the method and its parameters, the inputs, the base, the plan."""
        return {
            "method": self.method.name,
            "label": self.method.label,
            "params": self.params,
            "coefficients": self.coefficients,
            "base_model": self.base,
            "base_fingerprint": self.base_fingerprint,
            "family": self.family,
            "torch_dtype": self.torch_dtype,
            "gguf_file": self.gguf_file,
            "inputs": [
                {
                    "path": str(r.folder.resolve()),
                    "task": r.task,
                    "fingerprint": task_vector_fingerprint(r.folder),
                    "kind": r.meta.kind,
                    "base_fingerprint": r.meta.base_fingerprint,
                    "lora_r": r.meta.lora.r if r.meta.lora is not None else None,
                    "metrics": r.meta.metrics,
                }
                for r in self.readers
            ],
            "plan": asdict(self.plan),
            "rule_counts": summarize(self.entries),
            "device": str(self.device),
        }


def check_output(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse outputs that would clobber an input or a folder that is not ours, or that cannot be written."""
    resolved = output.resolve()
    for folder in inputs:
        f = folder.resolve()
        if resolved == f or f in resolved.parents or resolved in f.parents:
            raise ValueError(f"output={str(output)!r}: overlaps the input {str(folder)!r}")
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"output={str(output)!r}: exists and is not a folder")
        if any(output.iterdir()) and not (output / MERGE_FILE).is_file():
            raise ValueError(
                f"output={str(output)!r}: exists, is not empty and holds no {MERGE_FILE}; refusing to replace it"
            )
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output={str(output)!r}: {parent} is not writable")


def _check_coefficients(coefficients: Sequence[float] | None, num_tasks: int) -> list[float] | None:
    if coefficients is None:
        return None
    values = list(coefficients)
    if len(values) != num_tasks:
        raise ValueError(f"coefficients={values!r}: expected {num_tasks} values, one per task vector")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"coefficients={values!r}: {v!r} is not a finite number")
    return [float(v) for v in values]


def _check_fingerprints(readers: Sequence[TaskVectorReader]) -> list[str]:
    """The distinct base fingerprints the task vectors record: one per fingerprint scheme, or a ValueError.

    Why per scheme: a task vector written before the cheap ``sampled1`` scheme records a full hash of the same
    base, so the two strings differ although the base is one; each is checked against the loaded base instead.
    """
    first: dict[str, TaskVectorReader] = {}
    for reader in readers:
        recorded = reader.meta.base_fingerprint
        try:
            scheme = scheme_of(recorded)
        except ValueError as err:
            raise TaskVectorError(f"{reader.folder / META_FILE}: {err}") from None
        seen = first.setdefault(scheme, reader)
        if seen.meta.base_fingerprint != recorded:
            raise ValueError(
                f"task vectors disagree on their base model: {seen.folder} has base_fingerprint "
                f"{seen.meta.base_fingerprint} ({seen.meta.base_model}), {reader.folder} has "
                f"{recorded} ({reader.meta.base_model})"
            )
    return [r.meta.base_fingerprint for r in first.values()]


def base_load_options(
    metas: Sequence[TaskVectorMeta],
    folders: Sequence[str | os.PathLike[str]],
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> dict[str, str | None]:
    """How to load the task vectors' base: each explicit argument wins, else the value their meta.json records.

    Task vectors written before these fields existed record nothing and defer to the others (the fingerprint still
    catches a base loaded the wrong way); two different recorded values are refused, naming both folders.
    """
    explicit = {"torch_dtype": dtype_name(parse_dtype(torch_dtype)) if torch_dtype is not None else None}
    explicit["gguf_file"] = gguf_file
    out: dict[str, str | None] = {}
    for key, given in explicit.items():
        if given is not None:
            out[key] = given
            continue
        seen: dict[str, str] = {}
        for meta, folder in zip(metas, folders, strict=True):
            value = getattr(meta, key)
            if value is not None:
                seen.setdefault(value, str(folder))
        if len(seen) > 1:
            (a, fa), (b, fb) = list(seen.items())[:2]
            raise ValueError(
                f"task vectors disagree on how the base was loaded: {fa} has {key}={a!r}, {fb} has {key}={b!r}; "
                f"pass {key}= to choose"
            )
        out[key] = next(iter(seen), None)
    return out


def prepare_merge(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    params: Mapping[str, Any] | None = None,
    coefficients: Sequence[float] | None = None,
    *,
    base: str | None = None,
    family: str | None = None,
    plan: MergePlan | None = None,
    device: str | torch.device | None = None,
    output: str | os.PathLike[str] | None = None,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    base_state: Callable[[str, str, Mapping[str, str | None], Sequence[str]], Mapping[str, torch.Tensor]] | None = None,
    block_by_block: bool = False,
) -> MergeSetup:
    """Validate every input and plan the merge; reads headers and the base model, never a delta.

    The order is cheapest first, so a typo in a method parameter fails in milliseconds, not after loading a model:
    method and parameters, coefficients, device, output, every meta.json and safetensors header, fingerprint
    agreement between task vectors, free space for ``output`` (``check_merge_space``), then the base model's own
    fingerprint, and every key/shape against it. The base is loaded with ``torch_dtype`` / ``gguf_file``, by
    default the ones the task vectors record (``base_load_options``). ``base_state(base, family, load, expected)``,
    when given, loads it instead and returns the backbone's ``state_dict()`` (``model_folder.merge_to_model`` loads
    the whole base there once, and merges into it; ``expected``: the fingerprints the task vectors recorded, which
    the state is checked against here all the same). ``block_by_block``: the caller is ``evaluation/block_merge.py``,
    which runs the methods whose Grams depend on the merge (``MergeMethod.block_by_block``); every other caller gets
    them refused.

    Raises:
        ValueError: (or ``TaskVectorError``) naming the argument, file or key at fault.
        InsufficientSpaceError: ``output``'s filesystem clearly lacks room (an ``OSError``, ENOSPC).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    merge_method = get_method(method)
    if merge_method.block_by_block and not block_by_block:
        raise ValueError(block_by_block_message(merge_method.name))
    checked = dict(merge_method.check(dict(params or {})))
    folders = [Path(p) for p in task_vectors]
    if not folders:
        raise ValueError("task_vectors=[]: at least one task vector folder is needed")
    coeffs = _check_coefficients(coefficients, len(folders))
    dev = resolve_device(device)
    if output is not None:
        check_output(Path(output), folders)
    plan = plan if plan is not None else MergePlan()
    readers = [TaskVectorReader(f) for f in folders]
    seen: dict[str, Path] = {}
    for reader in readers:
        if not _SAFE_TASK.fullmatch(reader.task) or reader.task in (".", ".."):
            raise TaskVectorError(f"{reader.folder / META_FILE}: task={reader.task!r} is not a usable folder name")
        if reader.task in seen:
            raise ValueError(f"task vectors {seen[reader.task]} and {reader.folder} are both for task {reader.task!r}")
        seen[reader.task] = reader.folder
        if not (reader.folder / HEAD_FILE).is_file():
            raise TaskVectorError(f"{reader.folder / HEAD_FILE}: not found")
    if merge_method.needs_statistics and not merge_method.block_by_block:
        check_statistics(readers, merge_method.name)
    expected_fps = _check_fingerprints(readers)
    base_name = base if base is not None else readers[0].meta.base_model
    families = {r.meta.family for r in readers}
    if family is None:
        if len(families) > 1:
            raise ValueError(f"task vectors disagree on family {sorted(families)}; pass family=")
        family = families.pop()
    check_family(family)
    load = base_load_options([r.meta for r in readers], folders, torch_dtype, gguf_file)
    if output is not None:
        check_merge_space(readers, output, plan)

    state = (
        load_backbone(base_name, family, **load).state_dict()
        if base_state is None
        else base_state(base_name, family, load, expected_fps)
    )
    base_fp = fingerprint_state(state)
    mismatched = [fp for fp in expected_fps if not fingerprint_matches(state, fp)]
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    del state  # before any delta is read: the walk below must not hold the base model too
    if mismatched:
        raise ValueError(
            f"base model {base_name!r} {describe_load(load)} has fingerprint {base_fp}, but the task vectors were "
            f"taken against {mismatched[0]} ({readers[0].meta.base_model}): different weights, refusing to merge"
        )
    for reader in readers:
        reader.validate(shapes)
        if merge_method.needs_statistics and not merge_method.block_by_block:
            check_statistics_shapes(reader, shapes)
    present = set().union(*(r.names() for r in readers))
    entries = plan.entries(shapes, merge_method, present=present, num_tasks=len(readers))
    timings["load"] = time.perf_counter() - t0
    return MergeSetup(
        method=merge_method,
        params=checked,
        coefficients=coeffs,
        readers=readers,
        base=base_name,
        family=family,
        base_fingerprint=base_fp,
        shapes=shapes,
        plan=plan,
        entries=entries,
        device=dev,
        timings=timings,
        torch_dtype=load["torch_dtype"],
        gguf_file=load["gguf_file"],
    )


def block_by_block_message(method: str) -> str:
    """The one line for a method whose Grams depend on the merge (RegMean++) given to a merge without data."""
    return (
        f"method={method!r}: each layer's Grams are taken on the inputs the merged model's earlier layers produce, "
        "so it merges block by block with every task's training data; give the tasks: a pipeline recipe "
        f"(`method: {method}`) or `drm-lightning merge --method {method} --tasks [configs/task/<task>.yaml,...]`"
    )


def check_statistics(readers: Sequence[TaskVectorReader], method: str) -> None:
    """Every task vector records input statistics (``io/statistics.py``) for the same layers.

    Raises:
        TaskVectorError: a task vector without statistics (the message names the command that adds them), or one
            whose statistics file does not fit its meta.json (another expert's or another base's).
        ValueError: two task vectors that record Grams of different layers.
    """
    for reader in readers:
        if not reader.has_statistics():
            raise TaskVectorError(missing_statistics_message(reader.folder, method))
    first = readers[0]
    layers = set(first.statistics().rows)
    for reader in readers[1:]:
        other = set(reader.statistics().rows)
        if other != layers:
            differ = sorted(other ^ layers)
            raise ValueError(
                f"{reader.folder}: statistics record other layers than {first.folder}'s ({len(other)} vs "
                f"{len(layers)}; e.g. {differ[0]!r}); record both with the same settings"
            )


def check_statistics_shapes(reader: TaskVectorReader, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Each recorded Gram belongs to a 2-D base parameter and is ``[in, in]`` for it (no Gram is read)."""
    stats = reader.statistics()
    path = reader.folder / stats.file
    with open_safetensors(path) as f:
        gram_shapes = {name: list(f.get_slice(name).get_shape()) for name in stats.rows}
    for name in sorted(stats.rows):
        shape = shapes.get(name)
        if shape is None or len(shape) != 2:
            raise TaskVectorError(
                f"{path}: Gram of {name!r}, which is not a 2-D parameter of the base model {reader.meta.base_model!r}"
            )
        gram_shape = gram_shapes[name]
        if gram_shape != [shape[1], shape[1]]:
            raise TaskVectorError(
                f"{path}: Gram of {name!r} is {gram_shape}, the base parameter {list(shape)} takes [{shape[1]}, "
                f"{shape[1]}]: statistics of another model"
            )


def describe_load(load: Mapping[str, str | None]) -> str:
    """``"(loaded with torch_dtype='bfloat16')"``: how a base was loaded, for fingerprint-mismatch messages."""
    given = [f"{k}={v!r}" for k, v in load.items() if v is not None]
    return f"(loaded with {', '.join(given)})" if given else "(loaded in its checkpoint's dtype)"
