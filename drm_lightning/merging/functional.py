"""Merge methods as pure tensor functions: the executable form of ``docs/methods.md``.

Every method takes the task deltas of *one* parameter (``Δ_i = W_i − W_0``, same shape, ``[out, in]`` for a linear
weight) and optional per-task coefficients ``c_i``, and returns the merged delta in the inputs' dtype and on their
device (``out_dtype`` asks for another dtype, e.g. float32 for bfloat16 weights). The scaling ``λ`` is never applied
here.

Numerics: all arithmetic runs in float64 on the inputs' device, whatever dtype arrives; the decompositions use the
float64 Gram eigendecompositions of ``linalg.py`` (one ``eigh`` per matrix where the method allows). The result
therefore agrees with a float64 evaluation of the contract to far better than 1e-3 relative Frobenius error; the
only error left for bfloat16 outputs is the final rounding to bfloat16.

The SVD methods (``drm``, ``iso_c``, ``iso_cts``, ``tsv_m``) also accept ``LowRankDelta`` factors and then work in
the joint ``Σ r_i``-dimensional space of the factors, materialising only the merged ``[out, in]`` result. A mix of
dense and factored deltas is densified. The elementwise methods densify factors.

Bad arguments raise ``ValueError`` naming the argument and the offending value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from drm_lightning.merging.elementwise import (
    dare_keep_mask,
    keep_count,
    keep_top_,
    kth_largest_abs,
    merge_chunks,
    trim_threshold,
)
from drm_lightning.merging.linalg import (
    factored_svd,
    left_basis_svd,
    polar_factor,
    polar_factor_extend,
    power_of_two_scale,
    thin_svd,
)
from drm_lightning.merging.lowrank import LowRankDelta

Delta = Tensor | LowRankDelta
Coefficients = Sequence[float] | Tensor | None

SHARE_EPS = 1e-6
"""DRM: a per-task share ``ν_ij`` at or below this counts as none (that column of ``Û_i`` is zero)."""
DRM_RANK_TOL = 1e-2
"""DRM's rank tolerance ``τ`` (docs/methods.md)."""
RANK_TOL = 1e-6
"""Default rank tolerance of Iso-C, Iso-CTS and TSV-M; see ``iso_c`` for why this value."""
MERGES = ("task_arithmetic", "ties")
DIRECTIONS = ("vertical", "horizontal")
_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Parameter checks (shared with the registry, which validates parameters before any tensor is read)
# ----------------------------------------------------------------------------------------------------------------


def _real_in(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def check_density(value: Any) -> float:
    """TIES density ``ρ``: the kept fraction, in ``(0, 1]``."""
    return _real_in("density", value, 0.0, 1.0, low_open=True, high_open=False)


def check_drop_rate(value: Any, name: str = "drop_rate") -> float:
    """DARE/DRM drop rate ``p`` in ``[0, 1)`` (``p = 1`` would drop everything and divide by zero)."""
    return _real_in(name, value, 0.0, 1.0, low_open=False, high_open=True)


def check_nonmatrix_drop_rate(value: Any) -> float:
    """DRM's trim rate ``p_nl`` of non-matrix parameters, in ``[0, 1)``."""
    return check_drop_rate(value, "nonmatrix_drop_rate")


def check_switch(name: str, value: Any) -> bool:
    """A step switched on or off (DRM's ablations): a real ``bool``, so that ``"false"`` is not taken for on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_rank_tol(value: Any) -> float:
    """Relative rank tolerance in ``[0, 1)``."""
    return _real_in("rank_tol", value, 0.0, 1.0, low_open=False, high_open=True)


def check_common_fraction(value: Any) -> float:
    """Iso-CTS common-subspace fraction ``f`` in ``(0, 1]``."""
    return _real_in("common_fraction", value, 0.0, 1.0, low_open=True, high_open=False)


def check_seed(value: Any) -> int:
    """A DARE seed: an integer in ``[0, 2**63)``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= int(value) < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def check_merge(value: Any) -> str:
    """What DARE merges with after dropping: ``task_arithmetic`` or ``ties``."""
    if value not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {value!r}")
    return value


def check_direction(value: Any) -> str:
    """DRM direction: ``vertical`` (stack rows) or ``horizontal`` (stack columns)."""
    if value not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {value!r}")
    return value


PARAM_CHECKS: dict[str, Callable[[Any], Any]] = {
    "density": check_density,
    "drop_rate": check_drop_rate,
    "rank_tol": check_rank_tol,
    "common_fraction": check_common_fraction,
    "seed": check_seed,
    "merge": check_merge,
    "direction": check_direction,
    "nonmatrix_drop_rate": check_nonmatrix_drop_rate,
    "renormalise": lambda value: check_switch("renormalise", value),
    "elect_sign": lambda value: check_switch("elect_sign", value),
    "disjoint_mean": lambda value: check_switch("disjoint_mean", value),
}
"""Validator (returning the normalised value) for every keyword parameter of the methods below."""


def _check_out_dtype(out_dtype: Any) -> torch.dtype | None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    return out_dtype


# ----------------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """Validated deltas of one parameter, in float64 on their device."""

    dense: Tensor | None  # [T, *shape]; None when every delta is factored and the method keeps factors
    factors: list[tuple[Tensor, Tensor]] | None  # (scale·B, A) per task
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    unit: Tensor  # 0-d power of two the float64 data were divided by (all methods are positively homogeneous)
    lazy: list[Delta] | None = None  # the caller's deltas, read one at a time (``_prepare(..., stack=False)``)

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
class _Flat:
    """Validated deltas of one parameter for the elementwise methods: 1-D views of the caller's tensors, not copies
    (``LowRankDelta`` densified in float64), which ``elementwise.merge_chunks`` reads chunk by chunk."""

    flats: list[Tensor]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def output(self, out_dtype: torch.dtype | None) -> Tensor:
        return torch.empty(self.shape.numel(), dtype=out_dtype or self.dtype, device=self.device)


def _prepare_flat(method: str, deltas: Any) -> _Flat:
    """Validate ``deltas`` for an elementwise method, with the finiteness check and without a float64 stack."""
    items, shape, dtype, device = _validate(method, deltas, False)
    flats = [(item.dense(_F64) if isinstance(item, LowRankDelta) else item).reshape(-1) for item in items]
    for i, flat in enumerate(flats):
        if flat.numel() and not bool(torch.isfinite(torch.maximum(flat.amax(), -flat.amin()))):
            raise ValueError(f"{method}: deltas[{i}] contains NaN or Inf")
    return _Flat(flats, shape, dtype, device)


def _prepare(
    method: str,
    deltas: Any,
    *,
    matrix: bool = False,
    keep_factors: bool = False,
    normalise: bool = False,
    stack: bool = True,
) -> _Inputs:
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
        return _Inputs(None, factors, shape, dtype, device, unit)

    if not stack:
        return _lazy_inputs(method, items, shape, dtype, device, normalise)
    # One preallocated float64 stack, filled in place: no second set of per-task float64 copies (on an 8B layer
    # with T = 8 that copy alone would be several GB).
    dense = torch.empty((len(items), *shape), dtype=_F64, device=device)
    for i, item in enumerate(items):
        dense[i].copy_(item.dense(_F64) if isinstance(item, LowRankDelta) else item)
    if dense[0].numel() == 0:
        return _Inputs(dense, None, shape, dtype, device, unit)
    # Per-task max |x| from two allocation-free reductions (NaN and ±Inf propagate through amax/amin): it is both
    # the finiteness check and the normalising scale, without full-size temporaries (isfinite, abs, a divided copy).
    flat = dense.reshape(len(items), -1)
    peak = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))
    finite = torch.isfinite(peak)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        raise ValueError(f"{method}: deltas[{bad}] contains NaN or Inf")
    if normalise:
        unit = power_of_two_scale(peak)
        dense.div_(unit)  # exact: a power of two
    return _Inputs(dense, None, shape, dtype, device, unit)


