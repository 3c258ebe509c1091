"""Streaming merge of whole models: T task vectors in, one merged delta out, one parameter at a time.

Why streaming: holding T fine-tuned 8B models at once needs T·32 GB. Here host memory stays bounded by two
parameters' T deltas (the one merging and the one read ahead) plus two output shards (one filling, one being
written): each parameter's deltas are read lazily (``TaskVectorReader``) by a thread while the one before merges,
moved to the merge device (CUDA when there is one), merged by the rule the ``MergePlan`` gives it, and the float32
result is appended to a shard that a writer thread writes to disk as soon as it fills (``io.background``: the same
bytes; ``DRM_LIGHTNING_PREFETCH=0``/``DRM_LIGHTNING_ASYNC_WRITE=0`` read and write in the merging thread).

Why a merged *delta* rather than merged weights: the merged weight is ``W_0 + λ·Δ_merged`` and λ is searched on
validation data. ``merge_task_vectors`` computes Δ_merged once (the expensive part); ``apply_merged_delta`` adds
``λ·Δ_merged`` to the base for each λ in memory, ``save_merged_model`` into a ``save_pretrained`` folder.

Output folder of ``merge_task_vectors``::

    <output>/
      merged_delta/delta-00001.safetensors ...   float32 Δ_merged, sharded
      merged_delta/delta.safetensors.index.json  {"metadata": {"total_size": ...}, "weight_map": {name: shard}}
      merge.json                                 method, params, inputs, base model and fingerprint, timings, ...
      heads/<task>/{head.safetensors,meta.json}  each expert's head, so the merged backbone can be evaluated

The pieces live beside it: ``setup`` (validation and plan), ``io.merged_delta`` (the merged-delta files), ``record``
(``merge.json``, heads), ``space`` (disk-space estimates), ``apply`` (λ and the model folder). Multi-process merging
builds on them: ``prepare_merge`` on rank 0, ``merge_parameters`` on each rank's share of the plan entries,
``ShardWriter`` per rank (distinct ``prefix``), and ``write_merge_record`` on rank 0 (``merging.distributed``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from drm_lightning.io.atomic import atomic_dir
from drm_lightning.io.background import async_write, prefetch_depth, prefetched
from drm_lightning.io.merged_delta import delta_writer
from drm_lightning.io.shards import DEFAULT_MAX_SHARD_BYTES, check_max_shard_bytes
from drm_lightning.memory import release_freed_memory
from drm_lightning.merging.engine.placement import merge_placed
from drm_lightning.merging.engine.plan import MergePlan, PlanEntry, summarize
from drm_lightning.merging.engine.reader import TaskVectorReader
from drm_lightning.merging.engine.record import copy_heads, write_merge_record
from drm_lightning.merging.engine.setup import MergeSetup, prepare_merge
from drm_lightning.merging.methods.inputs import inputs_checked
from drm_lightning.merging.methods.spec import MergeMethod


@dataclass
class MergeResult:
    """What ``merge_task_vectors`` did.

    Attributes:
        output: the merged folder.
        method: the registry name of the method.
        label: its display label.
        params: the method's parameters after defaults and validation.
        coefficients: per-task coefficients (``None``: all 1).
        timings: seconds spent per phase (``load``, ``read``: waiting for inputs the prefetch thread had not read yet,
            ``matrix``, ``elementwise``, ``write``, ``total``).
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


def read_grams(readers: Sequence[TaskVectorReader], name: str) -> list[torch.Tensor] | None:
    """Every task's input Gram of parameter ``name``, or ``None`` when no task vector records one for it (the
    setup checked that all of them record the same layers)."""
    grams = [reader.gram(name) for reader in readers]
    if all(g is None for g in grams):
        return None
    missing = [r.folder for r, g in zip(readers, grams, strict=True) if g is None]
    if missing:
        raise ValueError(f"{missing[0]}: no input Gram recorded for {name!r}, which other task vectors have")
    return grams  # type: ignore[return-value]


