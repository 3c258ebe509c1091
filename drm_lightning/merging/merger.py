"""Streaming merge of whole models: T task vectors in, one merged delta out, one parameter at a time.

Why streaming: holding T fine-tuned 8B models at once needs T·32 GB. Here host memory stays bounded by one
parameter's T deltas plus one output shard: each parameter's deltas are read lazily (``TaskVectorReader``), moved to
the merge device (CUDA when there is one), merged by the rule the ``MergePlan`` gives it, and the float32 result is
appended to a shard that is flushed to disk as soon as it fills.

Why a merged *delta* rather than merged weights: the merged weight is ``W_0 + λ·Δ_merged`` and λ is searched on
validation data. ``merge_task_vectors`` computes Δ_merged once (the expensive part); ``apply_merged_delta`` adds
``λ·Δ_merged`` to the base for each λ, in memory or into a ``save_pretrained`` folder.

Output folder of ``merge_task_vectors``::

    <output>/
      merged_delta/delta-00001.safetensors ...   float32 Δ_merged, sharded
      merged_delta/delta.safetensors.index.json  {"metadata": {"total_size": ...}, "weight_map": {name: shard}}
      merge.json                                 method, params, inputs, base model and fingerprint, timings, ...
      heads/<task>/{head.safetensors,meta.json}  each expert's head, so the merged backbone can be evaluated

Free space: before the base model is loaded, ``prepare_merge`` checks that the output's filesystem can hold the
merged delta and the heads (``check_merge_space``; the estimate, ``estimate_merge_bytes``, is exact up to the
safetensors headers: float32 for every merged parameter, whatever the task vectors' dtype), and ``apply_merged_delta``
that the model folder fits (``estimate_model_bytes`` from the base checkpoint's headers in the loading dtype, then
the loaded model itself). ``atomic_dir`` writes into a temporary sibling and a replaced output is removed only after
the new one is complete, so a previous output's space never counts as free. The probe is
``drm_lightning.task_vectors.format.disk_free_bytes`` (tests replace it to simulate a small disk).

How the base is loaded (``torch_dtype``, ``gguf_file``) defaults to what the task vectors' meta.json record, as their
fingerprint is of the weights as loaded; ``merge.json`` records it in turn for ``apply_merged_delta``.

Multi-process merging builds on the pieces: ``prepare_merge`` on every rank (cheap validation, the plan with
costs), ``merge_parameters`` on each rank's share of the plan entries, ``ShardWriter`` per rank (distinct
``prefix``), and ``write_merge_record`` on rank 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from drm_lightning.merging.lowrank import LowRankDelta
from drm_lightning.merging.plan import MergePlan, PlanEntry, summarize
from drm_lightning.merging.reader import TaskVectorReader
from drm_lightning.merging.registry import MergeMethod, get_method
from drm_lightning.models.backbone import check_family, dtype_name, load_backbone, parse_dtype
from drm_lightning.models.fingerprint import fingerprint, fingerprint_matches
from drm_lightning.models.resolve import resolve_pretrained
from drm_lightning.task_vectors.format import (
    HEAD_FILE,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    META_FILE,
    TaskVectorError,
    TaskVectorMeta,
    atomic_dir,
    check_free_space,
    library_versions,
    open_safetensors,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MERGED_DIR = "merged_delta"
INDEX_FILE = "delta.safetensors.index.json"
MERGE_FILE = "merge.json"
HEADS_DIR = "heads"
MERGE_FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 500 * 1000**2

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")
_SAFE_TASK = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass
class MergeResult:
    """What ``merge_task_vectors`` did.

    Attributes:
        output: the merged folder.
        method: the registry name of the method.
        label: its display label.
        params: the method's parameters after defaults and validation.
        coefficients: per-task coefficients (``None``: all 1).
        timings: seconds spent per phase (``load``, ``read``, ``matrix``, ``elementwise``, ``write``, ``total``).
        rule_counts: number of parameters per plan rule (``matrix``, ``elementwise``, ``skip``).
        merged_parameters: parameters with a non-absent merged delta.
        device: the device the merge ran on.
    """

    output: Path
    method: str
    label: str
    params: dict[str, Any]
    coefficients: list[float] | None
    timings: dict[str, float]
    rule_counts: dict[str, int]
    merged_parameters: int
    device: str

    @classmethod
    def from_setup(
        cls, setup: MergeSetup, output: Path, timings: dict[str, float], merged_parameters: int, device: str
    ) -> MergeResult:
        """The result of a merge planned by ``setup``; one constructor for the single-process and distributed paths."""
        return cls(
            output=output,
            method=setup.method.name,
            label=setup.method.label,
            params=setup.params,
            coefficients=setup.coefficients,
            timings=timings,
            rule_counts=summarize(setup.entries),
            merged_parameters=merged_parameters,
            device=device,
        )


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA if available, else CPU; a CUDA device that is not there is refused up front."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    return dev


def _check_output(output: Path, inputs: Sequence[Path]) -> None:
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
    from drm_lightning.models.fingerprint import scheme_of

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


def _delta_shapes(reader: TaskVectorReader) -> dict[str, tuple[int, ...]]:
    """Base parameter name -> the full shape of its delta, from the safetensors header (LoRA: ``[out, in]``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    with open_safetensors(reader.path) as f:
        header = {key: tuple(int(n) for n in f.get_slice(key).get_shape()) for key in f.keys()}
    for key, shape in header.items():
        if key.endswith(LORA_A_SUFFIX):
            partner = header.get(key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX)
            if partner is not None and len(shape) == 2 and len(partner) == 2:
                shapes[key[: -len(LORA_A_SUFFIX)]] = (partner[0], shape[1])
        elif not key.endswith(LORA_B_SUFFIX):
            shapes[key] = shape
    return shapes


def _readers(task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]]) -> list[TaskVectorReader]:
    return [tv if isinstance(tv, TaskVectorReader) else TaskVectorReader(tv) for tv in task_vectors]


