"""Memory-lean elementwise steps of the merge methods: top-k thresholds, trims, DARE masks, elect and merge.

Why a module of its own: these steps touch every entry of a parameter's T deltas, and done the obvious way (one
float64 ``[T, *shape]`` stack, then ``abs``, ``topk``, ``where`` over all of it) they need 6–9× the bytes of the
float32 inputs; on an embedding matrix of an 8B model that is what decides whether the merge fits the device. Here
the inputs are read in place, and everything runs over chunks of entries: each chunk of all T deltas is converted to
float64 (the arithmetic stays float64, as the contract asks), trimmed, masked, elected and merged, and written into
the output. Working memory is the output plus a few chunk-sized buffers, whatever the parameter's size.

Thresholds (the k-th largest magnitude of a trim) are exact without a full-size sort or ``topk``: a strided sample
brackets the threshold, one counting pass checks that the bracket holds it, and only the entries inside the bracket
(about 1 % of them) are gathered for an exact ``topk``. A bracket that misses (an adversarial layout, heavy ties)
falls back to the full ``topk``, so the result is always the exact k-th largest value.

Everything here is device-agnostic: the same code runs on CPU and CUDA, with a handful of host synchronisations per
parameter (the counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_F64 = torch.float64
CHUNK_MIN = 1 << 12
CHUNK_MAX = 1 << 20
SAMPLE = 1 << 16
"""Entries in the strided sample that brackets a threshold; parameters with fewer entries take ``topk`` directly."""


def chunk_size(numel: int) -> int:
    """Entries per chunk: an eighth of one delta, within ``[CHUNK_MIN, CHUNK_MAX]``.

    Why: the float64 buffers of a chunk of T deltas are ``8·T·chunk`` bytes; at an eighth of one delta that is a
    quarter of the float32 inputs at most, and at most ``8·T`` MiB for large parameters.
    """
    return max(CHUNK_MIN, min(CHUNK_MAX, -(-numel // 8)))


def _spans(numel: int) -> list[tuple[int, int]]:
    step = chunk_size(numel)
    return [(a, min(numel, a + step)) for a in range(0, numel, step)]


def _magnitudes(x: Tensor, keep: Tensor | None, a: int, b: int) -> Tensor:
    m = x[a:b].abs()
    if keep is not None:
        m.masked_fill_(~keep[a:b], 0)
    return m


def _kth_of(values: Tensor, k: int) -> Tensor:
    """The k-th largest of a 1-D tensor via ``topk`` over the smaller side (k or numel − k + 1 entries, unsorted)."""
    n = values.numel()
    if k <= n - k + 1:
        return torch.topk(values, k, sorted=False).values.amin()
    return torch.topk(values, n - k + 1, largest=False, sorted=False).values.amax()


def kth_largest_abs(x: Tensor, k: int, keep: Tensor | None = None) -> Tensor:
    """The exact k-th largest of ``|x|`` (``|x|`` taken as 0 where ``keep`` is False), as a 0-d tensor of x's dtype.

    Args:
        x: 1-D.
        k: ``1 <= k <= numel``.
        keep: optional 1-D bool mask of ``x``'s size.
    """
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest_abs: k={k} outside [1, {n}]")
    if n <= 4 * SAMPLE:
        return _kth_of(_magnitudes(x, keep, 0, n), k)
    stride = n // SAMPLE
    sample = x[::stride].abs()
    if keep is not None:
        sample.masked_fill_(~keep[::stride], 0)
    s = sample.numel()
    rank = k * s / n  # where the threshold sits in the sample, counted from the top
    margin = 4.0 * math.sqrt(rank * (1.0 - k / n)) + 8.0  # 4 standard deviations of a sample rank, and some
    ordered = torch.sort(sample, descending=True).values
    hi = ordered[max(0, math.floor(rank - margin) - 1)]
    lo = ordered[min(s - 1, math.ceil(rank + margin) - 1)]
    above = inside = 0
    for a, b in _spans(n):
        m = _magnitudes(x, keep, a, b)
        above += int((m > hi).sum())
        inside += int((m >= lo).sum())
    inside -= above
    if above < k <= above + inside:
        if bool(lo == hi):
            return hi.clone()
        if inside <= max(n // 8, SAMPLE):
            band = []
            for a, b in _spans(n):
                m = _magnitudes(x, keep, a, b)
                band.append(m[(m >= lo) & (m <= hi)])
            return _kth_of(torch.cat(band), k - above)
    return _kth_of(_magnitudes(x, keep, 0, n), k)  # the bracket missed: exact, at the memory of a full topk


def keep_count(q: float, numel: int) -> int:
    """``round(q · numel)``: how many entries "keep the largest fraction q" keeps (docs/methods.md)."""
    return round(q * numel)


def trim_threshold(x: Tensor, q: float, keep: Tensor | None = None) -> Tensor | None:
    """The magnitude at or above which an entry of 1-D ``x`` survives keeping its largest fraction ``q``.

    ``None`` when everything is kept (``round(q·numel) >= numel``); ``+inf`` when nothing is. Ties at the threshold
    all survive, so a few more than ``round(q·numel)`` may.
    """
    n = x.numel()
    k = keep_count(q, n)
    if k >= n:
        return None
    if k <= 0:
        return torch.full((), math.inf, dtype=x.dtype, device=x.device)
    return kth_largest_abs(x, k, keep)


def keep_top_(x: Tensor, q: float, *, per_row: bool = False) -> Tensor:
    """In place: keep the ``round(q·numel)`` entries of largest magnitude of ``x`` (or of each ``x[i]``), zero the rest.

    Returns ``x``. Working memory is chunk-sized (see the module docstring); ``x`` must be contiguous.
    """
    if not x.is_contiguous():
        raise ValueError("keep_top_: x must be contiguous (it is changed in place)")
    rows = x.reshape(x.shape[0], -1) if per_row and x.dim() > 0 else x.reshape(1, -1)
    for row in rows:
        threshold = trim_threshold(row, q)
        if threshold is None:
            continue
        for a, b in _spans(row.numel()):
            piece = row[a:b]
            piece.masked_fill_(piece.abs() < threshold, 0)
    return x


def dare_keep_mask(shape: Sequence[int], tasks: int, drop_rate: float, seed: int, device: torch.device) -> Tensor:
    """DARE's keep mask ``[T, numel]`` (bool): a float32 uniform draw ``>= drop_rate``, seeded with ``seed``.

    Drawn chunk by chunk in the row-major order of ``[T, *shape]`` from one generator: on CPU these are exactly the
    values of one ``torch.rand([T, *shape], dtype=float32)`` draw (the CPU generator is sequential), without the
    float32 draw's memory (the mask is a quarter of the float32 inputs). On CUDA the values depend on the chunking,
    which depends only on the shape: still the same bytes for the same seed, shape and device.
    """
    numel = math.prod(shape)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    keep = torch.empty((tasks, numel), dtype=torch.bool, device=device)
    for i in range(tasks):
        for a, b in _spans(numel):
            draw = torch.rand(b - a, generator=generator, dtype=torch.float32, device=device)
            torch.ge(draw, drop_rate, out=keep[i, a:b])
    return keep


def merge_chunks(
    deltas: Sequence[Tensor],
    c: Tensor,
    out: Tensor,
    *,
    elect: bool,
    thresholds: Sequence[Tensor | None] | None = None,
    keep: Tensor | None = None,
    divisor: float = 1.0,
) -> Tensor:
    """Merge T same-size 1-D deltas chunk by chunk into the 1-D ``out``, in float64 arithmetic.

    Per chunk: the T deltas in float64; where ``keep`` (``[T, numel]`` bool) is False, 0, and the rest divided by
    ``divisor`` (DARE's ``1 − p``); entries of task i with magnitude below ``thresholds[i]`` zeroed (a trim whose
    threshold was taken on the same values); then either ``Σ_i c_i x_i`` (``elect=False``) or elect and merge
    (docs/methods.md: the sign of the unweighted sum, a zero sum elects +; an entry survives if it is non-zero with the
    elected sign; ``Σ_i c_i·survivors_i / max(1, #survivors)``). Returns ``out``.
    """
    tasks, numel = len(deltas), out.numel()
    if numel == 0:
        return out
    step = chunk_size(numel)
    buf = torch.empty((tasks, min(step, numel)), dtype=_F64, device=out.device)
    weights = c.to(_F64).reshape(tasks, 1)
    limits = None
    if thresholds is not None:
        limits = [None if t is None else t.to(_F64) / divisor if divisor != 1.0 else t.to(_F64) for t in thresholds]
    for a, b in _spans(numel):
        x = buf[:, : b - a]
        for i, delta in enumerate(deltas):
            x[i].copy_(delta[a:b])
        if keep is not None:
            if divisor != 1.0:
                x.div_(divisor)
            x.masked_fill_(~keep[:, a:b], 0)
        if limits is not None:
            for i, limit in enumerate(limits):
                if limit is not None:
                    x[i].masked_fill_(x[i].abs() < limit, 0)
        if not elect:
            out[a:b] = (weights * x).sum(dim=0) if tasks > 1 else weights[0] * x[0]
            continue
        sign = torch.where(x.sum(dim=0) >= 0, 1.0, -1.0).to(_F64)
        x.mul_(sign)  # survivors are now exactly the positive entries
        count = (x > 0).sum(dim=0).clamp_min_(1)
        x.clamp_min_(0).mul_(weights)
        out[a:b] = x.sum(dim=0).mul_(sign).div_(count)
    return out
