"""Merge speed, memory and accuracy per decoder layer of Llama-3.1-8B, against the straightforward implementation.

For every method (DRM-V, DRM-H, Iso-C, Iso-CTS, TSV-M, WUDI's closed form, TIES, Task Arithmetic, and the data-aware
family: RegMean, WUDI's Adam loop) this times ``drm_lightning.merging.functional`` and
``drm_lightning.merging.reference`` in float32 ("naive": the authors' way, ``torch.linalg.svd`` of the matrix the
paper names, ``kthvalue`` thresholds, autograd for WUDI, an explicit inverse for RegMean) on the seven matrices of one
decoder layer, with T random task deltas (fixed seed). Both are scored against a float64 run of the reference: an
evaluation of the contract (``docs/methods.md``) that shares no code with the library, so a mistake common to the
library's float32 and float64 paths cannot hide. RegMean gets synthetic input statistics of the right shapes: per
task and matrix the Gram ``XᵀX / N`` of ``N = 2·in`` standard normal input rows (``make_grams``).

It also times floors. An exact SVD-based method cannot go under the float64 eigendecomposition (``eigh``) of
the joint Gram matrix it decomposes, on that matrix's smaller side (see ``FLOOR_GRAMS``): ``sum_i Delta_i^T Delta_i``
for DRM-V and WUDI-closed (its weights do not change the size), ``sum_i Delta_i Delta_i^T`` for DRM-H, the Gram of
``sum_i Delta_i`` for Iso-C and Iso-CTS, each task's Gram for TSV-M. RegMean cannot go under one float64 solve of its
``in``-sided system ``(sum_i G_i) X = rhs`` with the ``out`` right-hand sides (``solve``); WUDI's Adam loop not under
one float64 product ``Y·G`` (``[out, in] x [in, in]``, its gradient's matmul) per step (``product``). Each method's
time is printed as a multiple of its floor. And the global top-k selection that DRM's pruning needs: ``kthvalue``
(the authors') against ``topk``.

The coefficient learner (``evaluation/coefficient_module.CoefficientModule``, rows ``learn-layer`` and
``learn-task``) is timed per optimiser step: one forward and backward pass of each of T task batches (``LEARN_BATCH``
sequences of ``LEARN_TOKENS`` tokens) through the seven matrices wired as one Llama decoder layer (causal grouped-query
attention, SwiGLU MLP; ``LayerSet``), the merged weights built from the coefficients and K float32 deltas per matrix
(``layer``: K = 1, one coefficient per matrix over a method's merged delta; ``task``: K = T, AdaMerging's), and one
Adam step. Its floor (``step``) is the same forward and backward at fixed merged weights (weight gradients, no
coefficients): what the data alone costs.

Usage::

    python benchmarks/merge_speed.py                          # GPU if there is one, full Llama-3.1-8B shapes
    python benchmarks/merge_speed.py --device cpu             # CPU: every dimension / 16 by default
    python benchmarks/merge_speed.py --methods drm-v iso-c --layers q gate --dtype bfloat16 --json out.json
    python benchmarks/merge_speed.py --methods regmean wudi learn-layer learn-task --wudi-steps 10

Timings exclude one warm-up call per matrix (which is where peak memory and the outputs are taken); CUDA is
synchronised around every timed call. ``--slow-call-s S`` lets a warm-up call that took S seconds or more count as
the first timed run (its one-time costs are small beside it): at full shapes on a GPU, where one float32 SVD
baseline takes a minute, ``--repeats 1 --slow-call-s 1`` runs each slow call once instead of twice. Floors are
timed just before the first method that needs them (``--no-floors``: not at all). With ``--json`` the file is
rewritten after every method, so a run stopped by a time limit keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("drm_lightning") is None:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(HERE.parent))
from drm_lightning.merging import reference  # noqa: E402  (the float64 reference, also the float32 baseline)

LLAMA31_8B_LAYER: dict[str, tuple[int, int]] = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}
"""``[out, in]`` of each linear weight of one Llama-3.1-8B decoder layer (q/k/v/o_proj, gate/up/down_proj)."""

DELTA_SCALE = 1e-3
"""Task deltas are ``DELTA_SCALE * N(0, 1)``, the size of fine-tuning updates; relative errors do not depend on it."""

DRM_DROP_RATE = 0.8
TIES_DENSITY = 0.2
ISO_CTS_COMMON_FRACTION = 0.8
WUDI_RIDGE = 0.1
REGMEAN_ALPHA = 0.9
"""The methods' documented defaults (docs/methods.md); the same values go to both implementations."""
WUDI_LR = 1e-5
WUDI_STEPS = 10
"""Adam steps the benchmark runs per matrix (``--wudi-steps``; the method's default is 300): the time per step is
printed too, and the cost is linear in the steps."""

GRAM_ROWS_PER_INPUT = 2
"""RegMean's synthetic statistics: ``N = GRAM_ROWS_PER_INPUT · in`` standard normal input rows per task and matrix."""
GRAM_CHUNK_ROWS = 8192
"""Input rows generated at a time while a Gram is summed (bounds the memory of a full-size ``down_proj`` Gram)."""