def sync_device(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_initialized():  # nothing can be queued on a device never used
        torch.cuda.synchronize(device)


def stream_merged(
    entries: Sequence[PlanEntry],
    readers: Sequence[TaskVectorReader],
    method: MergeMethod,
    param_sets: Sequence[Mapping[str, Any]],
    merge: Callable[[str, list, list[torch.Tensor] | None], list[torch.Tensor]],
    *,
    device: torch.device,
    progress: bool,
    timings: dict[str, float] | None,
    desc: str,
    statistics: Callable[[str], list[torch.Tensor] | None] | None = None,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """The streaming loop under ``merge_parameters`` and ``sweep.merge_parameters_many``: yield ``(name, [Δ_merged
    per parameter set])`` for each plan entry a task changes, each a contiguous float32 CPU tensor.

    Each entry's T deltas are read, placed on ``device`` (on the CPU instead, with one ``DeviceFallbackWarning``,
    where they do not fit it) and merged by ``merge(rule, deltas, statistics)`` into one tensor per set of
    ``param_sets``; results that are one tensor object stay one after the move to the CPU. Shapes and finiteness are
    checked here. ``statistics`` is ``None`` but for the matrix rule of a method that ``needs_statistics``: then
    each task's input Gram of the parameter (``TaskVectorReader.gram``, read lazily like the deltas, on the CPU),
    or ``None`` where the task vectors record no Gram for it; ``statistics(name)`` gives them instead where the
    caller computed them (``evaluation/block_merge.py``: Grams on the merged model's inputs).
    """
    timings = timings if timings is not None else {}
    for key in ("read", "matrix", "elementwise"):
        timings.setdefault(key, 0.0)
    work = [e for e in entries if e.rule != "skip"]

    def read(entry: PlanEntry) -> tuple[list, list[torch.Tensor] | None]:
        # mapped only: the NaN/Inf pass (and a delta by reference's subtraction) runs in the merging thread (below),
        # so no arithmetic runs in two threads, each with its own OpenMP team fighting for the same cores
        raw = [reader.get(entry.name, entry.shape, check=False) for reader in readers]
        if all(d is None for d in raw):
            return raw, None
        if not (method.needs_statistics and entry.rule == "matrix"):
            return raw, None
        return raw, read_grams(readers, entry.name) if statistics is None else statistics(entry.name)

    with (
        closing(prefetched(work, read, prefetch_depth())) as inputs,
        tqdm(total=len(work), desc=desc, unit="param", disable=not progress) as bar,
    ):
        t0 = time.perf_counter()
        for entry, (raw, grams) in inputs:
            bar.update()
            t1 = time.perf_counter()
            timings["read"] += t1 - t0  # the time the merge waited for its inputs
            for i, reader in enumerate(readers):  # in place: a delta by reference's mapped tensors go once taken
                raw[i] = reader.check(entry.name, raw[i])
            if any(d is not None for d in raw):
                with inputs_checked():  # the methods' own NaN/Inf pass would repeat the one just made
                    out = merge_entry(entry, raw, grams, method, param_sets, merge, device)
                del raw, grams  # the prefetch thread reads one more parameter once the next is asked for
                timings[entry.rule] += time.perf_counter() - t1
                yield entry.name, out
            t0 = time.perf_counter()


def merge_entry(
    entry: PlanEntry,
    raw: list,
    grams: list[torch.Tensor] | None,
    method: MergeMethod,
    param_sets: Sequence[Mapping[str, Any]],
    merge: Callable[[str, list, list[torch.Tensor] | None], list[torch.Tensor]],
    device: torch.device,
) -> list[torch.Tensor]:
    """One plan entry of ``stream_merged``: its deltas ``raw`` merged on ``device`` (or the CPU where they do not fit),
    one float32 CPU tensor per parameter set, shapes and finiteness checked."""

    def call(deltas: list) -> list[torch.Tensor]:
        moved: dict[int, torch.Tensor] = {}
        out = []
        for result in merge(entry.rule, deltas, grams):
            if id(result) not in moved:
                moved[id(result)] = result.detach().to("cpu", torch.float32).contiguous()
            out.append(moved[id(result)])
        sync_device(device)
        return out

    out, _ = merge_placed(entry.name, method.name, raw, entry.shape, entry.rule, device, call)
    for tensor, params in zip(out, param_sets, strict=True):
        if tuple(tensor.shape) != entry.shape:
            raise RuntimeError(
                f"{method.name} returned shape {list(tensor.shape)} for {entry.name!r} of shape {list(entry.shape)}"
            )
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):  # sum: cheap pass
            raise ValueError(f"{method.name} with params {dict(params)} gave non-finite values for {entry.name!r}")
    return out


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
    statistics: Callable[[str], list[torch.Tensor] | None] | None = None,
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
        statistics: each parameter's per-task Grams where the caller computed them (``stream_merged``).
    """
    coeffs = None if coefficients is None else list(coefficients)

    def merge(rule: str, deltas: list, statistics: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if rule == "matrix":
            return [method.merge_matrix(deltas, coeffs, statistics, out_dtype=torch.float32, **params)]
        return [method.merge_elementwise(deltas, coefficients=coeffs, out_dtype=torch.float32, **params)]

    stream = stream_merged(
        entries, readers, method, [params], merge, device=device, progress=progress, timings=timings,
        desc=f"merge {method.label}", statistics=statistics,
    )  # fmt: skip
    for name, (merged,) in stream:
        yield name, merged


def write_merged(
    setup: MergeSetup,
    outputs: Sequence[str | os.PathLike[str]],
    param_sets: Sequence[dict[str, Any]],
    stream: Iterable[tuple[str, Sequence[torch.Tensor]]],
    *,
    max_shard_bytes: int,
    timings: dict[str, float],
    t_start: float,
    record: Mapping[str, Any] | None = None,
) -> list[MergeResult]:
    """Write ``stream``'s merged deltas (one per output, in order) into complete merged folders, atomically (an
    error leaves none of them): shards, heads and a ``merge.json`` per output with its own parameters.

    The one writer of ``merge_task_vectors`` (one output) and ``sweep.merge_task_vectors_many`` (several);
    ``record`` adds keys to every ``merge.json`` (the sweep's ``{"sweep": {"sets": N}}``).
    """
    outputs = [Path(o) for o in outputs]
    merged_count = 0
    results = []
    with ExitStack() as stack:
        tmps = [stack.enter_context(atomic_dir(out)) for out in outputs]
        background = async_write()
        writers = [delta_writer(tmp, max_shard_bytes, background=background) for tmp in tmps]
        for writer in writers:  # before the temporaries are removed on an error: nothing written into them after
            stack.callback(writer.abort)
        timings["write"] = 0.0
        for name, deltas in stream:
            t0 = time.perf_counter()
            for writer, delta in zip(writers, deltas, strict=True):
                writer.add(name, delta)
            del deltas
            timings["write"] += time.perf_counter() - t0
            merged_count += 1
        t0 = time.perf_counter()
        for writer, tmp in zip(writers, tmps, strict=True):
            writer.close()
            copy_heads(setup.readers, tmp)
        release_freed_memory()
        timings["write"] += time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        for tmp, out, params in zip(tmps, outputs, param_sets, strict=True):
            own = replace(setup, params=params)
            write_merge_record(tmp, own.record(), timings, merged_count, lam=None, **(record or {}))
            results.append(MergeResult.from_setup(own, out, dict(timings), merged_count, str(setup.device)))
    return results


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
        method: a registry name (``drm_lightning.merging.methods.registry.METHODS``).
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
    stream = merge_parameters(
        setup.entries, setup.readers, setup.method, setup.params, setup.coefficients, device=setup.device,
        progress=progress, timings=timings,
    )  # fmt: skip
    stream_of_one = ((name, [delta]) for name, delta in stream)
    [result] = write_merged(
        setup, [output], [setup.params], stream_of_one, max_shard_bytes=max_shard_bytes, timings=timings,
        t_start=t_start,
    )  # fmt: skip
    return result
