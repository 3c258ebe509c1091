"""The elementwise merge methods: Task Arithmetic, the plain task mean, TIES and DARE (docs/methods.md).

Also the two elementwise steps other methods build on: ``keep_top_fraction`` (keep the largest fraction) and
``elect_and_merge`` (sign election and disjoint mean), which DRM's rules reuse. Every method here works on flat
views of the caller's tensors, chunk by chunk in float64 (``merging/ops/elementwise.py``), densifying ``LowRankDelta``
factors; the result is in the inputs' dtype unless ``out_dtype`` asks for another. ``λ`` is never applied here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from drm_lightning.merging.methods.checks import (
    check_density,
    check_drop_rate,
    check_merge,
    check_seed,
    real_in,
)
from drm_lightning.merging.methods.inputs import Coefficients, Delta, prepare_elementwise
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.elementwise import ELECT, dare_keep_mask, keep_top_, merge_chunks, trim_threshold


def keep_top(x: Tensor, q: float, *, per_row: bool = False) -> Tensor:
    """Keep the ``round(q · numel)`` entries of largest magnitude (of ``x``, or of each ``x[i]``), zero the rest.

    A new tensor (``x`` is left alone); ``elementwise.keep_top_`` does the same in place without the copy. The
    threshold is the exact k-th largest magnitude; every entry at or above it is kept, so ties at the threshold keep
    a few more and the result never depends on how equal values are ordered.
    """
    return keep_top_(x.clone(memory_format=torch.contiguous_format), q, per_row=per_row)


def keep_top_fraction(x: Tensor, q: float) -> Tensor:
    """Keep the largest fraction ``q`` of ``x``: exactly ``round(q · numel)`` entries of largest magnitude.

    Ties at the threshold may keep a few more. ``q = 1`` returns ``x`` unchanged; the result has ``x``'s dtype.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    q = real_in("q", q, 0.0, 1.0, low_open=False, high_open=False)
    if x.numel() == 0:
        return x.clone()
    return keep_top(x, q)


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
    flat, c, out = prepare_elementwise("elect_and_merge", blocks, coefficients, out_dtype)
    return merge_chunks(flat.flats, c, out, elect=ELECT).reshape(flat.shape)


def task_arithmetic(
    deltas: Sequence[Delta], coefficients: Coefficients = None, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Task Arithmetic (arXiv 2212.04089): ``Σ_i c_i Δ_i``.

    Args:
        deltas: Per-task deltas of one parameter (``LowRankDelta`` are densified).
        coefficients: ``c_i``, default 1.
        out_dtype: Result dtype (default: the deltas').
    """
    flat, c, out = prepare_elementwise("task_arithmetic", deltas, coefficients, out_dtype)
    return merge_chunks(flat.flats, c, out, elect=None).reshape(flat.shape)


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
    flat, c, out = prepare_elementwise("task_mean", deltas, coefficients, out_dtype)
    return merge_chunks(flat.flats, c / len(flat.flats), out, elect=None).reshape(flat.shape)


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
    flat, c, out = prepare_elementwise("ties", deltas, coefficients, out_dtype)
    thresholds = [trim_threshold(x, density) for x in flat.flats]
    return merge_chunks(flat.flats, c, out, elect=ELECT, thresholds=thresholds).reshape(flat.shape)


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
    flat, c, out = prepare_elementwise("dare", deltas, coefficients, out_dtype)
    tasks = len(flat.flats)
    keep = dare_keep_mask(flat.shape, tasks, drop_rate, seed, flat.device) if drop_rate > 0 else None
    thresholds = None
    if merge == "ties":
        masks = [None] * tasks if keep is None else list(keep)
        thresholds = [trim_threshold(x, density, mask) for x, mask in zip(flat.flats, masks, strict=True)]
    out = merge_chunks(
        flat.flats,
        c,
        out,
        elect=ELECT if merge == "ties" else None,
        thresholds=thresholds,
        keep=keep,
        divisor=1.0 - drop_rate,
    )
    return out.reshape(flat.shape)


METHODS = (
    MergeMethod(
        "task_arithmetic",
        "Task Arithmetic",
        "https://arxiv.org/abs/2212.04089",
        task_arithmetic,
        False,
        {},
        lora_span="both",
    ),
    MergeMethod("ties", "TIES", "https://arxiv.org/abs/2306.01708", ties, False, {"density": 0.2}),
    MergeMethod(
        "dare",
        "DARE",
        "https://arxiv.org/abs/2311.03099",
        dare,
        False,
        {"drop_rate": 0.9, "seed": 0, "merge": "task_arithmetic", "density": 0.2},
    ),
)
"""The registry's entries of this module (``merging/methods/registry.py`` collects them)."""
