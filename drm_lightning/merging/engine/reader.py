"""Lazy, validated reading of one task vector's deltas, one parameter at a time.

Why lazy: a merge of T experts of an 8B model must never hold T models in memory. The reader keeps only the
safetensors header (names, shapes, dtypes, byte offsets; validated by ``safe_open`` when the reader is made) and
maps each tensor's pages when it is asked for (``io.safetensors.map_tensor``: a private mapping of that tensor only,
not of the file, so exactly its bytes are resident and only while the tensor lives).

Why validate here: a task vector taken against another model (or with a typo'd key) would otherwise merge silently
into garbage or fail deep inside a decomposition. Everything that the header alone can tell (unknown keys, shapes,
LoRA rank and pairing, dtypes) is checked by ``validate`` before any tensor is read; values (NaN/Inf) are checked
when each tensor is read. LoRA factors must also belong to modules that ``meta.json``'s ``lora.target_modules``
names: factors for other modules mean the metadata describes another adapter.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from drm_lightning.io.delta_reference import REFERENCE_FILE, DeltaReference, map_pair, read_reference, subtract
from drm_lightning.io.safetensors import (
    FLOAT_CODES,
    TensorInfo,
    map_tensor,
    open_safetensors,
    read_header,
    read_tensor,
)
from drm_lightning.io.statistics import StatisticsMeta, read_statistics_meta
from drm_lightning.io.task_vector import (
    DELTAS_FILE,
    HEAD_FILE,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    META_FILE,
    TaskVectorError,
    TaskVectorMeta,
    read_meta,
)
from drm_lightning.merging.ops.lowrank import LowRankDelta


def matches_lora_targets(module: str, targets: Sequence[str] | str) -> bool:
    """Whether ``peft`` would adapt ``module`` given ``target_modules=targets``.

    The rules of ``peft.tuners.tuners_utils.check_target_module_exists``: a string is a regular expression the
    whole module name must match; a list matches a module whose name equals one of its entries or ends with
    ``"." + entry``. ``module`` is a backbone module name, e.g. ``encoder.layer.0.attention.self.query``.

    Raises:
        re.error: ``targets`` is a string that is not a valid regular expression.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == target or module.endswith("." + target) for target in targets)