LEARN_BATCH = 8
LEARN_TOKENS = 128
"""The coefficient learner's batch per task and step: ``LEARN_BATCH`` sequences of ``LEARN_TOKENS`` tokens."""
LEARN_INIT = 0.3
"""The coefficients' value at the timed steps (a typical chosen λ; the cost does not depend on it)."""
LLAMA31_8B_HEAD_DIM = 128

CPU_DEFAULT_SCALE = 16


@dataclass(frozen=True)
class Method:
    """One merge method: how to call the library and the straightforward version with the same parameters."""

    key: str
    name: str
    library_name: str
    params: dict[str, object] = field(default_factory=dict)
    floor: str | None = None
    """The method's floor: a key of ``FLOOR_GRAMS`` (the joint Gram it must decompose), ``solve``, ``product`` or
    ``step``; None for elementwise methods."""
    inputs: str = "deltas"
    """``deltas``; ``grams``: also each task's input Gram of the matrix (RegMean); ``learn``: the coefficient
    learner, timed per step over the whole layer (``run_learner``)."""


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("drm-v", "DRM-V", "drm", {"direction": "vertical", "drop_rate": DRM_DROP_RATE}, "rows"),
        Method("drm-h", "DRM-H", "drm", {"direction": "horizontal", "drop_rate": DRM_DROP_RATE}, "columns"),
        Method("iso-c", "Iso-C", "iso_c", floor="sum"),
        Method("iso-cts", "Iso-CTS", "iso_cts", {"common_fraction": ISO_CTS_COMMON_FRACTION}, "sum"),
        Method("tsv-m", "TSV-M", "tsv_m", floor="each"),
        Method("wudi-closed", "WUDI-closed", "wudi_closed", {"ridge": WUDI_RIDGE}, "rows"),
        Method("ties", "TIES", "ties", {"density": TIES_DENSITY}),
        Method("task-arithmetic", "Task Arithmetic", "task_arithmetic"),
        Method("regmean", "RegMean", "regmean", {"alpha": REGMEAN_ALPHA}, "solve", "grams"),
        Method("wudi", "WUDI (Adam)", "wudi", {"steps": WUDI_STEPS, "lr": WUDI_LR}, "product"),
        Method("learn-layer", "Learn: layer", "coefficients", {"form": "layer"}, "step", "learn"),
        Method("learn-task", "Learn: task", "coefficients", {"form": "task"}, "step", "learn"),
    )
}

IMPLS = ("drm_lightning", "naive")


def library_function(method: Method) -> Callable[..., Tensor]:
    """The library's function, imported only when first needed so this harness runs with or without it."""
    try:
        from drm_lightning.merging import functional
    except ImportError as err:  # pragma: no cover - only before functional.py exists
        raise ValueError(
            f"--impls drm_lightning: cannot import drm_lightning.merging.functional ({err}); "
            "run with --impls naive to time the straightforward implementation alone"
        ) from err
    return getattr(functional, method.library_name)


def method_params(method: Method) -> dict[str, object]:
    """Parameters for both implementations: the method's own, plus the library's default ``rank_tol``.

    The library chooses its rank tolerances (docs/methods.md says why and which); reading the default off its
    signature makes the baseline and the reference evaluate the very same contract the library ships.
    """
    params = dict(method.params)
    signature = inspect.signature(library_function(method))
    if "rank_tol" in signature.parameters:
        default = signature.parameters["rank_tol"].default
        if default is not inspect.Parameter.empty:
            params["rank_tol"] = default
    return params


def run_library(
    method: Method, params: dict[str, object], deltas: Sequence[Tensor], grams: Sequence[Tensor] | None = None
) -> Tensor:
    """The library's merge, output in float32 so that bf16 inputs are not scored on their output rounding."""
    extra = {"statistics": list(grams)} if grams is not None else {}
    return library_function(method)(list(deltas), **params, **extra, out_dtype=torch.float32)