def _lazy_inputs(
    method: str, items: list[Delta], shape: torch.Size, dtype: torch.dtype, device: torch.device, normalise: bool
) -> _Inputs:
    """``_Inputs`` over the caller's deltas without copying them; the same checks and unit as the stacked path."""
    unit = torch.ones((), dtype=_F64, device=device)
    if math.prod(shape) == 0:
        return _Inputs(None, None, shape, dtype, device, unit, lazy=items)
    peaks = []
    for item in items:  # amax/amin: allocation-free, and NaN / ±Inf propagate (the finiteness check)
        x = item.dense(_F64) if isinstance(item, LowRankDelta) else item
        peaks.append(torch.maximum(x.amax(), -x.amin()).to(_F64))
    peak = torch.stack(peaks)
    finite = torch.isfinite(peak)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        raise ValueError(f"{method}: deltas[{bad}] contains NaN or Inf")
    if normalise:
        unit = power_of_two_scale(peak)
    return _Inputs(None, None, shape, dtype, device, unit, lazy=items)


def _coefficients(method: str, coefficients: Any, count: int, device: torch.device) -> Tensor:
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


# ----------------------------------------------------------------------------------------------------------------
# Shared building blocks
# ----------------------------------------------------------------------------------------------------------------


def _keep_top(x: Tensor, q: float, *, per_row: bool = False) -> Tensor:
    """Keep the ``round(q · numel)`` entries of largest magnitude (of ``x``, or of each ``x[i]``), zero the rest.

    A new tensor (``x`` is left alone); ``elementwise.keep_top_`` does the same in place without the copy. The
    threshold is the exact k-th largest magnitude; every entry at or above it is kept, so ties at the threshold keep
    a few more and the result never depends on how equal values are ordered.
    """
    return keep_top_(x.clone(memory_format=torch.contiguous_format), q, per_row=per_row)


def _elect_merge(stack: Tensor, c: Tensor) -> Tensor:
    """Elect and merge a float64 ``[T, ...]`` stack (see ``elect_and_merge``), chunk by chunk: the working memory
    is the float64 result plus chunk-sized buffers (``elementwise.merge_chunks``)."""
    out = torch.empty(stack.shape[1:].numel(), dtype=stack.dtype, device=stack.device)
    merge_chunks([block.reshape(-1) for block in stack], c, out, elect=True)
    return out.reshape(stack.shape[1:])


def keep_top_fraction(x: Tensor, q: float) -> Tensor:
    """Keep the largest fraction ``q`` of ``x``: exactly ``round(q · numel)`` entries of largest magnitude.

    Ties at the threshold may keep a few more. ``q = 1`` returns ``x`` unchanged; the result has ``x``'s dtype.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    q = _real_in("q", q, 0.0, 1.0, low_open=False, high_open=False)
    if x.numel() == 0:
        return x.clone()
    return _keep_top(x, q)


def elect_and_merge(
    blocks: Sequence[Tensor], coefficients: Coefficients = None, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Elect and merge same-shape blocks (docs/methods.md; PEFT's ``ties`` and the DRM authors' code).

    The elected sign of each entry is the sign of the sum of the *unweighted* blocks (a zero sum elects +); an entry
    of block ``i`` survives if it is non-zero and has the elected sign; the result is ``Σ_i c_i · survivors_i``
    divided by the number of survivors (at least 1).

    Args:
        blocks: The ``T`` blocks.
        coefficients: ``c_i`` (default 1), applied to the surviving entries only: the election stays unweighted.
        out_dtype: Result dtype (default: the blocks').
    """
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare_flat("elect_and_merge", blocks)
    c = _coefficients("elect_and_merge", coefficients, len(inputs.flats), inputs.device)
    return merge_chunks(inputs.flats, c, inputs.output(out_dtype), elect=True).reshape(inputs.shape)


# ----------------------------------------------------------------------------------------------------------------
# Elementwise methods
# ----------------------------------------------------------------------------------------------------------------