def heads_bytes(task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]]) -> int:
    """Bytes of the ``heads/<task>/`` copies a merged folder (and a merged model folder) holds."""
    return sum((r.folder / name).stat().st_size for r in _readers(task_vectors) for name in (HEAD_FILE, META_FILE))


def estimate_merge_bytes(
    task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]], plan: MergePlan | None = None
) -> int:
    """Bytes ``merge_task_vectors`` writes for these task vectors: Δ_merged, its index, the heads, merge.json.

    From the safetensors headers alone (no tensor, no base model is read): every parameter some task changes and
    the plan does not skip gets one float32 tensor of its full shape (LoRA pairs too: Δ_merged is dense), whatever
    dtype the task vectors store. Headers, the index and merge.json are bounded generously.
    """
    readers = _readers(task_vectors)
    plan = plan if plan is not None else MergePlan()
    shapes: dict[str, tuple[int, ...]] = {}
    for reader in readers:
        for name, shape in _delta_shapes(reader).items():
            shapes.setdefault(name, shape)
    total = 0
    for name, shape in shapes.items():
        if plan.rule(name, shape, False) == "skip":
            continue
        total += math.prod(shape) * torch.float32.itemsize
        total += 2 * len(name) + 160  # its shard-header entry and its index line
    record = 16 * 1024 + sum(len(str(r.folder.resolve())) + 1024 for r in readers)
    return total + heads_bytes(readers) + record