def run_naive(
    method: Method,
    params: dict[str, object],
    deltas: Sequence[Tensor],
    dtype: torch.dtype,
    grams: Sequence[Tensor] | None = None,
) -> Tensor:
    """The straightforward merge in ``dtype`` (float32 for the baseline, float64 for the reference)."""
    function = getattr(reference, method.library_name)
    if grams is not None:
        return function(list(deltas), list(grams), **params, dtype=dtype)
    return function(list(deltas), **params, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_free_heap() -> bool:
    """Hand the pages of freed heap memory back to the OS (glibc ``malloc_trim``); False without glibc.

    Without it, a method that reuses memory freed by earlier work (the float64 reference, another method) grows the
    RSS by nothing; after it, every reused page faults back in and counts.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _procfs_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def procfs_peak_available() -> bool:
    """Whether Linux lets this process reset and read its peak RSS (``clear_refs`` 5, then ``VmHWM``)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _procfs_kib("VmHWM")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory growth, in bytes, over the ``with`` block.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated on entry (exact). CPU: peak resident set
    size above the RSS on entry, via ``/proc/self/clear_refs`` + ``VmHWM`` on Linux, else a psutil sampling thread
    (every millisecond, so it can miss short spikes). Free heap pages are released first (``release_free_heap``) so
    the growth is the block's working set; without glibc, CPU numbers are lower bounds.
    """

    def __init__(self, device: torch.device, backend: str = "auto") -> None:
        if backend not in ("auto", "procfs", "psutil"):
            raise ValueError(f"backend: must be 'auto', 'procfs' or 'psutil', got {backend!r}")
        self.device = device
        if device.type == "cuda":
            self.backend = "cuda"
        elif backend == "auto":
            self.backend = "procfs" if procfs_peak_available() else "psutil"
        else:
            self.backend = backend
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.backend == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        release_free_heap()
        if self.backend == "procfs":
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._base = _procfs_kib("VmRSS") * 1024
        else:
            import psutil

            process = psutil.Process()
            self._base = process.memory_info().rss
            self._sampled = self._base

            def sample() -> None:
                while not self._stop.wait(0.001):
                    self._sampled = max(self._sampled, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self.backend == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.backend == "procfs":
            peak = _procfs_kib("VmHWM") * 1024
        else:
            import psutil

            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._sampled, psutil.Process().memory_info().rss)
        self.peak_bytes = max(0, peak - self._base)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass(frozen=True)
class Timer:
    """Times one call, the device synchronised before and after.

    ``clock="wall"`` is elapsed time, what matters on a GPU or a machine of one's own. ``clock="process"`` is the
    CPU time of this process (all its threads): on a CPU shared with other jobs, wall time mostly measures the
    queue, while process time with ``--threads 1`` stays the work done.
    """

    device: torch.device
    clock: str = "wall"

    def __call__(self, fn: Callable[[], object]) -> float:
        now = CLOCKS[self.clock]
        synchronize(self.device)
        start = now()
        fn()
        synchronize(self.device)
        return now() - start


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ImplResult:
    """One implementation of one method over the chosen matrices of a layer."""

    seconds_per_layer: float
    """Median over repeats of the summed time of all chosen matrices."""
    seconds_per_matrix: dict[str, float]
    """Median over repeats, per matrix."""
    repeats_seconds: list[float]
    peak_bytes: int
    """Largest per-matrix peak memory growth during the warm-up call."""
    rel_error: float | None
    """``||out - ref||_F / ||ref||_F`` over the whole layer, ref = float64 naive; None without a reference."""
    rel_error_per_matrix: dict[str, float]
    floor_multiple: float | None = None


@dataclass
class MethodResult:
    key: str
    name: str
    params: dict[str, object]
    impls: dict[str, ImplResult]
    speedup: float | None = None
    """naive seconds / drm_lightning seconds (when both ran)."""
    floor: str | None = None


@dataclass
class FloorResult:
    """Median seconds of float64 ``eigh`` of one kind of joint Gram, per matrix and summed over the layer."""

    seconds_per_layer: float
    seconds_per_matrix: dict[str, float]
    gram_size: dict[str, int]
    """Side of the (square) Gram of each matrix."""


@dataclass
class TopKResult:
    entries: int
    keep: int
    kthvalue_s: float
    topk_s: float


@dataclass
class Report:
    config: dict[str, object]
    machine: dict[str, object]
    shapes: dict[str, list[int]]
    floors: dict[str, FloorResult]
    methods: dict[str, MethodResult]
    topk: TopKResult | None
    errors: dict[str, str] = field(default_factory=dict)
    """Method key -> the exception that stopped it (``--keep-going``)."""


# --------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------


def scaled_shapes(layers: Sequence[str], scale: int) -> dict[str, tuple[int, int]]:
    """The chosen matrices' shapes with every dimension divided by ``scale`` (at least 1)."""
    return {name: tuple(max(1, d // scale) for d in LLAMA31_8B_LAYER[name]) for name in layers}  # type: ignore[misc]


def make_deltas(
    shapes: dict[str, tuple[int, int]], tasks: int, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, list[Tensor]]:
    """Random task deltas per matrix; each matrix has its own seed, so a ``--layers`` subset sees the same values."""
    deltas = {}
    for name, shape in shapes.items():
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + list(LLAMA31_8B_LAYER).index(name))
        deltas[name] = [
            (DELTA_SCALE * torch.randn(shape, generator=generator, device=device)).to(dtype) for _ in range(tasks)
        ]
    return deltas


def smaller_gram(x: Tensor) -> Tensor:
    """``x^T x`` or ``x x^T`` (batched over leading dimensions), whichever is smaller."""
    return x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT


FLOOR_GRAMS: dict[str, Callable[[Tensor], Tensor]] = {
    "rows": lambda s: smaller_gram(s.reshape(-1, s.shape[2])),  # [D_1; ...; D_T]: sum_i D_i^T D_i (DRM-V)
    "columns": lambda s: smaller_gram(s.transpose(0, 1).reshape(s.shape[1], -1)),  # [D_1, ..., D_T] (DRM-H)
    "sum": lambda s: smaller_gram(s.sum(dim=0)),  # sum_i D_i (Iso-C; Iso-CTS's common subspace)
    "each": smaller_gram,  # every D_i on its own, batched (TSV-M)
}
"""The joint Gram of the float64 stack ``[T, n, m]`` each kind of method must decompose.

Iso-CTS counts only its common subspace: the residuals' top components live in the complement of it, whose side is
``min(n, m) - k_c``, so an exact method can find them far cheaper than another full ``eigh``.
"""


def repeat_times(
    call: Callable[[], object], timer: Timer, repeats: int, slow_call_s: float | None, warmup_s: float
) -> list[float]:
    """``repeats`` timed calls after a warm-up that took ``warmup_s``; a warm-up of ``slow_call_s`` seconds or more
    counts as the first of them (``None``: never)."""
    if slow_call_s is not None and warmup_s >= slow_call_s:
        return [warmup_s] + [timer(call) for _ in range(repeats - 1)]
    return [timer(call) for _ in range(repeats)]


def time_floors(
    kinds: Sequence[str],
    deltas: dict[str, list[Tensor]],
    timer: Timer,
    repeats: int,
    slow_call_s: float | None = None,
) -> dict[str, FloorResult]:
    """Median seconds of float64 ``eigh`` of each kind of joint Gram, per matrix (forming the Gram is not timed)."""
    floors = {}
    for kind in dict.fromkeys(kinds):
        seconds, sizes = {}, {}
        for name, matrix_deltas in deltas.items():
            gram = FLOOR_GRAMS[kind](torch.stack([d.to(torch.float64) for d in matrix_deltas]))
            call = lambda g=gram: torch.linalg.eigh(g)  # noqa: E731
            seconds[name] = statistics.median(repeat_times(call, timer, repeats, slow_call_s, timer(call)))
            sizes[name] = gram.shape[-1]
            del gram
        floors[kind] = FloorResult(sum(seconds.values()), seconds, sizes)
    return floors


def make_grams(
    shapes: dict[str, tuple[int, int]], tasks: int, device: torch.device, seed: int
) -> dict[str, list[Tensor]]:
    """RegMean's input statistics, synthetic: per matrix and task the float32 Gram ``XᵀX / N`` (the per-row mean
    ``io/statistics.py`` stores) of ``N = GRAM_ROWS_PER_INPUT · in`` standard normal input rows, summed in chunks."""
    grams = {}
    for name, (_, cols) in shapes.items():
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + 500 + list(LLAMA31_8B_LAYER).index(name))
        rows = GRAM_ROWS_PER_INPUT * cols
        grams[name] = []
        for _ in range(tasks):
            gram = torch.zeros(cols, cols, device=device)
            for start in range(0, rows, GRAM_CHUNK_ROWS):
                x = torch.randn(min(GRAM_CHUNK_ROWS, rows - start), cols, generator=generator, device=device)
                gram.addmm_(x.mT, x)
                del x
            grams[name].append(gram.div_(rows))
    return grams


def time_solve_floor(
    deltas: dict[str, list[Tensor]],
    grams: dict[str, list[Tensor]],
    timer: Timer,
    repeats: int,
    slow_call_s: float | None = None,
) -> FloorResult:
    """RegMean's floor: per matrix, one float64 solve of ``Σ_i G_i`` (``in``-sided) with ``out`` right-hand sides
    (forming the sum and the right-hand side is not timed)."""
    seconds, sizes = {}, {}
    for name, matrix_grams in grams.items():
        total = sum(g.to(torch.float64) for g in matrix_grams)
        rhs = deltas[name][0].to(torch.float64).mT.contiguous()
        call = lambda a=total, b=rhs: torch.linalg.solve(a, b)  # noqa: E731
        seconds[name] = statistics.median(repeat_times(call, timer, repeats, slow_call_s, timer(call)))
        sizes[name] = total.shape[-1]
        del total, rhs
    return FloorResult(sum(seconds.values()), seconds, sizes)


def time_product_floor(
    deltas: dict[str, list[Tensor]], steps: int, timer: Timer, repeats: int, slow_call_s: float | None = None
) -> FloorResult:
    """WUDI's Adam floor: per matrix, ``steps`` times one float64 product ``Y·G`` of ``[out, in] x [in, in]``, the
    matmul of its gradient (one product timed, multiplied by ``steps``)."""
    seconds, sizes = {}, {}
    for name, matrix_deltas in deltas.items():
        y = matrix_deltas[0].to(torch.float64)
        gram = y.mT @ y  # [in, in]: the shape of WUDI's G
        call = lambda a=y, b=gram: a @ b  # noqa: E731
        seconds[name] = steps * statistics.median(repeat_times(call, timer, repeats, slow_call_s, timer(call)))
        sizes[name] = gram.shape[-1]
        del y, gram
    return FloorResult(sum(seconds.values()), seconds, sizes)


def time_topk(entries: int, keep: int, timer: Timer, repeats: int, seed: int) -> TopKResult:
    """Global top-k threshold over ``entries`` magnitudes: ``kthvalue`` (the authors') against ``topk``."""
    generator = torch.Generator(device=timer.device).manual_seed(seed)
    values = torch.rand(entries, generator=generator, device=timer.device)
    kth = entries - keep + 1

    def by_kthvalue() -> Tensor:
        return values.kthvalue(kth).values

    def by_topk() -> Tensor:
        return values.topk(keep, sorted=False).values.min()

    if not torch.equal(by_kthvalue(), by_topk()):  # warm-up, and both must find the same threshold
        raise RuntimeError("kthvalue and topk disagree on the top-k threshold")
    kthvalue_s = statistics.median(timer(by_kthvalue) for _ in range(repeats))
    topk_s = statistics.median(timer(by_topk) for _ in range(repeats))
    return TopKResult(entries=entries, keep=keep, kthvalue_s=kthvalue_s, topk_s=topk_s)


def relative_error(outputs: dict[str, Tensor], references: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Relative Frobenius error over all matrices together, and per matrix (absolute where the reference is 0)."""
    per_matrix = {}
    err_sq = ref_sq = 0.0
    for name, out in outputs.items():
        ref = references[name]
        diff_sq = float(torch.linalg.vector_norm(out.to(torch.float64) - ref) ** 2)
        norm_sq = float(torch.linalg.vector_norm(ref) ** 2)
        per_matrix[name] = math.sqrt(diff_sq / norm_sq if norm_sq > 0 else diff_sq)
        err_sq, ref_sq = err_sq + diff_sq, ref_sq + norm_sq
    return math.sqrt(err_sq / ref_sq if ref_sq > 0 else err_sq), per_matrix


def measure(
    call: Callable[[str], Tensor],
    names: Sequence[str],
    references: dict[str, Tensor] | None,
    timer: Timer,
    repeats: int,
    memory_backend: str,
    slow_call_s: float | None = None,
) -> ImplResult:
    """One implementation: a warm-up call per matrix (peak memory, error), then ``repeats`` timed passes (a matrix
    whose warm-up took ``slow_call_s`` or more counts it as its first)."""
    peak = 0
    outputs = {}
    per_matrix: dict[str, list[float]] = {}
    for name in names:
        box: dict[str, Tensor] = {}
        with PeakMemory(timer.device, memory_backend) as memory:
            warmup_s = timer(lambda n=name, b=box: b.setdefault("out", call(n)))
        out = box.pop("out")
        per_matrix[name] = [warmup_s] if slow_call_s is not None and warmup_s >= slow_call_s else []
        peak = max(peak, memory.peak_bytes)
        if references is not None:  # kept in float32 at most: one merged delta per matrix of a layer
            outputs[name] = out.to(torch.float32) if out.dtype == torch.float64 else out
        del out
    rel_error, rel_error_per_matrix = relative_error(outputs, references) if references is not None else (None, {})
    del outputs
    for _ in range(repeats):
        for name in names:
            if len(per_matrix[name]) < repeats:
                per_matrix[name].append(timer(lambda n=name: call(n)))
    totals = [sum(times[i] for times in per_matrix.values()) for i in range(repeats)]
    return ImplResult(
        seconds_per_layer=statistics.median(totals),
        seconds_per_matrix={name: statistics.median(times) for name, times in per_matrix.items()},
        repeats_seconds=totals,
        peak_bytes=peak,
        rel_error=rel_error,
        rel_error_per_matrix=rel_error_per_matrix,
    )


def run_method(
    method: Method,
    impls: Sequence[str],
    deltas: dict[str, list[Tensor]],
    timer: Timer,
    repeats: int,
    reference: bool,
    memory_backend: str,
    grams: dict[str, list[Tensor]] | None = None,
    params: dict[str, object] | None = None,
    slow_call_s: float | None = None,
) -> MethodResult:
    """The float64 reference once per matrix, then each implementation through ``measure``.

    ``grams``: each matrix's per-task input Grams, for a method whose ``inputs`` are ``grams``; ``params``: the
    method's parameters when not its own (``--wudi-steps``).
    """
    params = dict(method.params if params is None else params)
    if "drm_lightning" in impls:
        params = {**method_params(method), **params}
    if method.inputs == "grams" and grams is None:
        raise ValueError(f"{method.key}: needs the input Grams of every matrix (make_grams)")

    def matrix_grams(name: str) -> list[Tensor] | None:
        return grams[name] if method.inputs == "grams" and grams is not None else None

    calls: dict[str, Callable[[str], Tensor]] = {
        "drm_lightning": lambda n: run_library(method, params, deltas[n], matrix_grams(n)),
        "naive": lambda n: run_naive(method, params, deltas[n], torch.float32, matrix_grams(n)),
    }
    references = None
    if reference:
        references = {n: run_naive(method, params, deltas[n], torch.float64, matrix_grams(n)) for n in deltas}
    names = list(deltas)
    results = {
        impl: measure(calls[impl], names, references, timer, repeats, memory_backend, slow_call_s) for impl in impls
    }
    speedup = None
    if "drm_lightning" in results and "naive" in results:
        speedup = results["naive"].seconds_per_layer / results["drm_lightning"].seconds_per_layer
    return MethodResult(method.key, method.name, params, results, speedup, method.floor)


# --------------------------------------------------------------------------------------------------------------
# The coefficient learner
# --------------------------------------------------------------------------------------------------------------

PROJECTIONS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
"""The benchmark's matrix names -> the Llama module names the learner's layer set uses."""


def learner_head_dim(shapes: dict[str, tuple[int, int]], scale: int) -> int:
    """Llama's head dimension (128) divided by ``scale``; every attention width must hold whole heads."""
    head_dim = max(1, LLAMA31_8B_HEAD_DIM // scale)
    q_rows, k_rows = shapes["q"][0], shapes["k"][0]
    if q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % (k_rows // head_dim):
        raise ValueError(
            f"--scale {scale}: the learner's layer has q {q_rows} and k {k_rows} outputs, not whole heads of "
            f"{head_dim} in a grouped-query ratio; use a power of two"
        )
    return head_dim


class LayerSet(nn.Module):
    """The seven matrices of one Llama decoder layer, wired as Llama wires them: causal grouped-query attention
    (``q/k/v/o_proj``) and the SwiGLU MLP (``gate/up/down_proj``), each with its residual (no norms, no rotary
    embedding: they hold no merged weight)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], head_dim: int) -> None:
        super().__init__()
        for name, (rows, cols) in shapes.items():
            self.add_module(PROJECTIONS[name], nn.Linear(cols, rows, bias=False))
        self.head_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape

        def heads(projection: nn.Module) -> Tensor:
            return projection(x).view(batch, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(attention.transpose(1, 2).reshape(batch, length, -1))
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerExpert(nn.Module):
    """One task's expert for the learner: the shared layer set (``backbone``, as ``CoefficientModule`` expects) and
    the task's own classification head on the mean of the outputs."""

    def __init__(self, backbone: LayerSet, hidden: int, classes: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden, classes)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.backbone(batch["inputs"]).mean(dim=1))


@dataclass
class LearnerBench:
    """What every learner row shares: the experts on one base layer set, the deltas, one batch per task."""

    experts: dict[str, LayerExpert]
    deltas: dict[str, list[Tensor]]
    batch: dict[str, dict[str, Tensor]]

    @classmethod
    def build(cls, deltas: dict[str, list[Tensor]], scale: int, device: torch.device, seed: int) -> LearnerBench:
        missing = [name for name in LLAMA31_8B_LAYER if name not in deltas]
        if missing:
            raise ValueError(f"--layers: the learner rows need every matrix of the layer; {missing} not chosen")
        shapes = {name: tuple(d[0].shape) for name, d in deltas.items()}
        head_dim = learner_head_dim(shapes, scale)  # type: ignore[arg-type]
        hidden = shapes["q"][1]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            backbone = LayerSet(shapes, head_dim)  # type: ignore[arg-type]
            experts = {f"task{i}": LayerExpert(backbone, hidden) for i in range(len(deltas["q"]))}
        for expert in experts.values():
            expert.to(device).eval()
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + 999)
        batch = {
            task: {"inputs": torch.randn(LEARN_BATCH, LEARN_TOKENS, hidden, generator=generator, device=device)}
            for task in experts
        }
        return cls(experts, deltas, batch)

    def module(self, form: str) -> object:
        """A ``CoefficientModule`` of ``form`` (``layer``: K = 1, the deltas' sum standing for a method's merged delta;
        ``task``: K = T), its coefficients at ``LEARN_INIT``, the entropy objective (labels unused)."""
        from drm_lightning.evaluation.coefficient_module import CoefficientModule
        from drm_lightning.evaluation.coefficients import CoefficientLayout, LearnSettings

        stacks = {}
        for name, matrix_deltas in self.deltas.items():
            stack = torch.stack([d.to(torch.float32) for d in matrix_deltas])
            stacks[f"{PROJECTIONS[name]}.weight"] = stack.sum(dim=0, keepdim=True) if form == "layer" else stack
        columns = ["merged"] if form == "layer" else list(self.experts)
        layout = CoefficientLayout.build(list(stacks), "tensor", columns)
        settings = LearnSettings(objective="entropy", form=form)  # type: ignore[arg-type]
        device = self.batch[next(iter(self.batch))]["inputs"].device
        return CoefficientModule(self.experts, stacks, layout, settings, LEARN_INIT).to(device)


def learner_step(module: object, bench_batch: dict[str, dict[str, Tensor]]) -> Callable[[], None]:
    """One optimiser step of the learner as ``Trainer.fit`` runs it: ``training_step`` on one batch of every task,
    backward, Adam."""
    optimizer = module.configure_optimizers()  # type: ignore[attr-defined]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # self.log outside a Trainer only warns
            warnings.simplefilter("ignore")
            loss = module.training_step(bench_batch, 0)  # type: ignore[attr-defined]
        loss.backward()
        optimizer.step()

    return step


def floor_step(module: object, bench_batch: dict[str, dict[str, Tensor]]) -> Callable[[], None]:
    """The learner's floor: the same forward and backward of every task's batch at fixed merged weights (weight
    gradients, no coefficients)."""
    weights = {
        name: w.detach().clone().requires_grad_()
        for name, w in module.merged_parameters().items()  # type: ignore[attr-defined]
    }

    def step() -> None:
        for w in weights.values():
            w.grad = None
        total = sum(module.task_loss(task, bench_batch[task], weights) for task in bench_batch)  # type: ignore[attr-defined]
        total.backward()  # type: ignore[union-attr]

    return step


def time_step(
    step: Callable[[], None], timer: Timer, repeats: int, memory_backend: str, slow_call_s: float | None = None
) -> tuple[list[float], int]:
    """A warm-up step (peak memory), then ``repeats`` timed steps (see ``repeat_times``)."""
    with PeakMemory(timer.device, memory_backend) as memory:
        warmup_s = timer(step)
    return repeat_times(step, timer, repeats, slow_call_s, warmup_s), memory.peak_bytes


def run_learner(
    method: Method,
    bench: LearnerBench,
    timer: Timer,
    repeats: int,
    memory_backend: str,
    floor: FloorResult | None,
    slow_call_s: float | None = None,
    with_floor: bool = True,
) -> tuple[MethodResult, FloorResult | None]:
    """Seconds per optimiser step of the coefficient learner over the layer set, and its floor (measured here unless
    ``floor`` is given, as it does not depend on the form, or ``with_floor`` is False)."""
    form = str(method.params["form"])
    module = bench.module(form)
    if floor is None and with_floor:
        floor_times, _ = time_step(floor_step(module, bench.batch), timer, repeats, memory_backend, slow_call_s)
        floor = FloorResult(statistics.median(floor_times), {}, {})
    times, peak = time_step(learner_step(module, bench.batch), timer, repeats, memory_backend, slow_call_s)
    del module
    columns = 1 if form == "layer" else len(bench.experts)
    params = {**method.params, "columns": columns, "batch": LEARN_BATCH, "tokens": LEARN_TOKENS}
    impl = ImplResult(statistics.median(times), {}, times, peak, None, {})
    return MethodResult(method.key, method.name, params, {"drm_lightning": impl}, None, method.floor), floor


def machine_info(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--scale",
        type=int,
        default=None,
        help=f"divide every dimension by this (default: 1 on cuda, {CPU_DEFAULT_SCALE} on cpu)",
    )
    parser.add_argument("--tasks", type=int, default=5, help="number of task deltas T (default 5)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {' '.join(METHODS)}")
    parser.add_argument("--layers", nargs="+", default=list(LLAMA31_8B_LAYER), help="matrices of the layer to run")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), help="drm_lightning and/or naive")
    parser.add_argument("--dtype", default="float32", help="dtype of the task deltas: float32 or bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per matrix after the warm-up")
    parser.add_argument(
        "--wudi-steps", type=int, default=WUDI_STEPS, help=f"Adam steps of the wudi row (default {WUDI_STEPS})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference (no errors)")
    parser.add_argument("--no-topk", action="store_true", help="skip the kthvalue vs topk timing")
    parser.add_argument("--no-floors", action="store_true", help="skip the floors (no x floor column)")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="a method that raises is reported (JSON 'errors', exit status 1) and the next one runs",
    )
    parser.add_argument(
        "--slow-call-s",
        type=float,
        default=None,
        help="a warm-up call taking this many seconds or more counts as the first timed run (default: never)",
    )
    parser.add_argument("--memory", default="auto", help="CPU peak memory: auto, procfs or psutil")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--clock", default="wall", help="wall, or process (CPU time; --device cpu only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Check the arguments; every error names the option and the value at fault."""
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name not in ("cuda", "cpu"):
        raise ValueError(f"--device: must be cuda or cpu, got {device_name!r}")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda asked for, but torch sees no CUDA device")
    device = torch.device(device_name)
    if args.scale is None:
        args.scale = 1 if device.type == "cuda" else CPU_DEFAULT_SCALE
    for option in ("scale", "tasks", "repeats", "wudi_steps"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')}: must be at least 1, got {getattr(args, option)}")
    for option, known in (("methods", METHODS), ("layers", LLAMA31_8B_LAYER), ("impls", IMPLS)):
        unknown = [value for value in getattr(args, option) if value not in known]
        if unknown:
            raise ValueError(f"--{option}: unknown {unknown}; choose from {list(known)}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype: must be float32 or bfloat16, got {args.dtype!r}")
    if args.slow_call_s is not None and args.slow_call_s < 0:
        raise ValueError(f"--slow-call-s: must be at least 0, got {args.slow_call_s}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: must be at least 1, got {args.threads}")
    if args.clock not in CLOCKS:
        raise ValueError(f"--clock: must be wall or process, got {args.clock!r}")
    if args.clock == "process" and device.type == "cuda":
        raise ValueError("--clock: process time does not count GPU work; use wall with --device cuda")
    if args.memory not in ("auto", "procfs", "psutil"):
        raise ValueError(f"--memory: must be auto, procfs or psutil, got {args.memory!r}")
    return device, dtypes[args.dtype]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: Report) -> str:
    """The human-readable table."""
    cfg = report.config
    shapes = ", ".join(f"{name} {rows}x{cols}" for name, (rows, cols) in report.shapes.items())
    machine = report.machine.get("gpu") or f"{report.machine['cpu']} ({report.machine['torch_threads']} threads)"
    lines = [
        f"Merge speed on {cfg['device']} [{machine}]: Llama-3.1-8B decoder layer / {cfg['scale']}, "
        f"T={cfg['tasks']}, {cfg['dtype']} deltas, median of {cfg['repeats']} after a warm-up, {cfg['clock']} clock",
        f"matrices: {shapes}",
        "floors (float64 eigh of the joint Gram a method decomposes; RegMean's solve, WUDI's products, the "
        "learner's fixed-weight step), summed over the matrices: "
        + ", ".join(f"{kind} {floor.seconds_per_layer:.4g} s" for kind, floor in report.floors.items()),
        "",
        f"{'method':<16}{'implementation':<16}{'s/layer':>10}{'floor s':>10}{'x floor':>9}{'peak MiB':>10}"
        f"{'naive/ours':>12}{'rel err vs fp64':>17}",
    ]
    notes = []
    for result in report.methods.values():
        if "steps" in result.params:
            per_step = ", ".join(
                f"{r.seconds_per_layer / float(result.params['steps']):.4g} s ({impl})"
                for impl, r in result.impls.items()
            )
            notes.append(
                f"{result.name}: {result.params['steps']} Adam steps per matrix; per step and layer {per_step}"
            )
        if result.floor == "step":
            notes.append(
                f"{result.name}: seconds per optimiser step over the layer, {result.params['columns']} delta(s) per "
                f"matrix, T={cfg['tasks']} batches of {result.params['batch']}x{result.params['tokens']} tokens"
            )
        for index, (impl, r) in enumerate(result.impls.items()):
            label = "drm_lightning" if impl == "drm_lightning" else "naive float32"
            speedup = _fmt(result.speedup, ".2f") + "x" if result.speedup is not None and index == 0 else ""
            floor_result = report.floors.get(result.floor) if result.floor and index == 0 else None
            floor = floor_result.seconds_per_layer if floor_result is not None else None
            lines.append(
                f"{result.name if index == 0 else '':<16}{label:<16}{r.seconds_per_layer:>10.4g}"
                f"{_fmt(floor, '.4g') if index == 0 else '':>10}"
                f"{_fmt(r.floor_multiple, '.2f'):>9}{r.peak_bytes / 2**20:>10.1f}{speedup:>12}"
                f"{_fmt(r.rel_error, '.2e'):>17}"
            )
    if notes:
        lines += ["", *notes]
    if report.errors:
        lines += ["", *(f"{key} FAILED: {error}" for key, error in report.errors.items())]
    if report.topk is not None:
        t = report.topk
        lines += [
            "",
            f"global top-k threshold over {t.entries:,} entries (keep {t.keep:,}): "
            f"kthvalue {t.kthvalue_s:.4g} s, topk {t.topk_s:.4g} s ({t.kthvalue_s / t.topk_s:.1f}x)",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    device, dtype = validate(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)
    print(format_report(report), flush=True)
    write_json(args.json, report)
    return report


def write_json(path: Path | None, report: Report) -> None:
    """The report as JSON at ``path`` (None: nowhere), replaced whole."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(asdict(report), indent=2) + "\n")
    partial.replace(path)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Report:
    """Everything that is measured, in order: the floors, each method, the top-k selection."""
    timer = Timer(device, args.clock)
    shapes = scaled_shapes(args.layers, args.scale)
    deltas = make_deltas(shapes, args.tasks, dtype, device, args.seed)
    chosen = [METHODS[k] for k in args.methods]
    bench = None
    if any(m.inputs == "learn" for m in chosen):  # checked before anything is timed
        bench = LearnerBench.build(deltas, args.scale, device, args.seed)
    grams = make_grams(shapes, args.tasks, device, args.seed) if any(m.inputs == "grams" for m in chosen) else None

    slow = args.slow_call_s
    floors: dict[str, FloorResult] = {}

    def time_floor(kind: str | None) -> None:
        """The floor of ``kind``, timed once, just before the first method that needs it."""
        if args.no_floors or kind is None or kind in floors or kind == "step":  # the learner times its own
            return
        if kind in FLOOR_GRAMS:
            floors.update(time_floors([kind], deltas, timer, args.repeats, slow))
        elif kind == "solve" and grams is not None:
            floors["solve"] = time_solve_floor(deltas, grams, timer, args.repeats, slow)
        elif kind == "product":
            floors["product"] = time_product_floor(deltas, args.wudi_steps, timer, args.repeats, slow)

    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    config["device"] = device.type
    report = Report(
        config=config,
        machine=machine_info(device),
        shapes={name: list(shape) for name, shape in shapes.items()},
        floors=floors,
        methods={},
        topk=None,
    )

    def one(method: Method) -> MethodResult:
        time_floor(method.floor)
        if method.inputs == "learn":
            assert bench is not None
            result, step_floor = run_learner(
                method, bench, timer, args.repeats, args.memory, floors.get("step"), slow, not args.no_floors
            )
            if step_floor is not None:
                floors["step"] = step_floor
        else:
            params = {**method.params, "steps": args.wudi_steps} if "steps" in method.params else None
            result = run_method(
                method, args.impls, deltas, timer, args.repeats, not args.no_reference, args.memory, grams, params, slow
            )
        floor_result = floors.get(result.floor) if result.floor else None
        floor = floor_result.seconds_per_layer if floor_result is not None else 0.0
        for impl in result.impls.values():
            impl.floor_multiple = impl.seconds_per_layer / floor if floor > 0 else None
        return result

    for method in chosen:
        start = time.perf_counter()
        try:
            result = one(method)
        except Exception as err:
            if not args.keep_going:
                raise
            traceback.print_exc()
            report.errors[method.key] = f"{type(err).__name__}: {err}"
            print(f"merge_speed: {method.key} FAILED: {report.errors[method.key]}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory method leaves the next one its memory
            write_json(args.json, report)
            continue
        report.methods[method.key] = result
        write_json(args.json, report)  # a run stopped by a time limit keeps the rows it finished
        rows = ", ".join(f"{impl} {r.seconds_per_layer:.4g} s" for impl, r in result.impls.items())
        print(f"merge_speed: {method.key}: {rows} ({time.perf_counter() - start:.1f} s wall)", file=sys.stderr)

    if not args.no_topk:
        # DRM-V's pruning set at full rank is the largest: T * n * m entries of the biggest matrix.
        entries = args.tasks * max(rows * cols for rows, cols in shapes.values())
        report.topk = time_topk(entries, round((1.0 - DRM_DROP_RATE) * entries), timer, args.repeats, args.seed)
    return report


if __name__ == "__main__":
    sys.exit(1 if main().errors else 0)