class TaskVectorReader:
    """One task vector folder: its ``meta.json`` and the header of its ``task_vector.safetensors`` (or, for a dense
    task vector held by reference, of the two checkpoints its ``reference.json`` names: ``io/delta_reference.py``).

    Args:
        folder: a folder written by ``drm_lightning.io.task_vector.write_task_vector`` (or
            ``interop.inputs.import_inputs(by_reference=True)``).

    Raises:
        TaskVectorError: missing/invalid meta.json, missing/corrupt safetensors (deltas or head; the message names
            the file), or keys that do not fit the task vector's kind (an unpaired LoRA factor, a ``.lora_A`` key in
            a dense task vector, a parameter given both densely and as LoRA factors, LoRA factors of a module
            outside meta.json's ``lora.target_modules``, or a ``target_modules`` that is neither a list of names
            nor a valid regular expression).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.meta: TaskVectorMeta = read_meta(self.folder)
        self.path = self.folder / DELTAS_FILE
        # a dense task vector held by reference (io/delta_reference.py): deltas taken from two checkpoints on read
        self._reference: dict[str, DeltaReference] = {}
        self._reference_dtype = torch.float32
        self._header: dict[str, TensorInfo]
        if not self.path.exists() and (self.folder / REFERENCE_FILE).is_file() and self.meta.kind == "dense":
            self.path = self.folder / REFERENCE_FILE
            self._reference, self._reference_dtype = read_reference(self.folder)
            self._header = {name: ref.tuned for name, ref in self._reference.items()}
        else:
            with open_safetensors(
                self.path, error=TaskVectorError
            ) as f:  # validates the header and the file length; names the file if not
                keys = set(f.keys())
            self._header = read_header(self.path, error=TaskVectorError)
            if set(self._header) != keys:
                raise TaskVectorError(f"{self.path}: header keys differ from what safetensors reads")
        # The head is only copied on by the merger, never parsed; checking its header here refuses a pickle (or any
        # non-safetensors file) under that name instead of passing it on into the merged folder.
        with open_safetensors(self.folder / HEAD_FILE, error=TaskVectorError):
            pass
        self._dense: dict[str, str] = {}
        self._lora: dict[str, tuple[str, str]] = {}
        self._group_keys()
        self._stats: tuple[StatisticsMeta, Path, dict[str, TensorInfo]] | None = None

    def has_statistics(self) -> bool:
        """Whether meta.json records input statistics (``io/statistics.py``)."""
        return self.meta.statistics is not None

    def statistics(self) -> StatisticsMeta:
        """The statistics section, checked against the statistics file's header on first use (no Gram read).

        Raises:
            TaskVectorError: none recorded, or a file that does not fit meta.json (``read_statistics_meta``).
        """
        if self._stats is None:
            stats = read_statistics_meta(self.folder, self.meta)
            path = self.folder / stats.file
            self._stats = (stats, path, read_header(path, error=TaskVectorError))
        return self._stats[0]

    def gram(self, name: str) -> torch.Tensor | None:
        """The per-row mean input Gram ``Σ x xᵀ / rows`` of weight ``name`` (float32 ``[in, in]``, CPU), read with
        one positioned read; ``None`` when no Gram is recorded for it.

        Raises:
            TaskVectorError: as ``statistics``, or NaN/Inf values (naming the file and key).
        """
        stats = self.statistics()
        assert self._stats is not None
        _, path, header = self._stats
        if name not in stats.rows:
            return None
        with open(path, "rb") as f:
            gram = read_tensor(f, header[name], name, error=TaskVectorError)
        check_finite(gram, f"{path}: key {name!r}")
        return gram.div_(stats.rows[name])

    def __repr__(self) -> str:
        return f"TaskVectorReader({str(self.folder)!r}, task={self.meta.task!r}, kind={self.meta.kind!r})"

    @property
    def task(self) -> str:
        return self.meta.task

    def _group_keys(self) -> None:
        lora_a = {k[: -len(LORA_A_SUFFIX)]: k for k in self._header if k.endswith(LORA_A_SUFFIX)}
        lora_b = {k[: -len(LORA_B_SUFFIX)]: k for k in self._header if k.endswith(LORA_B_SUFFIX)}
        if (lora_a or lora_b) and self.meta.kind != "lora":
            key = next(iter({**lora_a, **lora_b}.values()))
            raise TaskVectorError(f"{self.path}: key {key!r} is a LoRA factor but meta.json says kind='dense'")
        unpaired = sorted(set(lora_a) ^ set(lora_b))
        if unpaired:
            name = unpaired[0]
            have = lora_a.get(name) or lora_b.get(name)
            raise TaskVectorError(f"{self.path}: key {have!r} has no matching {LORA_A_SUFFIX}/{LORA_B_SUFFIX} factor")
        for key in self._header:
            if not key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
                self._dense[key] = key
        for name in lora_a:
            if name in self._dense:
                raise TaskVectorError(
                    f"{self.path}: parameter {name!r} is given both as a dense delta and as LoRA factors"
                )
            self._lora[name] = (lora_a[name], lora_b[name])
        self._check_targets()

    def _check_targets(self) -> None:
        """Every LoRA pair must adapt a module that meta.json's ``lora.target_modules`` selects (``peft`` rules)."""
        if not self._lora or self.meta.lora is None:
            return
        targets = self.meta.lora.target_modules
        where = f"{self.folder / META_FILE}: lora.target_modules={targets!r}"
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise TaskVectorError(f"{where} is not a valid regular expression: {err}") from None
        elif not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            raise TaskVectorError(f"{where}: expected a list of module names or a regular expression string")
        modules = {name: name.rpartition(".")[0] for name in sorted(self._lora)}  # "<module>.weight" -> "<module>"
        outside = [name for name, module in modules.items() if not matches_lora_targets(module, targets)]
        if outside:
            first = outside[0]
            last_parts = sorted({modules[name].rpartition(".")[2] for name in outside})
            raise TaskVectorError(
                f"{self.path}: key {self._lora[first][0]!r} adapts module {modules[first]!r}, which meta.json's "
                f"lora.target_modules={targets!r} does not select; {len(outside)} of {len(modules)} LoRA pairs are "
                f"outside it (modules named {last_parts}). A list entry matches a module name or its '.'-suffix; "
                "a string is a regular expression the whole module name must match"
            )

    def names(self) -> list[str]:
        """Base parameter names this task vector changes (LoRA pairs under their weight's name), sorted."""
        return sorted([*self._dense, *self._lora])

    def delta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Base parameter name -> the full shape of its delta, from the header (LoRA: ``[out, in]``), sorted."""
        shapes = {name: self._header[key].shape for name, key in self._dense.items()}
        for name, (key_a, key_b) in self._lora.items():
            shapes[name] = (self._header[key_b].shape[0], self._header[key_a].shape[-1])
        return dict(sorted(shapes.items()))

    def is_lowrank(self, name: str) -> bool:
        return name in self._lora

    def nbytes(self, name: str) -> int:
        """Bytes this task vector stores for ``name`` (0 if absent; by reference: its delta's): for memory accounting
        and logs."""
        if name in self._reference:
            return math.prod(self._header[name].shape) * self._reference_dtype.itemsize
        keys = self._lora.get(name) or ((self._dense[name],) if name in self._dense else ())
        return sum(self._header[key].nbytes for key in keys)

    def validate(self, base_shapes: Mapping[str, Sequence[int]]) -> None:
        """Check every key against the base model's parameters without reading any tensor.

        Raises:
            TaskVectorError: naming the file and the first offending keys.
        """
        unknown = [n for n in self.names() if n not in base_shapes]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5]) + (
                f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            )
            raise TaskVectorError(
                f"{self.path}: {len(unknown)} key(s) are not parameters of the base model {self.meta.base_model!r}: "
                f"{shown} (a typo, or a task vector of a different model?)"
            )
        for name in self.names():
            self._check_header(name, tuple(int(s) for s in base_shapes[name]))

    def _check_header(self, name: str, base_shape: tuple[int, ...]) -> None:
        if name in self._dense:
            shape, dtype = self._header[name].shape, self._header[name].dtype
            self._check_dtype(name, dtype)
            if shape != base_shape:
                raise TaskVectorError(
                    f"{self.path}: key {name!r} has shape {list(shape)}, base parameter has {list(base_shape)}"
                )
            return
        key_a, key_b = self._lora[name]
        info_a, info_b = self._header[key_a], self._header[key_b]
        (shape_a, dtype_a), (shape_b, dtype_b) = (info_a.shape, info_a.dtype), (info_b.shape, info_b.dtype)
        self._check_dtype(key_a, dtype_a)
        self._check_dtype(key_b, dtype_b)
        rank = self.meta.lora.r if self.meta.lora is not None else None
        if len(base_shape) != 2:
            raise TaskVectorError(f"{self.path}: key {key_a!r}: LoRA factors for a {len(base_shape)}-D base parameter")
        out_features, in_features = base_shape
        if len(shape_a) != 2 or shape_a[1] != in_features or shape_a[0] != rank:
            raise TaskVectorError(
                f"{self.path}: key {key_a!r} has shape {list(shape_a)}, expected [r={rank}, in={in_features}] "
                f"(meta.json lora.r={rank}, base parameter {list(base_shape)})"
            )
        if len(shape_b) != 2 or shape_b[0] != out_features or shape_b[1] != rank:
            raise TaskVectorError(
                f"{self.path}: key {key_b!r} has shape {list(shape_b)}, expected [out={out_features}, r={rank}] "
                f"(meta.json lora.r={rank}, base parameter {list(base_shape)})"
            )

    def _check_dtype(self, key: str, dtype: str) -> None:
        if dtype not in FLOAT_CODES:
            raise TaskVectorError(
                f"{self.path}: key {key!r} has dtype {dtype}, expected a float dtype {sorted(FLOAT_CODES)}"
            )

    def get(
        self, name: str, base_shape: Sequence[int], *, check: bool = True
    ) -> torch.Tensor | LowRankDelta | MappedReference | None:
        """The delta of ``name`` on CPU as stored (dense tensor or LoRA factors), or ``None`` for a zero delta.

        Args:
            check: look for NaN/Inf now (``check``); ``False`` leaves it to the caller, which must use what
                ``check(name, value)`` returns (the merge's read-ahead thread maps the delta, the merging thread
                checks it, so no arithmetic runs in two threads at once, each with its own OpenMP team fighting for
                the same cores). A delta by reference then comes as its two mapped tensors (``MappedReference``):
                ``check`` subtracts them.

        Raises:
            TaskVectorError: shape/rank mismatch with ``base_shape``, or NaN/Inf values (naming file and key).
        """
        base_shape = tuple(int(s) for s in base_shape)
        if name not in self._dense and name not in self._lora:
            return None
        self._check_header(name, base_shape)
        if name in self._reference:
            mapped = MappedReference(*map_pair(self._reference[name]))
            return self.check(name, mapped) if check else mapped
        keys = (self._dense[name],) if name in self._dense else self._lora[name]
        with open(self.path, "rb") as f:
            tensors = [map_tensor(f, self._header[key], key, error=TaskVectorError) for key in keys]
        if name in self._dense:
            delta: torch.Tensor | LowRankDelta = tensors[0]
        else:
            lora_a, lora_b = tensors
            assert self.meta.lora is not None  # _check_header verified the rank against it
            delta = LowRankDelta(lora_b, lora_a, float(self.meta.lora.scale))
        return self.check(name, delta) if check else delta

    def check(
        self, name: str, delta: torch.Tensor | LowRankDelta | MappedReference | None
    ) -> torch.Tensor | LowRankDelta | None:
        """``delta`` (``get(name, check=False)``'s value) once looked at for NaN and Inf: the same object, except a
        delta by reference, taken here (``W_ft − W_0`` and its range in one pass; ``None`` where it is all zero).

        Raises:
            TaskVectorError: NaN or Inf, naming the file and key (for a delta by reference: the fine-tuned file and
                tensor, and the base's tensor).
        """
        if delta is None:
            return None
        if isinstance(delta, MappedReference):
            taken, finite = subtract(delta.tuned, delta.base, self._reference_dtype)
            if not finite:
                ref = self._reference[name]
                raise TaskVectorError(
                    f"{ref.tuned.file}: tensor {ref.tuned_key!r} minus the base's {ref.base_key!r} ({name!r}) holds "
                    "NaN or Inf"
                )
            return taken
        if isinstance(delta, torch.Tensor):
            check_finite(delta, f"{self.path}: key {self._dense[name]!r}")
            return delta
        key_a, key_b = self._lora[name]
        check_finite(delta.A, f"{self.path}: key {key_a!r}")
        check_finite(delta.B, f"{self.path}: key {key_b!r}")
        return delta


@dataclass(frozen=True)
class MappedReference:
    """A delta by reference as ``TaskVectorReader.get(check=False)`` gives it: the fine-tuned and the base tensor,
    mapped from their files and not yet subtracted (``TaskVectorReader.check`` takes the delta)."""

    tuned: torch.Tensor
    base: torch.Tensor


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ``TaskVectorError`` if ``tensor`` holds NaN or Inf.

    Why the sum first: any NaN/Inf makes the sum non-finite, and one reduction is several times cheaper than an
    elementwise mask over every delta of every task; only a non-finite sum (or a finite tensor whose sum overflows)
    pays for the exact count.
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise TaskVectorError(f"{what} has {bad} non-finite value(s) (NaN or Inf)")