def check_merge_space(
    task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]],
    output: str | os.PathLike[str],
    plan: MergePlan | None = None,
    *,
    copies: int = 1,
) -> int:
    """Refuse (``InsufficientSpaceError``) a merge whose output clearly will not fit; return the bytes estimated.

    Args:
        task_vectors: the inputs (folders or readers).
        output: the merged folder to be written.
        plan: the merge plan (skipped parameters take no space).
        copies: copies of Δ_merged on ``output``'s filesystem at the peak: 1 for ``merge_task_vectors`` (it writes
            once, into a temporary sibling renamed into place); 2 for a distributed merge that stages per-rank
            shards beside the output and rewrites them into it (``layout="canonical"``).
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies={copies!r}: expected a positive integer")
    readers = _readers(task_vectors)
    heads = heads_bytes(readers)
    delta = estimate_merge_bytes(readers, plan) - heads
    needed = copies * delta + heads
    check_free_space({output: needed}, "merged delta")
    return needed


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
) -> MergeSetup:
    """Validate every input and plan the merge; reads headers and the base model, never a delta.

    The order is cheapest first, so a typo in a method parameter fails in milliseconds, not after loading a model:
    method and parameters, coefficients, device, output, every meta.json and safetensors header, fingerprint
    agreement between task vectors, free space for ``output`` (``check_merge_space``), then the base model's own
    fingerprint, and every key/shape against it. The base is loaded with ``torch_dtype`` / ``gguf_file``, by
    default the ones the task vectors record (``base_load_options``).

    Raises:
        ValueError: (or ``TaskVectorError``) naming the argument, file or key at fault.
        InsufficientSpaceError: ``output``'s filesystem clearly lacks room (an ``OSError``, ENOSPC).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    merge_method = get_method(method)
    checked = dict(merge_method.check(dict(params or {})))
    folders = [Path(p) for p in task_vectors]
    if not folders:
        raise ValueError("task_vectors=[]: at least one task vector folder is needed")
    coeffs = _check_coefficients(coefficients, len(folders))
    dev = resolve_device(device)
    if output is not None:
        _check_output(Path(output), folders)
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

    model = load_backbone(base_name, family, **load)
    base_fp = fingerprint(model)
    mismatched = [fp for fp in expected_fps if not fingerprint_matches(model, fp)]
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    del model  # before any delta is read: the walk below must not hold the base model too
    if mismatched:
        raise ValueError(
            f"base model {base_name!r} {_loaded_as(load)} has fingerprint {base_fp}, but the task vectors were taken "
            f"against {mismatched[0]} ({readers[0].meta.base_model}): different weights, refusing to merge"
        )
    for reader in readers:
        reader.validate(shapes)
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


def _loaded_as(load: Mapping[str, str | None]) -> str:
    """``"(loaded with torch_dtype='bfloat16')"``: how a base was loaded, for fingerprint-mismatch messages."""
    given = [f"{k}={v!r}" for k, v in load.items() if v is not None]
    return f"(loaded with {', '.join(given)})" if given else "(loaded in its checkpoint's dtype)"


def _to_device(delta: torch.Tensor | LowRankDelta, device: torch.device) -> torch.Tensor | LowRankDelta:
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(delta.B.to(device), delta.A.to(device), delta.scale)
    return delta.to(device)


