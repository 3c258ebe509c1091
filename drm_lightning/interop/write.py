"""The writing half shared by both importers: the base loaded once, deltas streamed into a task-vector folder.

Why shared: a full fine-tune and a PEFT adapter differ in what they store, not in how a task vector is written.
Both hand over a plan (``ImportPlan``: which backbone parameters get a dense delta from which checkpoint tensor,
which LoRA factors, which head), checked before the base is loaded; ``write_import`` then checks the free space,
loads the base once (the only model in memory), fingerprints it, and streams one tensor at a time into
``task_vector.safetensors`` inside ``atomic_dir`` (the folder appears whole or not at all). Peak host memory: the
base model plus a few tensors of one parameter. Several experts of one base (``merge`` given model folders) share
one loaded base (``LoadedBase``) instead of loading and fingerprinting it once per expert.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from drm_lightning.interop.base import BaseInfo
from drm_lightning.interop.checkpoint import CheckpointError, SafetensorsFolder
from drm_lightning.interop.names import HeadMatch
from drm_lightning.interop.stored_base import LazyTensors, StoredBackbone
from drm_lightning.io.atomic import atomic_dir
from drm_lightning.io.delta_reference import finite_nonzero, write_reference
from drm_lightning.io.disk import check_free_space
from drm_lightning.io.safetensors import StreamingSafetensorsWriter
from drm_lightning.io.task_vector import (
    DELTAS_FILE,
    HEAD_FILE,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    META_FILE,
    LoraMeta,
    TaskVectorMeta,
    library_versions,
)
from drm_lightning.models.backbone import LABEL_WORD_FAMILIES, load_backbone
from drm_lightning.task_vectors.fingerprint import fingerprint_state

_SAFE_TASK = re.compile(r"[^A-Za-z0-9_.+-]+")


def task_name_for(folder: Path, task: str | None) -> str:
    """``task`` if given, else the folder's name made safe for a folder name (``heads/<task>/``)."""
    if task is not None:
        if not task or _SAFE_TASK.search(task) or task in (".", ".."):
            raise ValueError(f"task={task!r}: use letters, digits and _.+- only")
        return task
    last = folder.name if folder.name not in ("", ".", "..") else folder.resolve().name
    return _SAFE_TASK.sub("_", last).strip("._") or "task"


@dataclass
class ImportPlan:
    """What one import writes, decided from headers and configs alone.

    Attributes:
        dense: backbone name -> the stored fine-tuned weight (its safetensors and tensor name); the delta is it
            minus ``W_0``.
        whole_model: a fine-tuned model's plan (every ``dense`` weight a whole model's), which has a reference form
            (``write_reference_import``); an adapter's (its ``modules_to_save``) has none.
        lora: backbone weight name -> a function giving ``(A [r, in], B [out, r])`` in float32, scale folded in.
        lora_meta: the task vector's LoRA settings (``None`` for a dense task vector).
        head: the mapped head (or the reason there is none) and ``read``, checkpoint name -> tensor.
        label_names: the task's labels.
        source: ``meta.json["source"]``.
    """

    dense: dict[str, tuple[SafetensorsFolder, str]] = field(default_factory=dict)
    whole_model: bool = False
    lora: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    lora_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    lora_meta: LoraMeta | None = None
    head: HeadMatch = field(default_factory=HeadMatch)
    head_read: Callable[[str], torch.Tensor] | None = None
    label_names: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


def _estimate(plan: ImportPlan, info: BaseInfo) -> int:
    total = sum(math.prod(info.shapes[name]) * 4 for name in plan.dense)
    total += sum(math.prod(a) * 4 + math.prod(b) * 4 for a, b in plan.lora_shapes.values())
    return total + 4 * 1024**2


@dataclass(frozen=True)
class LoadedBase:
    """A base loaded for conversions: its ``state_dict()`` and fingerprint, and how it was loaded."""

    name: str
    family: str
    torch_dtype: str | None
    gguf_file: str | None
    state: dict[str, torch.Tensor]
    fingerprint: str

    def serves(self, info: BaseInfo, torch_dtype: str | None, gguf_file: str | None) -> bool:
        """Whether this is the base ``info`` describes, loaded the way the conversion asks."""
        wanted = (info.name, info.family, torch_dtype, gguf_file)
        return wanted == (self.name, self.family, self.torch_dtype, self.gguf_file)


