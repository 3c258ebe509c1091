"""Deltas in, float64 out: the one place the merge methods read and validate the caller's tensors.

Every method takes the task deltas of *one* parameter (``Δ_i = W_i − W_0``, same shape) and optional per-task
coefficients ``c_i`` (docs/methods.md). ``prepare`` checks them (a non-empty sequence of same-shape, same-device,
finite float tensors or ``LowRankDelta`` factors) and brings them to float64 on their device, optionally divided
by a power of two (exact; every method is positively homogeneous) and optionally kept factored; ``prepare_flat``
does the checks for the elementwise methods without any float64 copy; ``task_coefficients`` turns ``c`` into a
float64 ``[T]`` tensor. Bad arguments raise ``ValueError`` naming the method, the argument and the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merging.methods.checks import check_out_dtype
from drm_lightning.merging.ops.linalg import power_of_two_scale
from drm_lightning.merging.ops.lowrank import LowRankDelta

Delta = Tensor | LowRankDelta
Coefficients = Sequence[float] | Tensor | None
_F64 = torch.float64


@dataclass
class Inputs:
    """Validated deltas of one parameter, in float64 on their device."""

    dense: Tensor | None  # [T, *shape]; None when every delta is factored and the method keeps factors
    factors: list[tuple[Tensor, Tensor]] | None  # (scale·B, A) per task
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    unit: Tensor  # 0-d power of two the float64 data were divided by (all methods are positively homogeneous)
    lazy: list[Delta] | None = None  # the caller's deltas, read one at a time (``prepare(..., stack=False)``)

    @property
    def count(self) -> int:
        if self.lazy is not None:
            return len(self.lazy)
        return self.dense.shape[0] if self.dense is not None else len(self.factors)

    def task(self, i: int) -> Tensor:
        """Task ``i``'s delta in float64, divided by ``unit``: a fresh tensor (the caller's is never changed)."""
        if self.lazy is None:
            return self.dense[i]
        item = self.lazy[i]
        x = item.dense(_F64) if isinstance(item, LowRankDelta) else item.to(_F64, copy=True)
        return x.div_(self.unit)

    def weighted_sum(self, c: Tensor) -> Tensor:
        """``Σ_i c_i Δ_i / unit`` in float64, accumulated one task at a time (no ``[T, ...]`` stack)."""
        if self.lazy is None:
            return torch.tensordot(c, self.dense, dims=1)
        total = torch.zeros(self.shape, dtype=_F64, device=self.device)
        for item, ci in zip(self.lazy, c.tolist(), strict=True):  # add_ casts per element: no float64 copy
            total.add_(item.dense(_F64) if isinstance(item, LowRankDelta) else item, alpha=ci)
        return total.div_(self.unit)  # exact: a power of two

    def finish(self, merged: Tensor, out_dtype: torch.dtype | None) -> Tensor:
        """``merged · unit`` in the result dtype; ``merged`` must be the method's own fresh float64 tensor (scaled
        in place: no second float64 copy of the result)."""
        return merged.mul_(self.unit).to(out_dtype or self.dtype)


def _validate(method: str, deltas: Any, matrix: bool) -> tuple[list[Delta], torch.Size, torch.dtype, torch.device]:
    """Check ``deltas`` (a non-empty sequence of same-shape, same-device float tensors or factors); no copies."""
    if isinstance(deltas, Tensor | LowRankDelta) or not isinstance(deltas, Sequence):
        raise ValueError(
            f"{method}: deltas must be a sequence (list or tuple) of tensors or LowRankDelta, got "
            f"{type(deltas).__name__}; wrap a single delta in a list"
        )
    items = list(deltas)
    if not items:
        raise ValueError(f"{method}: deltas is empty; at least one task delta is needed")
    for i, item in enumerate(items):
        if not isinstance(item, Tensor | LowRankDelta):
            raise ValueError(f"{method}: deltas[{i}] must be a torch.Tensor or LowRankDelta, got {type(item).__name__}")
        if isinstance(item, Tensor) and not item.is_floating_point():
            raise ValueError(f"{method}: deltas[{i}] must be floating point, got dtype {item.dtype}")
    shape, device = items[0].shape, items[0].device
    for i, item in enumerate(items):
        if item.shape != shape:
            raise ValueError(f"{method}: deltas[{i}] has shape {tuple(item.shape)} but deltas[0] has {tuple(shape)}")
        if item.device != device:
            raise ValueError(f"{method}: deltas[{i}] is on {item.device} but deltas[0] is on {device}")
    if matrix and len(shape) != 2:
        raise ValueError(f"{method} merges 2-D matrices only; deltas have shape {tuple(shape)}")
    dtype = items[0].dtype
    for item in items[1:]:
        dtype = torch.promote_types(dtype, item.dtype)
    return items, shape, dtype, device


@dataclass
class Flat:
    """Validated deltas of one parameter for the elementwise methods: 1-D views of the caller's tensors, not copies
    (``LowRankDelta`` densified in float64), which ``elementwise.merge_chunks`` reads chunk by chunk."""

    flats: list[Tensor]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def output(self, out_dtype: torch.dtype | None) -> Tensor:
        return torch.empty(self.shape.numel(), dtype=out_dtype or self.dtype, device=self.device)


#: Set while the caller has already checked every delta for NaN/Inf (``inputs_checked``).
_CHECKED: ContextVar[bool] = ContextVar("drm_lightning_inputs_checked", default=False)


@contextmanager
def inputs_checked() -> Iterator[None]:
    """Within it, the elementwise methods skip their own NaN/Inf pass over the deltas: for a caller that checked each
    one already and says where a bad value lies (the merge engine: ``TaskVectorReader.check`` names the file and key),
    so a merge reads every delta once for the check, not twice. Everything else is validated as always."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def prepare_flat(method: str, deltas: Any) -> Flat:
    """Validate ``deltas`` for an elementwise method, with the finiteness check (unless ``inputs_checked``) and
    without a float64 stack."""
    items, shape, dtype, device = _validate(method, deltas, False)
    flats = [(item.dense(_F64) if isinstance(item, LowRankDelta) else item).reshape(-1) for item in items]
    if not _CHECKED.get():
        for i, flat in enumerate(flats):
            # one reduction (a sum: any NaN/Inf makes it non-finite), the exact test only when it is not finite
            if flat.numel() and not bool(torch.isfinite(flat.sum())) and not bool(torch.isfinite(flat).all()):
                raise ValueError(f"{method}: deltas[{i}] contains NaN or Inf")
    return Flat(flats, shape, dtype, device)