def _prepare_deltas(
    deltas: list[torch.Tensor | LowRankDelta | None], shape: tuple[int, ...], rule: str, device: torch.device
) -> list[torch.Tensor] | list[LowRankDelta]:
    """Move one parameter's deltas to ``device``; keep LoRA factored only where the matrix rule sees all factored.

    An absent delta (a task that did not change this parameter) becomes a zero tensor, so the coefficients stay
    aligned with the tasks; mixed factored/dense/absent lists are made dense, one dtype (float32 or wider).
    """
    if rule == "matrix" and all(isinstance(d, LowRankDelta) for d in deltas):
        return [_to_device(d, device) for d in deltas]  # type: ignore[arg-type]
    dtypes = [d.dtype for d in deltas if d is not None]
    dtype = torch.float32
    for dt in dtypes:
        dtype = torch.promote_types(dtype, dt)
    out = []
    for d in deltas:
        if d is None:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
        elif isinstance(d, LowRankDelta):
            out.append(_to_device(d, device).dense(dtype))
        else:
            out.append(d.to(device, dtype))
    return out


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: the walk allocates and frees thousands of parameter-sized blocks; below glibc's mmap threshold (up to
    32 MB) freed blocks stay in the heap, so after a merge the process can keep most of a model's worth of memory
    it no longer uses, which a following ``apply_merged_delta`` or evaluation in the same process then stacks on.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def merge_parameters(
    entries: Sequence[PlanEntry],
    readers: Sequence[TaskVectorReader],
    method: MergeMethod,
    params: Mapping[str, Any],
    coefficients: Sequence[float] | None = None,
    *,
    device: torch.device,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge the given plan entries one at a time; yield ``(name, Δ_merged)`` as contiguous float32 CPU tensors.

    Why a generator over a subset: the caller decides where results go (a shard writer, a collective), and a
    distributed caller passes only its rank's share of the entries. Skipped entries and parameters that no task
    changes yield nothing (their merged delta is absent, i.e. zero).

    Args:
        entries: plan entries (``MergePlan.entries``) to merge, in order.
        readers: the task vectors, in the order of ``coefficients``.
        method: the registry method; ``params`` are its checked parameters.
        device: where the math runs.
        progress: show a tqdm bar of parameters merged.
        timings: accumulates seconds under ``read``, ``matrix`` and ``elementwise`` when given.
    """
    timings = timings if timings is not None else {}
    for key in ("read", "matrix", "elementwise"):
        timings.setdefault(key, 0.0)
    work = [e for e in entries if e.rule != "skip"]
    bar = tqdm(work, desc=f"merge {method.label}", unit="param", disable=not progress)
    for entry in bar:
        t0 = time.perf_counter()
        raw = [reader.get(entry.name, entry.shape) for reader in readers]
        if all(d is None for d in raw):
            timings["read"] += time.perf_counter() - t0
            continue
        deltas = _prepare_deltas(raw, entry.shape, entry.rule, device)
        del raw
        _sync(device)
        t1 = time.perf_counter()
        timings["read"] += t1 - t0
        fn = method.merge_matrix if entry.rule == "matrix" else method.merge_elementwise
        merged = fn(
            deltas, coefficients=None if coefficients is None else list(coefficients), out_dtype=torch.float32, **params
        )
        del deltas
        merged = merged.detach().to("cpu", torch.float32).contiguous()
        _sync(device)
        timings[entry.rule] += time.perf_counter() - t1
        if tuple(merged.shape) != entry.shape:
            raise RuntimeError(
                f"{method.name} returned shape {list(merged.shape)} for {entry.name!r} of shape {list(entry.shape)}"
            )
        if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):  # sum: cheap pass
            raise ValueError(f"{method.name} with params {dict(params)} gave non-finite values for {entry.name!r}")
        yield entry.name, merged


class ShardWriter:
    """Append tensors to safetensors shards under ``folder``, flushing each shard as soon as it holds
    ``max_shard_bytes``; ``close`` writes the index. Memory: at most one shard's tensors.

    Args:
        folder: created if missing.
        max_shard_bytes: flush threshold (a single larger tensor gets a shard of its own).
        prefix: shard file prefix; distinct per rank when several processes write into one folder.
    """

    def __init__(
        self, folder: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, prefix: str = "delta"
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self.prefix = prefix
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._pending:
            raise ValueError(f"ShardWriter: tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_size += nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending tensors as the next shard and drop them from memory."""
        if not self._pending:
            return
        self._shards += 1
        filename = f"{self.prefix}-{self._shards:05d}.safetensors"
        save_file(self._pending, str(self.folder / filename), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self._pending, filename))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> dict[str, str]:
        """Flush and write ``INDEX_FILE``; return the weight map (name -> shard file)."""
        self.flush()
        write_index(self.folder, self.weight_map, self.total_size)
        return dict(self.weight_map)


def write_index(folder: str | os.PathLike[str], weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write the shard index (HF ``*.safetensors.index.json`` layout, keys sorted for byte-identical output)."""
    path = Path(folder) / INDEX_FILE
    data = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def iter_merged_delta(merged: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, Δ_merged)`` from a merged folder, one shard open at a time (bounded memory)."""
    folder = Path(merged) / MERGED_DIR
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ValueError(f"{index_path}: not found (is {merged} a folder written by merge_task_vectors?)")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path}: not a shard index ({err!r})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if Path(shard).name != shard:
            raise ValueError(f"{index_path}: shard {shard!r} of {name!r} is not a plain file name")
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        with open_safetensors(folder / shard) as f:
            keys = set(f.keys())
            for name in sorted(by_shard[shard]):
                if name not in keys:
                    raise ValueError(f"{folder / shard}: key {name!r} listed in {INDEX_FILE} is missing")
                yield name, f.get_tensor(name)


