"""Where one parameter's merge runs: the merge device, or the CPU when the parameter cannot fit the device.

Why: a merge walks the parameters one at a time, and the largest one decides whether it fits. An 8B model's
``embed_tokens`` (128256×4096) with T = 5 float32 deltas is 10.5 GB of inputs alone; on a 24 GB card a method that
needs a few times that would stop the whole merge with ``torch.cuda.OutOfMemoryError`` after hours of work. Here
each parameter is checked up front (``estimate_working_bytes`` against ``device_free_bytes``) and, should the
estimate be wrong, an ``OutOfMemoryError`` from the device step is caught: either way that parameter is merged on
the CPU (the same float64 arithmetic, so the same result to rounding) with one ``DeviceFallbackWarning`` naming it,
and the merge goes on on the device with the next parameter.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from drm_lightning.merging.ops.lowrank import LowRankDelta

R = TypeVar("R")
Delta = torch.Tensor | LowRankDelta

WORKING_FACTOR: dict[str, float] = {}
"""Peak working memory of a method as a multiple of its T float32 inputs (``benchmarks/merge_memory.py``); the
methods not listed stay within ``DEFAULT_FACTOR`` (DRM: ``drm_factor``)."""
DEFAULT_FACTOR = 4.0
DRM_DIRECTIONS = {"drm_v": False, "drm_h": True, "drm_iso_v": False, "drm_iso_h": True}
"""The methods built on DRM's joint basis, and whether they stack columns (horizontal)."""


def drm_factor(shape: tuple[int, ...], tasks: int, horizontal: bool) -> float:
    """DRM's peak working memory as a multiple of the T float32 inputs: its projections and their chunked pruning
    (``DEFAULT_FACTOR``), or the float64 ``eigh`` of the joint Gram when that is larger: ``4·k²`` float64 for the
    ``k``-sided smaller Gram side of the stack (``torch.linalg.eigh`` holds the Gram, a copy and a ``2k²``
    workspace), plus one float64 task; benchmarks/README.md, ``merge_memory.py``."""
    n, m = (shape[1], shape[0]) if horizontal else (shape[0], shape[1])
    k = min(m, tasks * n)
    return max(DEFAULT_FACTOR, 8.0 * k * k / (tasks * n * m) + 2.0 / tasks)


HEADROOM = 0.9
"""Share of the free device memory an estimate may take (the allocator's fragmentation, the CUDA context)."""
CPU = torch.device("cpu")


class DeviceFallbackWarning(UserWarning):
    """A parameter was merged on the CPU because it did not fit the merge device."""


def _to_device(delta: Delta, device: torch.device) -> Delta:
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(delta.B.to(device), delta.A.to(device), delta.scale)
    return delta.to(device)


def prepare_deltas(
    deltas: Sequence[Delta | None], shape: tuple[int, ...], rule: str, device: torch.device
) -> list[torch.Tensor] | list[LowRankDelta]:
    """Move one parameter's deltas to ``device``; keep LoRA factored only where the matrix rule sees all factored.

    An absent delta (a task that did not change this parameter) becomes a zero tensor, so the coefficients stay
    aligned with the tasks; mixed factored/dense/absent lists are made dense, one dtype (float32 or wider).
    """
    if rule == "matrix" and all(isinstance(d, LowRankDelta) for d in deltas):
        return [_to_device(d, device) for d in deltas]  # type: ignore[arg-type]
    dtype = torch.float32
    for d in deltas:
        if d is not None:
            dtype = torch.promote_types(dtype, d.dtype)
    out = []
    for d in deltas:
        if d is None:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
        elif isinstance(d, LowRankDelta):
            out.append(_to_device(d, device).dense(dtype))
        else:
            out.append(d.to(device, dtype))
    return out


def estimate_working_bytes(method: str, deltas: Sequence[Delta | None], shape: tuple[int, ...], rule: str) -> int:
    """Device bytes one parameter's merge needs at its peak: the inputs on the device plus the method's working set.

    Dense: ``(1 + factor) · T · numel · 4`` with the method's factor (``drm_factor``, ``WORKING_FACTOR``; the
    elementwise rule of every method is within ``DEFAULT_FACTOR``). All-factored LoRA deltas under the matrix rule:
    the factors several times over plus three float64 ``[out, in]`` results (the methods work in the joint space
    of the factors).
    """
    numel = math.prod(shape)
    tasks = len(deltas)
    if rule == "matrix" and deltas and all(isinstance(d, LowRankDelta) for d in deltas):
        factor_entries = sum(d.rank * (shape[0] + shape[1]) for d in deltas)  # type: ignore[union-attr]
        return int(8 * (4 * factor_entries + 3 * numel))
    factor = DEFAULT_FACTOR
    if rule == "matrix" and method in DRM_DIRECTIONS and numel:
        factor = drm_factor(shape, tasks, DRM_DIRECTIONS[method])
    elif rule == "matrix":
        factor = WORKING_FACTOR.get(method, DEFAULT_FACTOR)
    return int((1.0 + factor) * tasks * numel * 4)


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes the merge can still allocate on ``device``: free device memory plus what torch's caching allocator
    holds unused; ``None`` where there is no such limit to check (the CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _fallback(name: str, device: torch.device, why: str) -> None:
    warnings.warn(
        f"{name}: {why} on {device}; merging this parameter on the CPU instead (same arithmetic, slower)",
        DeviceFallbackWarning,
        stacklevel=3,
    )


def merge_placed(
    name: str,
    method: str,
    raw: Sequence[Delta | None],
    shape: tuple[int, ...],
    rule: str,
    device: torch.device,
    call: Callable[[list[torch.Tensor] | list[LowRankDelta]], R],
) -> tuple[R, torch.device]:
    """``call(deltas)`` with parameter ``name``'s deltas on ``device``, or on the CPU where they cannot fit it.

    Returns ``(result, the device it ran on)``. ``call`` must leave nothing on the device that the caller needs
    (return CPU tensors), so that a failed attempt can be dropped whole.
    """
    if device.type != "cpu":
        free = device_free_bytes(device)
        need = estimate_working_bytes(method, raw, shape, rule)
        if free is not None and need > HEADROOM * free:
            _fallback(name, device, f"needs about {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
        else:
            try:
                return call(prepare_deltas(raw, shape, rule, device)), device
            except torch.cuda.OutOfMemoryError:
                pass  # the except block keeps the traceback (and the device tensors) alive: leave it first
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _fallback(name, device, "ran out of memory")
    return call(prepare_deltas(raw, shape, rule, CPU)), CPU