def prepare_elementwise(method: str, deltas: Any, coefficients: Any, out_dtype: Any) -> tuple[Flat, Tensor, Tensor]:
    """What every elementwise rule starts with: ``out_dtype`` checked, the deltas validated (``prepare_flat``), the
    coefficients as a float64 ``[T]`` tensor and the empty flat result. Returns ``(flat, c, out)``."""
    out_dtype = check_out_dtype(out_dtype)
    flat = prepare_flat(method, deltas)
    c = task_coefficients(method, coefficients, len(flat.flats), flat.device)
    return flat, c, flat.output(out_dtype)


def prepare(
    method: str,
    deltas: Any,
    *,
    matrix: bool = False,
    keep_factors: bool = False,
    normalise: bool = False,
    stack: bool = True,
) -> Inputs:
    """Validate ``deltas`` and bring them to float64 (the one place that reads the caller's tensors).

    ``stack=False`` (dense deltas): no float64 ``[T, ...]`` stack, which alone is twice the float32 inputs; the
    methods read ``task(i)`` or ``weighted_sum(c)`` instead, one float64 task at a time.
    """
    items, shape, dtype, device = _validate(method, deltas, matrix)

    unit = torch.ones((), dtype=_F64, device=device)
    factored = all(isinstance(item, LowRankDelta) for item in items)
    if keep_factors and factored and sum(item.rank for item in items) > 0:  # rank 0: nothing to factor, go dense
        factors = [item.factors(_F64) for item in items]
        for i, (left, right) in enumerate(factors):
            if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                raise ValueError(f"{method}: deltas[{i}] (LowRankDelta) contains NaN or Inf")
        if normalise:
            unit_l = power_of_two_scale(torch.stack([f[0].abs().amax() for f in factors]))
            unit_r = power_of_two_scale(torch.stack([f[1].abs().amax() for f in factors]))
            factors = [(left / unit_l, right / unit_r) for left, right in factors]
            unit = unit_l * unit_r
        return Inputs(None, factors, shape, dtype, device, unit)

    if not stack:
        return _lazy_inputs(method, items, shape, dtype, device, normalise)
    # One preallocated float64 stack, filled in place: no second set of per-task float64 copies (on an 8B layer
    # with T = 8 that copy alone would be several GB).
    dense = torch.empty((len(items), *shape), dtype=_F64, device=device)
    for i, item in enumerate(items):
        dense[i].copy_(item.dense(_F64) if isinstance(item, LowRankDelta) else item)
    if dense[0].numel() == 0:
        return Inputs(dense, None, shape, dtype, device, unit)
    # Per-task max |x| from two allocation-free reductions (NaN and ±Inf propagate through amax/amin): it is both
    # the finiteness check and the normalising scale, without full-size temporaries (isfinite, abs, a divided copy).
    flat = dense.reshape(len(items), -1)
    peak = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))
    scale = _checked_unit(method, peak)
    if normalise:
        unit = scale
        dense.div_(unit)  # exact: a power of two
    return Inputs(dense, None, shape, dtype, device, unit)