def read_merge_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``merge.json`` of a merged (or applied) folder."""
    path = Path(folder) / MERGE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {folder} a folder written by merge_task_vectors?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    missing = [k for k in ("method", "base_model", "base_fingerprint", "family") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return data


def copy_heads(readers: Sequence[TaskVectorReader], folder: str | os.PathLike[str]) -> None:
    """Copy each task's ``head.safetensors`` and ``meta.json`` to ``folder/heads/<task>/``."""
    for reader in readers:
        dest = Path(folder) / HEADS_DIR / reader.task
        dest.mkdir(parents=True, exist_ok=True)
        for name in (HEAD_FILE, META_FILE):
            shutil.copyfile(reader.folder / name, dest / name)


def write_merge_record(
    folder: str | os.PathLike[str],
    setup: MergeSetup,
    timings: Mapping[str, float],
    merged_parameters: int,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``merge.json``: what was merged, how, from what, against which base, how long it took."""
    record: dict[str, Any] = {
        "format_version": MERGE_FORMAT_VERSION,
        "method": setup.method.name,
        "label": setup.method.label,
        "params": setup.params,
        "coefficients": setup.coefficients,
        "base_model": setup.base,
        "base_fingerprint": setup.base_fingerprint,
        "family": setup.family,
        "torch_dtype": setup.torch_dtype,
        "gguf_file": setup.gguf_file,
        "inputs": [
            {
                "path": str(r.folder.resolve()),
                "task": r.task,
                "kind": r.meta.kind,
                "base_fingerprint": r.meta.base_fingerprint,
                "lora_r": r.meta.lora.r if r.meta.lora is not None else None,
                "metrics": r.meta.metrics,
            }
            for r in setup.readers
        ],
        "plan": asdict(setup.plan),
        "rule_counts": summarize(setup.entries),
        "merged_parameters": merged_parameters,
        "timings": {k: round(float(v), 6) for k, v in timings.items()},
        "device": str(setup.device),
        "versions": library_versions(),
        **extra,
    }
    (Path(folder) / MERGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record


def check_max_shard_bytes(max_shard_bytes: int) -> None:
    """Reject a shard size that is not a positive integer (bools too) before any file is read or written."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: expected a positive number of bytes")


