"""Steps 4–6 of DRM (docs/methods.md) over the cached projections, chunk by chunk and for many settings at once.

Why: renormalising (``Û_i = U_i / ν_i``), pruning and electing are elementwise over the ``T·n·r`` projections
``B_i = Δ_i V_r`` (float64, as large as twice the float32 inputs at full rank). Done over whole tensors they need a
float64 magnitude tensor and a pruned copy next to the projections, i.e. twice their memory again. Here the
magnitudes ``|B_i| / scale_i`` exist only one chunk of rows at a time, the pruning thresholds of every drop rate come
from one sample and two passes (``elementwise.kth_largest_many``), and one pass over the chunks computes each
chunk's magnitudes once and merges it for every setting. The magnitudes are exactly the old ones (``|B| / ν``),
so the selected entries are too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from drm_lightning.merging.ops.elementwise import SAMPLE, Election, elect_merge_, keep_count, kth_largest_many

SHARE_EPS = 1e-6
"""DRM: a per-task share ``ν_ij`` at or below this counts as none (that column of ``Û_i`` is zero)."""
CHUNK_ENTRIES = 1 << 16
"""Entries of ``[T, rows, r]`` per chunk (at least one row): float64 chunk buffers of about half a MiB each."""


def magnitude_scale(norms: Tensor, sigma: Tensor, renormalise: bool) -> Tensor:
    """``[T, r]`` divisors of the projections' magnitudes: ``|Û_i| = |B_i| / ν_ij σ_j`` (``renormalise``; ``inf``,
    so magnitude 0, where the share is none), or ``|U_i| = |B_i| / σ_j``."""
    if renormalise:
        return torch.where(norms > SHARE_EPS * sigma, norms, torch.inf)
    return sigma.expand_as(norms)


def _row_spans(blocks: Tensor) -> list[tuple[int, int]]:
    t, n, r = blocks.shape
    rows = max(1, CHUNK_ENTRIES // max(1, t * r))
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def _magnitudes(blocks: Tensor, scale: Tensor, a: int, b: int) -> Tensor:
    return blocks[:, a:b].abs().div_(scale.unsqueeze(1))


def _sample(blocks: Tensor, scale: Tensor) -> Tensor:
    """The magnitudes at a fixed stride of the flattened ``[T, n, r]`` projections (``kth_largest_many``'s bracket),
    with the index arithmetic in place: a few sample-sized temporaries, not one per step."""
    t, n, r = blocks.shape
    index = torch.arange(0, blocks.numel(), max(1, blocks.numel() // SAMPLE), device=blocks.device)
    sample = blocks.reshape(-1)[index].abs_()
    column = index % r
    index.div_(n * r, rounding_mode="floor").mul_(r).add_(column)  # the entry's (task, column) in ``scale``
    del column
    return sample.div_(scale.reshape(-1)[index])


def thresholds(blocks: Tensor, scale: Tensor, keeps: Sequence[int]) -> dict[int, Tensor | None]:
    """For each ``k`` of ``keeps``, the ``k``-th largest magnitude ``|B| / scale`` over all ``T·n·r`` entries: ``None``
    for ``k <= 0`` (keep nothing), 0 for ``k >= numel`` (keep everything)."""
    numel = blocks.numel()
    spans = _row_spans(blocks)

    def chunks() -> Iterator[Tensor]:
        for a, b in spans:
            yield _magnitudes(blocks, scale, a, b).reshape(-1)

    wanted = [k for k in keeps if 0 < k < numel]
    found: dict[int, Tensor | None] = {}
    if wanted:
        found.update(kth_largest_many(chunks, numel, _sample(blocks, scale), wanted))
    for k in keeps:
        if k <= 0:
            found[k] = None
        elif k >= numel:
            found[k] = blocks.new_zeros(())
    return found


def prune_and_merge(
    blocks: Tensor, scale: Tensor, c: Tensor, settings: Sequence[tuple[Tensor | None, bool, bool]]
) -> list[Tensor]:
    """Steps 5–6 for every ``(threshold, elect_sign, disjoint_mean)`` of ``settings``: ``[n, r]`` merged blocks.

    An entry of ``B_i`` is kept where its magnitude is at or above the threshold and non-zero (a zero magnitude, a
    dropped share, is kept only where its entry is zero anyway); ``None`` keeps nothing. One pass over chunks of
    rows: each chunk's magnitudes are computed once for all settings.
    """
    t, n, r = blocks.shape
    out = [blocks.new_zeros((n, r)) for _ in settings]
    live = [i for i, (threshold, _, _) in enumerate(settings) if threshold is not None]
    positive = {i: bool(settings[i][0] > 0) for i in live}  # once, not per chunk (a host synchronisation)
    c3 = None if bool((c == 1).all()) else c.to(blocks.dtype).reshape(t, 1, 1)  # c = 1: no multiplication
    for a, b in _row_spans(blocks):
        if not live:
            break
        chunk = blocks[:, a:b]
        magnitude = _magnitudes(blocks, scale, a, b)
        for i in live:
            threshold, elect_sign, disjoint_mean = settings[i]
            kept = magnitude >= threshold if positive[i] else magnitude > 0
            out[i][a:b] = elect_merge_(chunk * kept, c3, Election(elect_sign, disjoint_mean))
            del kept
    return out


def keep_counts(drop_rates: Sequence[float], numel: int) -> list[int]:
    """How many entries each drop rate keeps: ``round((1 − p) · numel)`` (docs/methods.md)."""
    return [keep_count(1.0 - p, numel) for p in drop_rates]
