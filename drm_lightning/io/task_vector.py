"""The on-disk format of a task vector: the contract between the extraction callback and the merger.

A task vector is a folder::

    <folder>/
      task_vector.safetensors   backbone deltas (see below)
      head.safetensors          the task head's state dict (may be empty for heads-free models such as T5)
      meta.json                 see ``TaskVectorMeta``

Parameter names are those of the backbone's own ``state_dict()`` (the ``transformers`` model loaded by
``drm_lightning.models.backbone.load_backbone``), so ``W_0`` comes from that model under the same name.

``kind == "dense"``: one entry per backbone parameter that changed, ``name -> W_ft - W_0`` (float32 or the
training dtype). Parameters absent from the file have a zero delta (frozen ones).

``kind == "lora"``: for every adapted linear weight ``name`` (e.g. ``encoder.layer.0.attention.self.query.weight``)
two entries, ``name + ".lora_A"`` of shape ``[r, in]`` and ``name + ".lora_B"`` of shape ``[out, r]``; the delta is
``scale * lora_B @ lora_A`` with ``scale = meta.lora.scale`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
Other backbone parameters that the LoRA run also trained may appear as plain dense deltas under their own names.

Everything is safetensors and JSON: nothing executable is ever loaded.

``write_task_vector`` checks the free space first (``io.disk.check_free_space``) and writes inside
``io.atomic.atomic_dir``: the folder appears whole or not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from drm_lightning.io.atomic import atomic_dir
from drm_lightning.io.disk import check_free_space
from drm_lightning.io.json_file import read_json_object
from drm_lightning.io.safetensors import open_safetensors

FORMAT_VERSION = 1
DELTAS_FILE = "task_vector.safetensors"
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"
LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
#: Weight dtypes a base model may be loaded in (``ExpertModule(torch_dtype=...)``, ``meta.json["torch_dtype"]``).
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: What a task asks: one label per input, or one of several options per input (``meta.json["task_type"]``).
TASK_TYPES = ("classification", "multiple_choice")


class TaskVectorError(ValueError):
    """A task vector folder that cannot be used; the message names the file and the key or value at fault."""


@dataclass
class LoraMeta:
    """LoRA settings of an expert; ``scale`` multiplies ``B @ A``."""

    r: int
    alpha: float
    scale: float
    target_modules: list[str]
    dropout: float = 0.0


@dataclass
class TaskVectorMeta:
    """What ``meta.json`` holds.

    ``torch_dtype`` and ``gguf_file`` record how ``base_model`` was loaded for training (``None``: the checkpoint's
    own dtype, no GGUF file). The fingerprint is of the weights *as loaded*, so a consumer that reloads the base
    (merge, evaluation, ``ExpertModule.from_task_vector``) must load it the same way; they default to these values.
    Both are optional: a meta.json written before they existed reads as ``None``. ``task_type`` is
    ``classification`` or ``multiple_choice`` (a meta.json written before it existed reads as the former).

    ``source`` is set for experts imported from elsewhere (``drm_lightning.interop``): ``type`` (``transformers`` or
    ``peft``), ``path``, ``architectures``, ``config`` (the task model's config.json), ``head`` (the head layout and
    the mapping from the project head's parameters to the checkpoint's tensor names, or ``None`` with
    ``no_head_reason``) and what was left out. ``None`` for experts fitted here and for older task vectors.

    ``statistics`` describes the input Grams beside the deltas (``statistics.py``: file, kind, examples, rows per
    layer), ``None`` when none were recorded.
    """

    task: str
    kind: Literal["dense", "lora"]
    base_model: str
    base_fingerprint: str
    family: str = "encoder"
    torch_dtype: str | None = None
    gguf_file: str | None = None
    label_names: list[str] = field(default_factory=list)
    task_type: str = "classification"
    lora: LoraMeta | None = None
    head: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] | None = None
    statistics: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = META_FILE) -> TaskVectorMeta:
        data = dict(data)
        missing = [k for k in ("task", "kind", "base_model", "base_fingerprint") if k not in data]
        if missing:
            raise TaskVectorError(f"{source}: missing key(s) {missing}")
        if data["kind"] not in ("dense", "lora"):
            raise TaskVectorError(f"{source}: kind={data['kind']!r}, expected 'dense' or 'lora'")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskVectorError(f"{source}: unknown key(s) {unknown}")
        lora = data.get("lora")
        if data["kind"] == "lora":
            if not isinstance(lora, Mapping):
                raise TaskVectorError(f"{source}: kind='lora' needs a 'lora' section with r, alpha, scale")
            try:
                data["lora"] = LoraMeta(**lora)
            except TypeError as err:
                raise TaskVectorError(f"{source}: bad 'lora' section {dict(lora)}: {err}") from None
        elif lora is not None:
            data["lora"] = LoraMeta(**lora)
        dtype = data.get("torch_dtype")
        if dtype is not None and dtype not in TORCH_DTYPES:
            raise TaskVectorError(f"{source}: torch_dtype={dtype!r}, expected one of {TORCH_DTYPES} or null")
        task_type = data.get("task_type", "classification")
        if task_type not in TASK_TYPES:
            raise TaskVectorError(f"{source}: task_type={task_type!r}, expected one of {TASK_TYPES}")
        gguf = data.get("gguf_file")
        if gguf is not None and (not isinstance(gguf, str) or not gguf):
            raise TaskVectorError(f"{source}: gguf_file={gguf!r}, expected a file name or null")
        origin = data.get("source")
        if origin is not None and not isinstance(origin, Mapping):
            raise TaskVectorError(f"{source}: source={origin!r}, expected an object or null")
        stats = data.get("statistics")
        if stats is not None and not isinstance(stats, Mapping):
            raise TaskVectorError(f"{source}: statistics={stats!r}, expected an object or null")
        return cls(**data)

    def load_options(self, torch_dtype: str | None = None, gguf_file: str | None = None) -> dict[str, str | None]:
        """How to reload ``base_model``: the given values where not ``None``, else the recorded ones.

        Returns ``{"torch_dtype": ..., "gguf_file": ...}`` (dtype as its name), ready for ``load_backbone``.
        """
        return {
            "torch_dtype": torch_dtype if torch_dtype is not None else self.torch_dtype,
            "gguf_file": gguf_file if gguf_file is not None else self.gguf_file,
        }


def library_versions() -> dict[str, str]:
    """Versions recorded in meta.json / merge.json so results can be traced."""
    import importlib.metadata as md

    out = {}
    for name in ("drm_lightning", "torch", "lightning", "transformers", "peft", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Size of the safetensors file ``save_file(tensors)`` writes: the data plus a generous header estimate."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(len(name) + 96 for name in tensors) + 64
    return data + header


def write_task_vector(
    folder: str | os.PathLike[str],
    deltas: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    meta: TaskVectorMeta,
    *,
    extra: Callable[[Path], None] | None = None,
    extra_bytes: int = 0,
) -> Path:
    """Write a task vector folder atomically (all its files appear together or not at all).

    ``extra``: writes more files into the folder being built (given its temporary path), before ``meta.json``;
    ``extra_bytes`` is their size for the free-space check. What uses it:
    ``statistics.write_task_vector_with_statistics`` (the input Grams that ``meta.statistics`` describes), so this
    module does not import the statistics one.

    Raises:
        InsufficientSpaceError: before anything is written, when ``folder``'s filesystem lacks the room for the
            three files (the replaced folder, if any, is removed only after the new one is complete, so it does not
            count as free).
    """
    if meta.statistics is not None and extra is None:
        raise ValueError(f"task {meta.task!r}: statistics and meta.statistics must be given together")
    needed = safetensors_bytes(deltas) + safetensors_bytes(head) + len(meta.to_json().encode()) + extra_bytes
    check_free_space({folder: needed}, f"task vector of task {meta.task!r}")
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in deltas.items()}, str(tmp / DELTAS_FILE))
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(tmp / HEAD_FILE))
        if extra is not None:
            extra(tmp)
        (tmp / META_FILE).write_text(meta.to_json())
    return Path(folder)


def read_meta(folder: str | os.PathLike[str]) -> TaskVectorMeta:
    """Read and validate ``meta.json``; errors name the file."""
    path = Path(folder) / META_FILE
    data = read_json_object(path, error=TaskVectorError, hint=f"is {folder} a task vector folder?")
    return TaskVectorMeta.from_dict(data, source=str(path))


def read_head(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load the head's state dict (safetensors only)."""
    path = Path(folder) / HEAD_FILE
    with open_safetensors(path, error=TaskVectorError) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