def load_base(info: BaseInfo, *, torch_dtype: str | None = None, gguf_file: str | None = None) -> LoadedBase:
    """Load the base ``info`` describes (``from_pretrained``, as the merge does) and fingerprint it."""
    model = load_backbone(info.name, info.family, torch_dtype=torch_dtype, gguf_file=gguf_file)
    state = model.state_dict()
    return LoadedBase(info.name, info.family, torch_dtype, gguf_file, state, fingerprint_state(state))


def write_import(
    plan: ImportPlan,
    info: BaseInfo,
    output: str | os.PathLike[str],
    task: str,
    *,
    torch_dtype: str | None = None,
    gguf_file: str | None = None,
    notes: bool = True,
    loaded: LoadedBase | None = None,
) -> Path:
    """Load the base, stream the deltas and write the task-vector folder ``output`` atomically; ``notes``: say on
    stderr what was left out (``import_notes``), else the caller says it once for all its experts; ``loaded``: the
    base already loaded (``load_base``) when it ``serves`` this conversion, else it is loaded here."""
    output = Path(output)
    check_free_space({output: _estimate(plan, info)}, f"task vector of task {task!r}")
    if loaded is None or not loaded.serves(info, torch_dtype, gguf_file):
        loaded = load_base(info, torch_dtype=torch_dtype, gguf_file=gguf_file)
    state = loaded.state
    for name in plan.dense:
        if name not in state or tuple(state[name].shape) != info.shapes[name]:
            raise CheckpointError(f"{info.name}: loads without the parameter {name!r} its config.json describes")
    base_fp = loaded.fingerprint
    candidates = [(name, info.shapes[name], _delta_dtype(state[name])) for name in plan.dense]
    for name, (shape_a, shape_b) in plan.lora_shapes.items():
        candidates += [(name + LORA_A_SUFFIX, shape_a, torch.float32), (name + LORA_B_SUFFIX, shape_b, torch.float32)]
    zero = 0
    with atomic_dir(output) as tmp:
        with StreamingSafetensorsWriter(tmp / DELTAS_FILE, candidates) as writer:
            for name, (files, key) in plan.dense.items():
                tuned = files.map(key)  # read, subtracted from the base, dropped
                dtype = _delta_dtype(state[name])
                delta = tuned.to(dtype) - state[name].detach().to(dtype)
                del tuned
                finite, nonzero = finite_nonzero(delta)
                if not finite:
                    raise CheckpointError(f"{plan.source.get('path')}: tensor for {name!r} holds NaN or Inf")
                if nonzero:
                    writer.add(name, delta)
                else:
                    zero += 1
                del delta
            for name, read in plan.lora.items():
                factor_a, factor_b = read()
                writer.add(name + LORA_A_SUFFIX, factor_a)
                writer.add(name + LORA_B_SUFFIX, factor_b)
        _write_head_and_meta(tmp, plan, info, task, base_fp, torch_dtype, gguf_file, unchanged=zero)
    del loaded, state
    if notes:
        for line in import_notes([(task, plan, info)], evaluates=True):
            print(f"{output}: {line}", file=sys.stderr)
    return output


