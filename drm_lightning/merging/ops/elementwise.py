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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64
CHUNK_MIN = 1 << 12
CHUNK_MAX = 1 << 20
#: Entries per chunk of ``_weighted_sum``: its float64 accumulator (2 MiB) stays in cache across the T additions.
SUM_CHUNK = 1 << 18
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


def _ith_largest(values: Tensor, i: int) -> Tensor:
    """``sort(values, descending=True)[i]`` by a selection (``kthvalue``: linear time; a sort of the 65,536-entry
    sample costs ten times more)."""
    return torch.kthvalue(values, values.numel() - i).values


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
    hi = _ith_largest(sample, max(0, math.floor(rank - margin) - 1))
    lo = _ith_largest(sample, min(s - 1, math.ceil(rank + margin) - 1))
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


def kth_largest_many(
    chunks: Callable[[], Iterator[Tensor]], numel: int, sample: Tensor, ks: Sequence[int]
) -> dict[int, Tensor]:
    """The exact k-th largest value, for every ``k`` of ``ks``, of ``numel`` non-negative values given chunk by chunk.

    Why: a parameter's magnitudes need not exist as one tensor (DRM computes them per chunk from its projections),
    and a search over several drop rates wants several thresholds of the same values. A ``sample`` (the values at
    a fixed stride, as in ``kth_largest_abs``) brackets every threshold; one pass counts every bracket and collects
    the entries inside it (about 1 % each; a second pass only where the sample underestimated a band), and each
    threshold is the exact ``topk`` of its band. A bracket that misses falls back to all values at once, so the
    result is always exact.

    Args:
        chunks: Called once per pass; yields the values as 1-D chunks, the same values in the same order each time.
        numel: How many values ``chunks`` yields in all.
        sample: 1-D, the values at a fixed stride (any subset; only the bracketing depends on it).
        ks: Each ``1 <= k <= numel``.
    """
    wanted = sorted(set(ks))
    if any(not 1 <= k <= numel for k in wanted):
        raise ValueError(f"kth_largest_many: k in {wanted} outside [1, {numel}]")
    if not wanted:
        return {}
    if numel <= 4 * SAMPLE:  # small: one sort serves every k
        ordered = torch.sort(torch.cat(list(chunks())), descending=True).values
        return {k: ordered[k - 1].clone() for k in wanted}
    s = sample.numel()
    brackets = {}
    for k in wanted:
        rank = k * s / numel
        margin = 4.0 * math.sqrt(rank * (1.0 - k / numel)) + 8.0
        hi = _ith_largest(sample, max(0, math.floor(rank - margin) - 1))
        brackets[k] = (hi, _ith_largest(sample, min(s - 1, math.ceil(rank + margin) - 1)))
    # One pass counts every bracket and gathers its entries into a buffer sized from the sample (twice the
    # expected band, and some); a band that overflows its buffer is gathered again in a second pass.
    bands = {}
    for k, (hi, lo) in brackets.items():
        expected = int((sample >= lo).sum() - (sample > hi).sum()) * numel / s
        bands[k] = [sample.new_empty(min(numel, int(2 * expected) + 4096)), 0]  # buffer, entries filled (-1: full)
    above = torch.zeros(len(wanted), dtype=torch.int64, device=sample.device)
    inside = torch.zeros_like(above)
    for m in chunks():
        for j, (k, (hi, lo)) in enumerate(brackets.items()):
            over, band = m > hi, m >= lo
            band ^= over  # lo <= m <= hi (over is a subset of band)
            above[j] += over.sum()
            buffer, filled = bands[k]
            if filled < 0:
                inside[j] += band.sum()
                continue
            piece = m[band]  # its size is the band's count
            inside[j] += piece.numel()
            if filled + piece.numel() <= buffer.numel():
                buffer[filled : filled + piece.numel()] = piece
                bands[k][1] = filled + piece.numel()
            else:
                bands[k][1] = -1
            del piece
    out: dict[int, Tensor] = {}
    again = []
    for k, a, count in zip(wanted, above.tolist(), inside.tolist(), strict=True):
        hi, lo = brackets[k]
        buffer, filled = bands.pop(k)
        if not a < k <= a + count:
            continue  # the bracket missed
        if bool(lo == hi):
            out[k] = hi.clone()
        elif filled >= 0:
            out[k] = _kth_of(buffer[:filled], k - a)
        elif count <= max(numel // 8, SAMPLE):
            again.append((k, a, sample.new_empty(count)))
        del buffer
    if again:
        filled_again = [0] * len(again)
        for m in chunks():
            for j, (k, _, buffer) in enumerate(again):
                hi, lo = brackets[k]
                piece = m[(m >= lo) & (m <= hi)]
                buffer[filled_again[j] : filled_again[j] + piece.numel()] = piece
                filled_again[j] += piece.numel()
                del piece
        for k, a, buffer in again:
            out[k] = _kth_of(buffer, k - a)
    missed = [k for k in wanted if k not in out]
    if missed:  # a bracket missed: exact, at the memory of all values at once
        values = torch.cat(list(chunks()))
        out.update({k: _kth_of(values, k) for k in missed})
    return out


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


@dataclass(frozen=True)
class Election:
    """How elect and merge combines the T entries of one position (docs/methods.md; the DRM authors' switches
    ``enable_sign_resolution`` and ``enable_disjoint_mean``); both on is TIES's elect and merge.

    Attributes:
        elect_sign: The elected sign is the sign of the unweighted sum (a zero sum elects +) and an entry survives if
            it is non-zero with that sign; off: every non-zero entry survives.
        disjoint_mean: Divide ``Σ_i c_i·survivors_i`` by the number of survivors (at least 1); off: by ``T``.
    """

    elect_sign: bool = True
    disjoint_mean: bool = True


ELECT = Election()
"""TIES's elect and merge: the elected sign, the mean over the survivors."""


def elect_merge_(x: Tensor, c: Tensor | None, rule: Election = ELECT) -> Tensor:
    """Elect and merge over the first dimension of a float64 ``[T, ...]`` block ``x`` (changed in place).

    The one implementation every method's merge step runs (TIES, DARE-TIES, DRM's pruned blocks and its
    non-matrix rule, ``elect_and_merge``). ``c`` broadcasts against ``x`` (``[T, 1, ...]``), or ``None`` for all
    ones. Arithmetic on 0/1 masks, no ``torch.where`` (several times slower per entry on CPU).
    """
    if rule.elect_sign:
        sign = (x.sum(dim=0) >= 0).to(x.dtype).mul_(2.0).sub_(1.0)  # the elected sign, +1 for a zero sum
        x.mul_(sign)  # survivors are now exactly the positive entries
        survivors = (x > 0).sum(dim=0) if rule.disjoint_mean else None
        x.clamp_min_(0.0)
    else:
        sign = None
        survivors = (x != 0).sum(dim=0) if rule.disjoint_mean else None
    merged = (x if c is None else x.mul_(c)).sum(dim=0)
    if sign is not None:
        merged.mul_(sign)
    if survivors is not None:
        return merged.div_(survivors.clamp_min_(1))
    return merged.div_(x.shape[0])


def merge_chunks(
    deltas: Sequence[Tensor],
    c: Tensor,
    out: Tensor,
    *,
    elect: Election | None,
    thresholds: Sequence[Tensor | None] | None = None,
    keep: Tensor | None = None,
    divisor: float = 1.0,
) -> Tensor:
    """Merge T same-size 1-D deltas chunk by chunk into the 1-D ``out``, in float64 arithmetic.

    Per chunk: the T deltas in float64; where ``keep`` (``[T, numel]`` bool) is False, 0, and the rest divided by
    ``divisor`` (DARE's ``1 − p``); entries of task i with magnitude below ``thresholds[i]`` zeroed (a trim whose
    threshold was taken on the same values); then either ``Σ_i c_i x_i`` (``elect=None``) or elect and merge by the
    rule ``elect`` (``elect_merge_``). Returns ``out``.
    """
    tasks, numel = len(deltas), out.numel()
    if numel == 0:
        return out
    if elect is None and keep is None and thresholds is None:
        return _weighted_sum(deltas, c, out)
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
        if elect is None:
            out[a:b] = (weights * x).sum(dim=0) if tasks > 1 else weights[0] * x[0]
        else:
            out[a:b] = elect_merge_(x, weights, elect)
    return out


def _weighted_sum(deltas: Sequence[Tensor], c: Tensor, out: Tensor) -> Tensor:
    """``Σ_i c_i Δ_i`` into ``out``, chunk by chunk, accumulated in float64 one task at a time (``acc += c_i·Δ_i``).

    Why not ``merge_chunks``' ``[T, chunk]`` buffer: with nothing to mask, trim or elect, one float64 accumulator
    reads each delta once and writes no product (Task Arithmetic and the mean: 3–6x faster per entry on CPU).
    """
    weights = [float(w) for w in c.to(_F64).reshape(-1)]
    numel = out.numel()
    step = min(chunk_size(numel), SUM_CHUNK)
    acc = torch.empty(min(step, numel), dtype=_F64, device=out.device)
    for a, b in ((a, min(numel, a + step)) for a in range(0, numel, step)):
        x = acc[: b - a]
        x.copy_(deltas[0][a:b]).mul_(weights[0])
        for delta, weight in zip(deltas[1:], weights[1:], strict=True):
            x.add_(delta[a:b], alpha=weight)
        out[a:b] = x
    return out