def _lazy_inputs(
    method: str, items: list[Delta], shape: torch.Size, dtype: torch.dtype, device: torch.device, normalise: bool
) -> Inputs:
    """``Inputs`` over the caller's deltas without copying them; the same checks and unit as the stacked path."""
    unit = torch.ones((), dtype=_F64, device=device)
    if math.prod(shape) == 0:
        return Inputs(None, None, shape, dtype, device, unit, lazy=items)
    peaks = []
    for item in items:  # amax/amin: allocation-free, and NaN / ±Inf propagate (the finiteness check)
        x = item.dense(_F64) if isinstance(item, LowRankDelta) else item
        peaks.append(torch.maximum(x.amax(), -x.amin()).to(_F64))
    scale = _checked_unit(method, torch.stack(peaks))
    return Inputs(None, None, shape, dtype, device, scale if normalise else unit, lazy=items)


def _checked_unit(method: str, peak: Tensor) -> Tensor:
    """The power-of-two unit of the per-task peaks ``|x|_max``; raises naming the first task whose peak is NaN/Inf
    (a non-finite entry anywhere makes its task's peak non-finite)."""
    finite = torch.isfinite(peak)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        raise ValueError(f"{method}: deltas[{bad}] contains NaN or Inf")
    return power_of_two_scale(peak)


def task_coefficients(method: str, coefficients: Any, count: int, device: torch.device) -> Tensor:
    """Per-task coefficients as a float64 ``[T]`` tensor (ones when ``None``)."""
    if coefficients is None:
        return torch.ones(count, dtype=_F64, device=device)
    if isinstance(coefficients, Tensor):
        if coefficients.dim() != 1:
            raise ValueError(f"{method}: coefficients must be 1-D, got shape {tuple(coefficients.shape)}")
        values = coefficients.detach().tolist()
    elif isinstance(coefficients, Sequence) and not isinstance(coefficients, str):
        values = list(coefficients)
    else:
        raise ValueError(f"{method}: coefficients must be a sequence of numbers or None, got {coefficients!r}")
    if len(values) != count:
        raise ValueError(f"{method}: coefficients has {len(values)} entries for {count} deltas: {values!r}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
            raise ValueError(f"{method}: coefficients[{i}] must be a finite real number, got {value!r}")
    return torch.tensor([float(v) for v in values], dtype=_F64, device=device)