def merge_task_vectors(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
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
) -> MergeResult:
    """Merge T task vectors with ``method`` into ``output`` (see the module docstring for its layout).

    Everything cheap is validated before any delta is read (``prepare_merge``); the output is written atomically,
    so an error or a crash mid-merge leaves nothing at ``output``.

    Args:
        task_vectors: task vector folders (``format.write_task_vector``), all of one base model.
        method: a registry name (``drm_lightning.merging.registry.METHODS``).
        output: the merged folder to write (replaced if it is a previous merge output).
        params: the method's parameters (defaults filled in, validated up front).
        coefficients: per-task c_i (default all 1).
        base: the base model (hub id, folder, ``package://``); default: the task vectors' ``base_model``.
        family: the ``load_backbone`` family; default: the task vectors' ``family``.
        plan: which parameters get the matrix rule (default ``MergePlan()``).
        device: where the math runs (default CUDA if available, else CPU).
        progress: a tqdm bar of parameters merged.
        max_shard_bytes: size at which an output shard is flushed.
        torch_dtype, gguf_file: how to load the base; default: what the task vectors' meta.json record.

    Returns:
        A ``MergeResult``.

    Raises:
        InsufficientSpaceError: before the base is loaded, when ``output``'s filesystem clearly lacks room.
    """
    t_start = time.perf_counter()
    check_max_shard_bytes(max_shard_bytes)
    setup = prepare_merge(
        task_vectors, method, params, coefficients, base=base, family=family, plan=plan, device=device, output=output,
        torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip
    timings = dict(setup.timings)
    merged_count = 0
    with atomic_dir(output) as tmp:
        writer = ShardWriter(tmp / MERGED_DIR, max_shard_bytes)
        stream = merge_parameters(
            setup.entries,
            setup.readers,
            setup.method,
            setup.params,
            setup.coefficients,
            device=setup.device,
            progress=progress,
            timings=timings,
        )
        timings["write"] = 0.0
        for name, delta in stream:
            t0 = time.perf_counter()
            writer.add(name, delta)
            del delta
            timings["write"] += time.perf_counter() - t0
            merged_count += 1
        t0 = time.perf_counter()
        writer.close()
        release_freed_memory()
        copy_heads(setup.readers, tmp)
        timings["write"] += time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        write_merge_record(tmp, setup, timings, merged_count, lam=None)
    return MergeResult.from_setup(setup, Path(output), timings, merged_count, str(setup.device))


@torch.no_grad()
def add_merged_delta(model: torch.nn.Module, merged: str | os.PathLike[str], lam: float) -> torch.nn.Module:
    """Add ``lam · Δ_merged`` to ``model``'s weights in place, streaming Δ_merged shard by shard.

    Tied weights (one tensor under two names) are updated once. Non-float32 weights are updated in float32 and
    rounded once, so bf16 bases do not accumulate two roundings.

    Raises:
        ValueError: a merged key that is not a parameter of ``model``, or a shape that differs.
    """
    lam = _check_lam(lam)
    state = model.state_dict(keep_vars=True)
    done: set[tuple[int, int]] = set()
    for name, delta in iter_merged_delta(merged):
        if name not in state:
            raise ValueError(f"{Path(merged) / MERGED_DIR}: key {name!r} is not a parameter of the base model")
        target = state[name]
        target = target.data if isinstance(target, torch.nn.Parameter) else target
        if tuple(target.shape) != tuple(delta.shape):
            raise ValueError(
                f"{Path(merged) / MERGED_DIR}: key {name!r} has shape {list(delta.shape)}, "
                f"base parameter has {list(target.shape)}"
            )
        storage = (target.untyped_storage().data_ptr(), target.storage_offset())
        if storage in done:
            continue
        done.add(storage)
        delta = delta.to(target.device)
        if target.dtype == torch.float32:
            target.add_(delta, alpha=lam)
        else:
            target.copy_((target.float() + lam * delta).to(target.dtype))
    return model


def _tree_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam={lam!r}: expected a finite number")
    return float(lam)


#: Bytes per element of safetensors dtype codes (a checkpoint's header names them so).
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_ST_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})
#: Room for config.json, generation_config.json, special-token files and a shard index beside the weights.
_CONFIG_ALLOWANCE = 16 * 1024


def estimate_model_bytes(
    base: str, torch_dtype: str | torch.dtype | None = None, gguf_file: str | None = None
) -> int | None:
    """Bytes ``save_pretrained`` writes for ``base`` loaded in ``torch_dtype`` (plus its tokenizer files), from the
    checkpoint's safetensors headers alone; ``None`` when that cannot be told without loading it (a hub id, a GGUF
    file, ``.bin`` weights).

    Why from headers: the merge command checks for room for the model folder before it merges, and loading an 8B
    base only to count its bytes would cost what the check is meant to save. Floating tensors take ``torch_dtype``'s
    size (the checkpoint's own when ``None``, as ``from_pretrained`` keeps it); tensors the backbone drops (a
    pooler) are counted too, so the estimate errs high by little.
    """
    dtype = parse_dtype(torch_dtype)
    path = Path(resolve_pretrained(base))
    if gguf_file is not None or not path.is_dir():
        return None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a shard index ({err!r})") from None
        files = [path / Path(str(n)).name for n in names]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        return None
    total = 0
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                piece = f.get_slice(key)
                code = piece.get_dtype()
                size = dtype.itemsize if dtype is not None and code in _ST_FLOATS else _ST_ITEMSIZE.get(code, 8)
                total += math.prod(int(n) for n in piece.get_shape()) * size + len(key) + 96
    return total + _tokenizer_bytes(base) + _CONFIG_ALLOWANCE