def task_arithmetic(
    deltas: Sequence[Delta], coefficients: Coefficients = None, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Task Arithmetic (arXiv 2212.04089): ``Σ_i c_i Δ_i``.

    Args:
        deltas: Per-task deltas of one parameter (``LowRankDelta`` are densified).
        coefficients: ``c_i``, default 1.
        out_dtype: Result dtype (default: the deltas').
    """
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare_flat("task_arithmetic", deltas)
    c = _coefficients("task_arithmetic", coefficients, len(inputs.flats), inputs.device)
    return merge_chunks(inputs.flats, c, inputs.output(out_dtype), elect=False).reshape(inputs.shape)


def task_mean(
    deltas: Sequence[Delta], coefficients: Coefficients = None, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """The plain mean ``(1/T) Σ_i c_i Δ_i``: Iso-C's, Iso-CTS's and TSV-M's rule for non-matrix parameters and
    excluded matrices (docs/methods.md; the Iso authors' ``iso_c``/``iso_cts`` and the TSV code average them).

    Args:
        deltas: Per-task deltas of one parameter (``LowRankDelta`` are densified).
        coefficients: ``c_i``, default 1.
        out_dtype: Result dtype (default: the deltas').
    """
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare_flat("task_mean", deltas)
    c = _coefficients("task_mean", coefficients, len(inputs.flats), inputs.device) / len(inputs.flats)
    return merge_chunks(inputs.flats, c, inputs.output(out_dtype), elect=False).reshape(inputs.shape)


def ties(
    deltas: Sequence[Delta],
    density: float = 0.2,
    coefficients: Coefficients = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TIES-Merging (arXiv 2306.01708): trim each ``Δ_i`` to its largest fraction ``density``, then elect and merge.

    Args:
        deltas: Per-task deltas of one parameter.
        density: Kept fraction ``ρ`` of each delta, in ``(0, 1]``.
        coefficients: ``c_i`` applied to surviving entries (the election is unweighted).
        out_dtype: Result dtype (default: the deltas').
    """
    density = check_density(density)
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare_flat("ties", deltas)
    c = _coefficients("ties", coefficients, len(inputs.flats), inputs.device)
    thresholds = [trim_threshold(flat, density) for flat in inputs.flats]
    out = merge_chunks(inputs.flats, c, inputs.output(out_dtype), elect=True, thresholds=thresholds)
    return out.reshape(inputs.shape)


def dare(
    deltas: Sequence[Delta],
    drop_rate: float = 0.9,
    seed: int = 0,
    merge: str = "task_arithmetic",
    coefficients: Coefficients = None,
    density: float = 0.2,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DARE (arXiv 2311.03099): drop entries at random, rescale the rest by ``1/(1−p)``, then TA or TIES.

    The drop mask is a float32 uniform draw over ``[T, *shape]`` from a ``torch.Generator`` on the deltas' device
    seeded with ``seed``; an entry is kept where the draw is ``>= p``. On CPU it equals one
    ``torch.rand([T, *shape], dtype=float32, generator=g)`` draw (``elementwise.dare_keep_mask`` draws it in chunks
    to bound memory); on CUDA the values depend on that chunking. The same seed, shapes and device give the same
    bytes (CPU and CUDA generators differ).

    Args:
        deltas: Per-task deltas of one parameter.
        drop_rate: Drop probability ``p`` in ``[0, 1)``.
        seed: Seed of the drop mask.
        merge: ``"task_arithmetic"`` or ``"ties"`` (TIES then trims to ``density`` and elects and merges).
        coefficients: ``c_i``, default 1.
        density: TIES density, used with ``merge="ties"`` only (docs/methods.md: "then ... TIES", whose default ρ is
            0.2; pass 1.0 for the sign election without a further trim, as PEFT's ``dare_ties`` does).
        out_dtype: Result dtype (default: the deltas').
    """
    drop_rate, seed, merge = check_drop_rate(drop_rate), check_seed(seed), check_merge(merge)
    density = check_density(density)
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare_flat("dare", deltas)
    tasks = len(inputs.flats)
    c = _coefficients("dare", coefficients, tasks, inputs.device)
    keep = dare_keep_mask(inputs.shape, tasks, drop_rate, seed, inputs.device) if drop_rate > 0 else None
    thresholds = None
    if merge == "ties":
        masks = [None] * tasks if keep is None else list(keep)
        thresholds = [trim_threshold(flat, density, mask) for flat, mask in zip(inputs.flats, masks, strict=True)]
    out = merge_chunks(
        inputs.flats, c, inputs.output(out_dtype), elect=merge == "ties", thresholds=thresholds, keep=keep,
        divisor=1.0 - drop_rate,
    )  # fmt: skip
    return out.reshape(inputs.shape)


# ----------------------------------------------------------------------------------------------------------------
# DRM
# ----------------------------------------------------------------------------------------------------------------


def _combine(stack: Tensor, c: Tensor, elect_sign: bool, disjoint_mean: bool) -> Tensor:
    """The merge step of DRM with its two switches (the DRM authors' ``enable_sign_resolution`` and
    ``enable_disjoint_mean``): both on is elect and merge (``_elect_merge``).

    ``elect_sign`` off: every non-zero entry survives. ``disjoint_mean`` off: divide ``Σ_i c_i · survivors_i`` by
    ``T`` (the plain mean) instead of by the number of survivors.
    """
    if elect_sign and disjoint_mean:
        return _elect_merge(stack, c)
    elected = torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0).to(stack.dtype) if elect_sign else None
    merged = torch.zeros_like(stack[0])
    survivors = torch.zeros_like(stack[0]) if disjoint_mean else None
    for i in range(stack.shape[0]):
        survive = stack[i] * elected > 0 if elected is not None else stack[i] != 0
        merged += torch.where(survive, stack[i] * c[i], 0.0)
        if survivors is not None:
            survivors += survive
    return merged / (survivors.clamp_min(1.0) if survivors is not None else float(stack.shape[0]))


def _factored_basis(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Coordinates of factored deltas in their joint row space: ``Δ_i = C_i Qᵀ`` with ``Q`` orthonormal.

    ``[A_1; …; A_T]ᵀ = Q R`` (QR, ``Q`` is ``[m, k]`` with ``k ≤ Σ r_i``), so ``A_i = R[:, cols_i]ᵀ Qᵀ`` and
    ``C_i = (scale_i B_i) R[:, cols_i]ᵀ`` is ``[n, k]``. Returns ``(C [T, n, k], Q)``.
    """
    q, r = torch.linalg.qr(torch.cat([right for _, right in factors]).mT)
    coords, start = [], 0
    for left, right in factors:
        coords.append(left @ r[:, start : start + right.shape[0]].mT)
        start += right.shape[0]
    return torch.stack(coords), q


@dataclass(frozen=True, eq=False)
class DrmBasis:
    """DRM's joint decomposition of one parameter, computed once and merged at any drop rate and switch setting.

    Why: the decomposition (a Gram matrix, its ``eigh`` and the projections) is nearly all of DRM's cost, and
    nothing in it depends on the drop rate, renormalisation, election or mean; a search over those redoes only
    the elementwise pruning, the election and the final product (``merge``). Built by ``drm_basis``.

    Held in the vertical orientation (horizontal is the same on the transposes), in float64, normalised:

    Attributes:
        blocks: ``[T, n, r]``, ``B_i = Δ_i V_r``: each delta projected onto the ``r`` kept joint components.
        norms: ``[T, r]``, ``‖B_i[:, j]‖ = σ_j ν_ij``: the per-task singular values ``S_i``.
        sigma: ``[r]``, the joint singular values ``σ_j`` (``Σ_i ν_ij² = 1``).
        basis: ``[m, r]``, ``V_r`` in the deltas' own column space (for factored inputs, ``Q`` times it).
        coefficients: ``[T]`` float64 ``c_i``.
        horizontal: whether the deltas were transposed (DRM-H).
    """

    blocks: Tensor
    norms: Tensor
    sigma: Tensor
    basis: Tensor
    coefficients: Tensor
    horizontal: bool
    _inputs: _Inputs

    @property
    def rank(self) -> int:
        """``r``, the number of kept joint components (0 when every delta is zero)."""
        return self.sigma.shape[0]

    def merge(
        self,
        drop_rate: float = 0.8,
        *,
        renormalise: bool = True,
        elect_sign: bool = True,
        disjoint_mean: bool = True,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Steps 4–7 of DRM (docs/methods.md) on the cached decomposition; see ``drm`` for the arguments.

        ``renormalise`` off (the paper's ablation): prune the raw blocks ``U_i`` of the joint singular vectors and
        weight them by the joint ``σ`` (``B_i = prune(U_i) diag(σ)``) instead of the unit columns ``Û_i`` weighted
        by ``S_i``; without pruning both give ``B_i = Δ_i V_r``.
        """
        params = {"drop_rate": drop_rate, "renormalise": renormalise, "elect_sign": elect_sign}
        return self.merge_all([{**params, "disjoint_mean": disjoint_mean}], out_dtype=out_dtype)[0]

    def merge_all(self, param_sets: Sequence[dict[str, Any]], *, out_dtype: torch.dtype | None = None) -> list[Tensor]:
        """``merge(**p)`` for every ``p`` of ``param_sets`` (keys ``drop_rate``, ``renormalise``, ``elect_sign``,
        ``disjoint_mean``; missing ones take ``merge``'s defaults), sharing what they have in common.

        The pruning of step 5 keeps the entries of ``Û`` at or above the ``k``-th largest magnitude. Sets with the
        same ``renormalise`` share those magnitudes (and sets with the same drop rate their threshold), so a
        sweep costs, per set, one exact selection (``elementwise.kth_largest_abs``), a mask, the election and the
        final product. The kept entries of the weighted blocks ``Û_i diag(S_i)`` are the blocks ``B_i = Δ_i V_r``
        themselves, so they are taken from ``blocks`` (no ``Û_i · S_i`` product, no rounding of it).
        """
        out_dtype = _check_out_dtype(out_dtype)
        defaults = {"drop_rate": 0.8, "renormalise": True, "elect_sign": True, "disjoint_mean": True}
        unknown = sorted({k for p in param_sets for k in p} - set(defaults))
        if unknown:
            raise ValueError(f"DrmBasis.merge: unknown parameter(s) {unknown}; allowed: {sorted(defaults)}")
        checked = []
        for params in param_sets:
            p = {**defaults, **params}
            checked.append(
                (
                    check_drop_rate(p["drop_rate"]),
                    check_switch("renormalise", p["renormalise"]),
                    check_switch("elect_sign", p["elect_sign"]),
                    check_switch("disjoint_mean", p["disjoint_mean"]),
                )
            )
        t, n, r = self.blocks.shape
        results: list[Tensor | None] = [None] * len(checked)
        if r == 0:  # X = 0 (or a tolerance that keeps nothing)
            shape = (self.basis.shape[0], n) if self.horizontal else (n, self.basis.shape[0])
            return [self._inputs.finish(self.blocks.new_zeros(shape), out_dtype) for _ in checked]
        for renormalise in (True, False):
            group = [i for i, c in enumerate(checked) if c[1] == renormalise]
            if not group:
                continue
            if renormalise:  # |Û_i|: unit columns; a share ν_ij <= 1e-6 gives a zero column (never selected)
                share = self.norms > SHARE_EPS * self.sigma
                scale = torch.where(share, self.norms, 1.0).unsqueeze(1)
                magnitude = torch.where(share.unsqueeze(1), self.blocks.abs().div_(scale), 0.0)
                del scale
            else:  # |U_i| = |B_i| / σ
                magnitude = self.blocks.abs().div_(self.sigma)
            flat = magnitude.reshape(-1)
            keeps = {i: keep_count(1.0 - checked[i][0], flat.numel()) for i in group}
            thresholds = _thresholds(flat, sorted(set(keeps.values())))
            for position, i in enumerate(group):
                k = keeps[i]
                threshold = thresholds[k]
                _, _, elect_sign, disjoint_mean = checked[i]
                if threshold is None:  # keep nothing
                    pruned = torch.zeros_like(self.blocks)
                else:  # a zero magnitude (a dropped share) is kept only where its block entry is zero anyway
                    kept = (magnitude >= threshold) & (magnitude > 0)  # bool: an eighth of the magnitudes
                    if position == len(group) - 1:  # the magnitudes' last use: free them first
                        del flat, magnitude
                    if elect_sign and disjoint_mean:  # DRM itself: the mask applied chunk by chunk, no pruned copy
                        combined = torch.empty(n * r, dtype=self.blocks.dtype, device=self.blocks.device)
                        rows = [block.reshape(-1) for block in self.blocks]
                        merge_chunks(rows, self.coefficients, combined, elect=True, keep=kept.reshape(t, -1))
                        del kept
                        merged = combined.reshape(n, r) @ self.basis.mT
                        del combined
                        results[i] = self._inputs.finish(merged.mT if self.horizontal else merged, out_dtype)
                        continue
                    pruned = self.blocks.masked_fill(~kept, 0.0)
                    del kept
                merged = _combine(pruned, self.coefficients, elect_sign, disjoint_mean) @ self.basis.mT
                del pruned
                results[i] = self._inputs.finish(merged.mT if self.horizontal else merged, out_dtype)
        return results  # type: ignore[return-value]


def _thresholds(flat: Tensor, keeps: Sequence[int]) -> dict[int, Tensor | None]:
    """For each ``k`` of ``keeps``, the ``k``-th largest value of the non-negative 1-D ``flat`` (0-d): ``None`` for
    ``k <= 0`` (keep nothing), 0 for ``k >= numel`` (keep everything).

    Exact selections (``elementwise.kth_largest_abs``), nested largest ``k`` first: each runs on the entries at or
    above the previous threshold (which hold every larger value, so the k-th largest is the same), so a sweep
    costs about one selection over the whole tensor plus smaller ones.
    """
    numel = flat.numel()
    out: dict[int, Tensor | None] = {}
    values = flat
    wanted = sorted((k for k in keeps if 0 < k < numel), reverse=True)
    for j, k in enumerate(wanted):
        out[k] = kth_largest_abs(values, k)
        if j + 1 < len(wanted):
            values = values[values >= out[k]]
    for k in keeps:
        if k <= 0:
            out[k] = None
        elif k >= numel:
            out[k] = flat.new_zeros(())
    return out


def drm_basis(
    deltas: Sequence[Delta],
    direction: str = "vertical",
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
) -> DrmBasis:
    """Steps 1–3 of DRM: the joint basis of the stacked deltas and each delta's projection onto it.

    ``drm(deltas, direction, p, c, τ)`` is ``drm_basis(deltas, direction, c, τ).merge(p)``; a search over drop
    rates or DRM's switches calls ``merge`` once per value on one ``drm_basis``.

    The joint basis comes from one float64 ``eigh`` of the smaller Gram side of the stack (``Σ Δ_iᵀΔ_i`` for
    vertical, ``Σ Δ_iΔ_iᵀ`` for horizontal, or the ``T·n`` row Gram when that is smaller); the projections
    ``B_i = Δ_i V_r`` are the ones that decomposition forms anyway (``U·S`` of the stack, one product, not two).
    With ``LowRankDelta`` inputs it works in the ``Σ r_i``-dimensional joint row (vertical) or column (horizontal)
    space of the factors: DRM-V is equivariant under ``Δ_i → Δ_i Q`` for orthonormal ``Q``, so this is exact.
    """
    direction, rank_tol = check_direction(direction), check_rank_tol(rank_tol)
    inputs = _prepare("drm", deltas, matrix=True, keep_factors=True, normalise=True)
    c = _coefficients("drm", coefficients, inputs.count, inputs.device)
    horizontal = direction == "horizontal"
    if inputs.factors is not None:
        factors = [(right.mT, left.mT) for left, right in inputs.factors] if horizontal else inputs.factors
        stack, q = _factored_basis(factors)
    else:
        stack, q = (inputs.dense.mT if horizontal else inputs.dense), None
    finisher = replace(inputs, dense=None, factors=None)  # the basis keeps the projections, not the deltas
    del inputs
    t, n, k = stack.shape
    u, s, v = thin_svd(stack.reshape(t * n, k), rank_tol=rank_tol)
    del stack
    keep = s > rank_tol * s.amax() if s.numel() else s > 0  # X = 0 keeps nothing: r = 0
    if not bool(keep.all()):  # copies only where something is dropped: u is as large as the float64 stack
        u, s, v = u[:, keep], s[keep], v[:, keep]
    blocks = u.mul_(s).reshape(t, n, -1)  # U·S = X V_r: the projections Δ_i V_r, formed by the decomposition
    del u
    norms = torch.linalg.vector_norm(blocks, dim=1)  # [T, r]: ‖Δ_i v_j‖ = σ_j ν_ij
    sigma = torch.linalg.vector_norm(norms, dim=0)  # [r]
    basis = v if q is None else q @ v
    return DrmBasis(blocks, norms, sigma, basis, c, horizontal, finisher)


def drm(
    deltas: Sequence[Delta],
    direction: str = "vertical",
    drop_rate: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
    *,
    renormalise: bool = True,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DRM — Decom-Renorm-Merge (arXiv 2505.23117), vertical or horizontal.

    Joint SVD of the stacked deltas, keep the components with ``σ_j > rank_tol · σ_max``, renormalise each task's
    block of the singular vectors (a share ``ν_ij <= 1e-6`` gives a zero column), prune the whole stack of
    renormalised vectors to its largest fraction ``1 − drop_rate``, elect and merge the blocks ``Û_i diag(S_i)``,
    and map back with the shared singular vectors. Horizontal is the same on the transposes. ``drm_basis`` holds
    the cost (see there for how the basis is computed and for factored inputs); ``DrmBasis.merge`` the rest.

    The three switches are the paper's ablations (all on is DRM): ``renormalise`` (step 4; off prunes and weights
    the raw blocks of the joint singular vectors), ``elect_sign`` (off: every non-zero entry survives) and
    ``disjoint_mean`` (off: divide by ``T`` instead of by the number of survivors).

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        direction: ``"vertical"`` (stack rows, DRM-V) or ``"horizontal"`` (stack columns, DRM-H).
        drop_rate: Pruned fraction ``p`` in ``[0, 1)``.
        coefficients: ``c_i`` applied to surviving entries (the election is unweighted).
        rank_tol: Relative rank tolerance ``τ``.
        renormalise, elect_sign, disjoint_mean: DRM's steps, each on by default.
        out_dtype: Result dtype (default: the deltas').
    """
    drop_rate = check_drop_rate(drop_rate)
    switches = {
        "renormalise": check_switch("renormalise", renormalise),
        "elect_sign": check_switch("elect_sign", elect_sign),
        "disjoint_mean": check_switch("disjoint_mean", disjoint_mean),
    }
    out_dtype = _check_out_dtype(out_dtype)
    return drm_basis(deltas, direction, coefficients, rank_tol).merge(drop_rate, **switches, out_dtype=out_dtype)


def drm_nonmatrix(
    deltas: Sequence[Delta],
    nonmatrix_drop_rate: float = 0.0,
    coefficients: Coefficients = None,
    *,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DRM's rule for non-matrix parameters and excluded matrices (docs/methods.md): trim each ``Δ_i`` to its largest
    fraction ``1 − nonmatrix_drop_rate`` (the authors' ``non_linear_module_entries_drop_rate``, default 0: no trim),
    then elect and merge, with the same election and mean switches as ``drm``.

    The authors trim all non-matrix entries of a model as one vector; here each parameter is trimmed on its own
    (the merge streams one parameter at a time), which is the same rule at the default rate 0.

    Args:
        deltas: Per-task deltas of one parameter (``LowRankDelta`` are densified).
        nonmatrix_drop_rate: Trimmed fraction ``p_nl`` of each delta, in ``[0, 1)``.
        coefficients: ``c_i`` applied to surviving entries (the election is unweighted).
        elect_sign, disjoint_mean: as ``drm``.
        out_dtype: Result dtype (default: the deltas').
    """
    nonmatrix_drop_rate = check_drop_rate(nonmatrix_drop_rate, "nonmatrix_drop_rate")
    elect_sign, disjoint_mean = check_switch("elect_sign", elect_sign), check_switch("disjoint_mean", disjoint_mean)
    out_dtype = _check_out_dtype(out_dtype)
    if elect_sign and disjoint_mean:  # DRM's rule itself: chunked, no float64 stack (elementwise.merge_chunks)
        flat = _prepare_flat("drm", deltas)
        c = _coefficients("drm", coefficients, len(flat.flats), flat.device)
        thresholds = [trim_threshold(x, 1.0 - nonmatrix_drop_rate) for x in flat.flats] if nonmatrix_drop_rate else None
        out = merge_chunks(flat.flats, c, flat.output(out_dtype), elect=True, thresholds=thresholds)
        return out.reshape(flat.shape)
    inputs = _prepare("drm", deltas)
    c = _coefficients("drm", coefficients, inputs.count, inputs.device)
    stack = inputs.dense
    if nonmatrix_drop_rate > 0:
        stack = _keep_top(stack, 1.0 - nonmatrix_drop_rate, per_row=True)
    return inputs.finish(_combine(stack, c, elect_sign, disjoint_mean), out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Iso-C, Iso-CTS, TSV-M
# ----------------------------------------------------------------------------------------------------------------


def _svd(inputs: _Inputs, c: Tensor, rank_tol: float, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``M = Σ_i c_i Δ_i``: Gram ``eigh`` for dense deltas, QR of concatenated factors for factored ones."""
    if inputs.factors is not None:
        left = torch.cat([ci * left for ci, (left, _) in zip(c, inputs.factors, strict=True)], dim=1)
        return factored_svd(left, torch.cat([right for _, right in inputs.factors]))
    return thin_svd(inputs.weighted_sum(c), rank_tol=rank_tol, top=top)


def iso_c(
    deltas: Sequence[Delta],
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Iso-C (arXiv 2502.04959): ``M = Σ_i c_i Δ_i = U S Vᵀ``, merged ``mean(S) · U Vᵀ``.

    ``rank_tol`` drops the components with ``σ <= rank_tol · σ_max`` (mean(S) is over the kept ones). The default
    1e-6 changes nothing on the full-rank deltas of full fine-tuning, whose smallest singular values sit orders of
    magnitude above it, and removes the exactly-zero directions of rank-deficient (LoRA) deltas, which the float64
    Gram route leaves near ``eps64 · σ_max² / σ_r`` (about 1e-13 · σ_max for ``σ_r = 1e-3 · σ_max``; factored
    ``LowRankDelta`` inputs have no such directions at all). Dense LoRA deltas stored in float32 carry rounding
    noise near 1e-8 · σ_max, also removed; bfloat16 ones carry noise near 1e-3 · σ_max, which no tolerance can tell
    from signal: keep LoRA deltas factored or in float32. Use 0 to keep every nonzero direction.

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        coefficients: ``c_i`` of the sum, default 1.
        rank_tol: Relative rank tolerance in ``[0, 1)``.
        out_dtype: Result dtype (default: the deltas').
    """
    rank_tol = check_rank_tol(rank_tol)
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare("iso_c", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = _coefficients("iso_c", coefficients, inputs.count, inputs.device)
    u, s, v = _svd(inputs, c, rank_tol)
    keep = s > rank_tol * s.amax()
    if not bool(keep.any()):
        return inputs.finish(torch.zeros(inputs.shape, dtype=_F64, device=inputs.device), out_dtype)
    if not bool(keep.all()):
        u, s, v = u[:, keep], s[keep], v[:, keep]
    merged = u @ v.mT
    del u, v
    return inputs.finish(merged.mul_(s.mean()), out_dtype)


def iso_cts_split(dim: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS's ``(k_c, s)``: ``k_c = int(f·d)``, then ``k_c = d − round((d − k_c)/T)·T`` and ``s = (d − k_c)/T``.

    ``round`` is Python's (half to even), as in the authors' code.
    """
    common = int(common_fraction * dim)
    common = dim - round((dim - common) / tasks) * tasks
    if common < 0:
        raise ValueError(
            f"iso_cts: common_fraction={common_fraction!r} leaves k_c={common} < 0 common components for "
            f"min(n, m)={dim} and T={tasks} tasks; raise common_fraction"
        )
    return common, (dim - common) // tasks


def _residual_svds(
    inputs: _Inputs, c: Tensor, u_c: Tensor, complement: Tensor | None, rank_tol: float, top: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``top`` components of ``R_i = c_i Δ_i − U_c U_cᵀ c_i Δ_i`` for all tasks, as ``[T, ...]`` batches.

    ``complement`` (dense inputs only) is an orthonormal ``[n, q]`` basis of the orthogonal complement of the kept
    ``U_c``: then ``R_i = Q Qᵀ c_i Δ_i`` and ``R_i``'s SVD is ``Q`` times that of the small ``[q, m]`` matrix
    ``Qᵀ c_i Δ_i``, whose Gram is ``q``-sized instead of ``min(n, m)``-sized. Without it (``n > m``) each residual
    is formed and decomposed on its ``m`` side, one task at a time to bound memory.
    """
    if inputs.factors is not None:
        svds = []
        for ci, (left, right) in zip(c, inputs.factors, strict=True):
            left = ci * left
            svds.append(factored_svd(left - u_c @ (u_c.mT @ left), right))
        width = max(s.shape[0] for _, s, _ in svds)  # ranks may differ: pad with zero components
        pad = [
            (F.pad(u, (0, width - u.shape[1])), F.pad(s, (0, width - s.shape[0])), F.pad(v, (0, width - v.shape[1])))
            for u, s, v in svds
        ]
        return tuple(torch.stack(parts) for parts in zip(*pad, strict=True))  # type: ignore[return-value]
    if complement is not None:
        projected = torch.empty((inputs.count, complement.shape[1], inputs.shape[1]), dtype=_F64, device=c.device)
        for i, ci in enumerate(c.tolist()):  # [T, q, m], filled one task at a time
            torch.matmul(complement.mT, inputs.task(i), out=projected[i]).mul_(ci)
        u, s, v = thin_svd(projected, rank_tol=rank_tol, top=top)
        return complement @ u, s, v
    svds = []
    for i, ci in enumerate(c.tolist()):  # plain floats: addmm takes numbers
        delta = inputs.task(i)
        residual = torch.addmm(delta, u_c, u_c.mT @ delta, beta=ci, alpha=-ci) if u_c.shape[1] else ci * delta
        svds.append(thin_svd(residual, rank_tol=rank_tol, top=top))
    return tuple(torch.stack(parts) for parts in zip(*svds, strict=True))  # type: ignore[return-value]


def _common_decomposition(inputs: _Inputs, c: Tensor, top: int, rank_tol: float) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The top ``top`` components of ``Σ c_i Δ_i`` for Iso-CTS: ``(U or W, S, V, full)``.

    Dense ``n <= m``: the Gram side of the sum is the ``n`` side, whose full eigenbasis ``W`` (or the full SVD when
    the precision rule asks for it) holds both the leading left vectors and an orthonormal basis of everything else
    (``full`` true). Dense ``n > m`` and factored inputs: the leading components only (``full`` false).
    """
    if inputs.factors is not None or inputs.shape[0] > inputs.shape[1]:
        u, s, v = _svd(inputs, c, rank_tol, top=top)
        return u, s, v, False
    basis, s, v = left_basis_svd(inputs.weighted_sum(c), rank_tol=rank_tol, top=top)
    return basis, s, v, True


def _common_take(
    decomposition: tuple[Tensor, Tensor, Tensor, bool], k_c: int, rank_tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Iso-CTS's kept common components ``(U_c, S_c, V_c)`` among the first ``k_c`` of ``decomposition`` (those with
    ``σ > rank_tol · σ_1``) and, where it comes for free (``full``), an orthonormal basis of their complement,
    including the common directions dropped by ``rank_tol``; else ``None``."""
    u, s, v, full = decomposition
    s, v = s[:k_c], v[:, :k_c]
    keep = s > rank_tol * s.amax()
    if not full:
        return u[:, :k_c][:, keep], s[keep], v[:, keep], None
    if bool(keep.all()):  # the usual case: views, no copies
        return u[:, :k_c], s, v, u[:, k_c:]
    complement = torch.cat([u[:, :k_c][:, ~keep], u[:, k_c:]], dim=1)
    return u[:, :k_c][:, keep], s[keep], v[:, keep], complement


@dataclass(frozen=True, eq=False)
class IsoCtsBasis:
    """Iso-CTS on one parameter at any common fraction, the decomposition of the summed delta shared.

    Why: a search over ``common_fraction`` changes ``k_c`` and so every task's residual, but the decomposition of
    ``Σ c_i Δ_i`` is the same: ``merge_all`` computes its top ``max k_c`` components once and takes each fraction's
    ``k_c`` from them. ``merge`` alone computes exactly what ``iso_cts`` does. Built by ``iso_cts_basis``; it reads
    the caller's deltas (one float64 task at a time), which the residuals need.
    """

    coefficients: Tensor
    rank_tol: float
    _inputs: _Inputs

    def merge(self, common_fraction: float = 0.8, *, out_dtype: torch.dtype | None = None) -> Tensor:
        """Iso-CTS at ``common_fraction`` (see ``iso_cts``)."""
        return self.merge_all([{"common_fraction": common_fraction}], out_dtype=out_dtype)[0]

    def merge_all(self, param_sets: Sequence[dict[str, Any]], *, out_dtype: torch.dtype | None = None) -> list[Tensor]:
        """``merge(**p)`` for every ``p`` of ``param_sets`` (key ``common_fraction``), one common decomposition."""
        out_dtype = _check_out_dtype(out_dtype)
        unknown = sorted({k for p in param_sets for k in p} - {"common_fraction"})
        if unknown:
            raise ValueError(f"IsoCtsBasis.merge: unknown parameter(s) {unknown}; allowed: ['common_fraction']")
        inputs, c, rank_tol = self._inputs, self.coefficients, self.rank_tol
        n, m = inputs.shape
        fractions = [check_common_fraction(p.get("common_fraction", 0.8)) for p in param_sets]
        splits = [iso_cts_split(min(n, m), inputs.count, f) for f in fractions]
        top = max(k_c for k_c, _ in splits)
        decomposition = _common_decomposition(inputs, c, top, rank_tol) if top > 0 else None
        out = []
        for k_c, s_task in splits:
            if k_c == 0:  # the residuals are the deltas themselves
                empty = torch.zeros(0, dtype=_F64, device=inputs.device)
                common = (empty.reshape(n, 0), empty, empty.reshape(m, 0), None)
            else:
                common = _common_take(decomposition, k_c, rank_tol)
            out.append(inputs.finish(_iso_cts_finish(inputs, c, common, s_task, rank_tol), out_dtype))
        return out


def _iso_cts_finish(
    inputs: _Inputs, c: Tensor, common: tuple[Tensor, Tensor, Tensor, Tensor | None], s_task: int, rank_tol: float
) -> Tensor:
    """Steps 2–5 of Iso-CTS given the kept common components: residual components, concatenation, polar factors;
    a fresh float64 tensor."""
    n, m = inputs.shape
    u_c, s_c, v_c, complement = common
    u_r, s_r, v_r = u_c[:, :0], s_c[:0], v_c[:, :0]
    if s_task > 0:
        u_r, s_r, v_r = _residual_svds(inputs, c, u_c, complement, rank_tol, s_task)
        u_r, s_r, v_r = u_r[..., :s_task], s_r[:, :s_task], v_r[..., :s_task]
        u_r, s_r, v_r = u_r.permute(1, 0, 2).reshape(n, -1), s_r.reshape(-1), v_r.permute(1, 0, 2).reshape(m, -1)
    s_ref = torch.cat([s_c, s_r]).amax() if s_c.numel() + s_r.numel() else s_c.new_zeros(())
    keep_c, keep_r = s_c > rank_tol * s_ref, s_r > rank_tol * s_ref
    if not bool(keep_c.any() or keep_r.any()):
        return torch.zeros(inputs.shape, dtype=_F64, device=inputs.device)
    s = torch.cat([s_c[keep_c], s_r[keep_r]])
    if not bool(keep_c.all()):
        u_c, v_c = u_c[:, keep_c], v_c[:, keep_c]
    if not bool(keep_r.all()):
        u_r, v_r = u_r[:, keep_r], v_r[:, keep_r]
    u = polar_factor_extend(u_c, u_r)
    del u_c, u_r
    v = polar_factor_extend(v_c, v_r)
    del v_c, v_r
    return (u @ v.mT).mul_(s.mean())


def iso_cts_basis(
    deltas: Sequence[Delta], coefficients: Coefficients = None, rank_tol: float = RANK_TOL
) -> IsoCtsBasis:
    """Iso-CTS's inputs, checked, ready to merge at any common fraction (``IsoCtsBasis``)."""
    rank_tol = check_rank_tol(rank_tol)
    inputs = _prepare("iso_cts", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = _coefficients("iso_cts", coefficients, inputs.count, inputs.device)
    return IsoCtsBasis(c, rank_tol, inputs)


def iso_cts(
    deltas: Sequence[Delta],
    common_fraction: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Iso-CTS (arXiv 2502.04959): a common subspace of ``Σ_i c_i Δ_i`` plus task-specific directions, isotropic.

    The top ``k_c`` components of the sum, the top ``s`` components of each task's residual outside the common
    subspace, concatenated; ``U`` and ``V`` replaced by their polar factors; merged ``mean(S) · U Vᵀ``
    (``k_c`` and ``s`` from ``iso_cts_split``). Coefficients scale each delta before anything else.

    Rank tolerance (see ``iso_c`` for the default): common components with ``σ <= rank_tol · σ_1(Σ c_i Δ_i)`` are
    left out *before* the residuals are taken, so the projection never uses arbitrary null-space vectors; then every
    kept component, common or task-specific, must have ``σ > rank_tol · σ_ref`` with ``σ_ref`` the largest singular
    value of all these decompositions. ``mean(S)`` is over the kept ones.

    Cost: for ``n <= m`` the residuals live in the ``(n − k_c)``-dimensional complement of the common subspace,
    whose basis comes with the ``eigh`` of the sum, so each task costs a ``(n − k_c)``-sized ``eigh``; for
    ``n > m`` that complement is larger than ``m`` and each task costs an ``m``-sized one. The polar factors use
    that ``U_c`` and ``V_c`` are orthonormal already (``polar_factor_extend``).

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        common_fraction: ``f`` in ``(0, 1]``.
        coefficients: ``c_i``, default 1.
        rank_tol: Relative rank tolerance in ``[0, 1)``.
        out_dtype: Result dtype (default: the deltas').
    """
    common_fraction, rank_tol = check_common_fraction(common_fraction), check_rank_tol(rank_tol)
    out_dtype = _check_out_dtype(out_dtype)
    return iso_cts_basis(deltas, coefficients, rank_tol).merge(common_fraction, out_dtype=out_dtype)


def tsv_m(
    deltas: Sequence[Delta],
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TSV-M (arXiv 2412.00081): each task's top ``k = min(n, m) // T`` singular components, decorrelated.

    The components of all tasks are concatenated, ``U`` and ``V`` replaced by their polar factors, and the merged
    delta is ``U diag(S) Vᵀ``. Coefficients scale each delta first. Components with ``σ <= rank_tol · σ_ref``,
    ``σ_ref`` the largest singular value of all tasks, are left out (see ``iso_c`` for the default).

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``); needs ``T <= min(n, m)``.
        coefficients: ``c_i``, default 1.
        rank_tol: Relative rank tolerance in ``[0, 1)``.
        out_dtype: Result dtype (default: the deltas').
    """
    rank_tol = check_rank_tol(rank_tol)
    out_dtype = _check_out_dtype(out_dtype)
    inputs = _prepare("tsv_m", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = _coefficients("tsv_m", coefficients, inputs.count, inputs.device)
    n, m = inputs.shape
    k = min(n, m) // inputs.count
    if k == 0:
        raise ValueError(
            f"tsv_m keeps min(n, m) // T components per task: T={inputs.count} deltas of shape {(n, m)} leave none; "
            "merge this parameter with the elementwise rule instead"
        )
    if inputs.factors is None:  # one task at a time, straight into [n, T·k]: no float64 [T, n, m] stack
        u = torch.empty((n, inputs.count * k), dtype=_F64, device=inputs.device)
        v = torch.empty((m, inputs.count * k), dtype=_F64, device=inputs.device)
        s = torch.empty(inputs.count * k, dtype=_F64, device=inputs.device)
        for i, ci in enumerate(c.tolist()):
            u_i, s_i, v_i = thin_svd(inputs.task(i).mul_(ci), rank_tol=rank_tol, top=k)
            u[:, i * k : (i + 1) * k], s[i * k : (i + 1) * k], v[:, i * k : (i + 1) * k] = u_i, s_i, v_i
            del u_i, v_i
    else:
        svds = [factored_svd(ci * left, right) for ci, (left, right) in zip(c, inputs.factors, strict=True)]
        u = [f[0][:, :k] for f in svds]
        s = [f[1][:k] for f in svds]
        v = [f[2][:, :k] for f in svds]
        width = max(x.shape[0] for x in s)
        u = torch.stack([F.pad(x, (0, width - x.shape[1])) for x in u])
        v = torch.stack([F.pad(x, (0, width - x.shape[1])) for x in v])
        s = torch.stack([F.pad(x, (0, width - x.shape[0])) for x in s])
        u, s, v = u.permute(1, 0, 2).reshape(n, -1), s.reshape(-1), v.permute(1, 0, 2).reshape(m, -1)
    keep = s > rank_tol * s.amax()
    if not bool(keep.any()):
        return inputs.finish(torch.zeros(inputs.shape, dtype=_F64, device=inputs.device), out_dtype)
    if not bool(keep.all()):
        u, s, v = u[:, keep], s[keep], v[:, keep]
    u = polar_factor(u).mul_(s)
    v = polar_factor(v)
    return inputs.finish(u @ v.mT, out_dtype)