def write_reference_import(
    plan: ImportPlan,
    info: BaseInfo,
    output: str | os.PathLike[str],
    task: str,
    stored: StoredBackbone,
    *,
    torch_dtype: str | None = None,
) -> Path:
    """``write_import``'s folder for a fine-tuned model whose base ``stored`` stands for its backbone, with the
    deltas held by reference (``io/delta_reference.py``: ``reference.json`` names, per parameter, the fine-tuned and
    the base tensor) instead of written: no base is loaded and no delta is computed here; the merge takes each one
    when it reads the parameter, with the same arithmetic. Parameters the fine-tune left unchanged are found then
    (``meta.json["source"]["unchanged"]`` is ``None``). An adapter's plan is refused (its factors are small and
    written as they are)."""
    if not plan.whole_model:
        raise ValueError(f"task {task!r}: only a fine-tuned model's plan has a reference form, not an adapter's")
    output = Path(output)
    codes = {stored.weights.tensors[key].dtype for key in stored.keys.values()}
    dtype = torch.float64 if "F64" in codes else torch.float32  # _delta_dtype of a base of one float dtype
    tensors = {}
    for name, (files, key) in plan.dense.items():
        base_key = stored.keys[name]
        tensors[name] = (files.tensors[key].file, key, stored.weights.tensors[base_key].file, base_key)
    reads = {name: functools.partial(files.map, key) for name, (files, key) in plan.dense.items()}
    tuned = fingerprint_state(LazyTensors(reads))  # what the folder holds: which weights, not only where
    with atomic_dir(output) as tmp:
        write_reference(tmp, tensors, dtype, tuned)
        _write_head_and_meta(tmp, plan, info, task, stored.fingerprint, torch_dtype, None, unchanged=None)
    return output


def _write_head_and_meta(
    tmp: Path,
    plan: ImportPlan,
    info: BaseInfo,
    task: str,
    base_fingerprint: str,
    torch_dtype: str | None,
    gguf_file: str | None,
    *,
    unchanged: int | None,
) -> None:
    """The head (``head.safetensors``, empty where there is none) and ``meta.json`` of an import, into ``tmp``."""
    head = plan.head.tensors(plan.head_read) if plan.head.config and plan.head_read is not None else {}
    save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / HEAD_FILE))
    meta = TaskVectorMeta(
        task=task,
        kind="lora" if plan.lora_meta is not None else "dense",
        base_model=info.name,
        base_fingerprint=base_fingerprint,
        family=info.family,
        torch_dtype=torch_dtype,
        gguf_file=gguf_file,
        label_names=list(plan.label_names),
        lora=plan.lora_meta,
        head=dict(plan.head.config),
        versions=library_versions(),
        source={**plan.source, "unchanged": unchanged},
    )
    (tmp / META_FILE).write_text(meta.to_json())


def import_notes(imports: Sequence[tuple[str, ImportPlan, BaseInfo]], evaluates: bool) -> list[str]:
    """What converting these ``(task, plan, base info)`` left out, said once for all of them: tensors outside the
    backbone and head (the same set for every expert: one line), and the tasks without a head (one line: when the
    run ``evaluates``, a λ search or an evaluation, that they cannot be scored; otherwise only that they merge
    without a classifier of their own).

    Why grouped: merging eight plain ``BertModel`` fine-tunes printed both lines eight times, the second one in a
    ``merge`` that evaluated nothing (docs/interop.md says what happens to a fine-tuned pooler).
    """
    lines = []
    dropped: dict[tuple[str, ...], list[str]] = {}
    for task, plan, _ in imports:
        names = tuple(plan.source.get("dropped") or ())
        if names:
            dropped.setdefault(names, []).append(task)
    for names, tasks in dropped.items():
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        whose = f"task {tasks[0]!r}" if len(tasks) == 1 else f"{len(tasks)} tasks ({', '.join(tasks)})"
        lines.append(f"left out {len(names)} tensor(s) outside the backbone and head of {whose}: {shown}")
    headless = [(task, plan.head.reason) for task, plan, info in imports
                if not plan.head.config and info.family not in LABEL_WORD_FAMILIES]  # fmt: skip  # label words: no head
    if headless:
        names = ", ".join(repr(t) for t, _ in headless)
        who = f"task {names} has" if len(headless) == 1 else f"tasks {names} have"
        reasons = "; ".join(sorted({reason for _, reason in headless}))
        then = "they merge, but are not evaluated" if evaluates else "merged into the backbone, with no classifier"
        lines.append(f"{who} no head ({reasons}): {then}")
    return lines


def _delta_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 deltas (float64 for a float64 base): the difference of two bf16 weights is exact in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def head_source(head: HeadMatch) -> dict[str, Any] | None:
    """``meta.json["source"]["head"]``: the layout and mapping, or ``None`` when there is no usable head."""
    if not head.config:
        return None
    return {"layout": head.layout, "mapping": dict(head.mapping), "zeros": list(head.zeros)}