def _tokenizer_bytes(base: str) -> int:
    """Room for the tokenizer ``_save_tokenizer`` writes, from the files of a local base folder (0 for a hub id)."""
    path = Path(resolve_pretrained(base))
    size = sum((path / name).stat().st_size for name in _TOKENIZER_FILES if (path / name).is_file())
    # Without a tokenizer.json, save_pretrained converts one (from vocab.txt or a sentencepiece model): room for it.
    return size if (path / "tokenizer.json").is_file() else 3 * size


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's ``state_dict()`` as ``save_pretrained`` writes it (a tied tensor once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size() + len(name) + 96
    return total


def _save_tokenizer(base: str, folder: Path) -> bool:
    """Save the base model's tokenizer next to the merged weights, if it has one; return whether it did."""
    from transformers import AutoTokenizer

    path = resolve_pretrained(base)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a hub model without a tokenizer, or an image model's folder
        return False
    tokenizer.save_pretrained(folder)
    return True


def apply_merged_delta(
    merged: str | os.PathLike[str],
    lam: float,
    output: str | os.PathLike[str] | None = None,
    *,
    base: str | None = None,
    family: str | None = None,
    max_shard_size: str | int = "2GB",
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """Load the base backbone, add ``lam · Δ_merged`` and return it; with ``output``, save the merged model there.

    Why return the model: a λ search evaluates each λ in memory; Δ_merged was computed once and each λ only
    rescales it. With ``output``, ``drm_lightning.export.model.save_merged_model`` writes a complete folder of the
    base's own architecture (pooler, ``lm_head``, tied weights, config), the base tokenizer, the task heads and a
    ``merge.json`` recording ``lam``, atomically, and the backbone part of that model is returned.

    Args:
        merged: a folder written by ``merge_task_vectors``.
        lam: the scaling coefficient λ.
        output: where to write the merged model (``None``: nothing written).
        base: the base model; default: the one recorded in ``merge.json``.
        family: the ``load_backbone`` family; default: the recorded one.
        max_shard_size: ``save_pretrained``'s shard size.
        torch_dtype, gguf_file: how to load the base; default: the ones ``merge.json`` records (the task vectors'),
            so a base fitted in bfloat16 is merged and saved in bfloat16.

    Raises:
        ValueError: bad ``lam``, a merged folder that is not one, or a base whose fingerprint differs from the
            recorded one.
        InsufficientSpaceError: ``output``'s filesystem clearly lacks room for the model folder; checked from the
            base checkpoint's headers before the base is loaded where they tell, and always before writing.
    """
    lam = _check_lam(lam)
    if output is not None:
        from drm_lightning.export.model import save_merged_model

        return save_merged_model(
            merged, lam, output, base=base, family=family, max_shard_size=max_shard_size, torch_dtype=torch_dtype,
            gguf_file=gguf_file,
        )  # fmt: skip
    merged = Path(merged)
    record = read_merge_record(merged)
    base_name = base if base is not None else record["base_model"]
    family = check_family(family if family is not None else record["family"])
    load = {
        "torch_dtype": dtype_name(parse_dtype(torch_dtype)) if torch_dtype is not None else record.get("torch_dtype"),
        "gguf_file": gguf_file if gguf_file is not None else record.get("gguf_file"),
    }
    model = load_backbone(base_name, family, **load)
    if not fingerprint_matches(model, record["base_fingerprint"]):
        base_fp = fingerprint(model)
        raise ValueError(
            f"base model {base_name!r} {_loaded_as(load)} has fingerprint {base_fp}, but {merged / MERGE_FILE} was "
            f"merged against {record['base_fingerprint']} ({record['base_model']}): different weights, refusing to "
            "apply"
        )
    add_merged_delta(model, merged, lam)
    return model
