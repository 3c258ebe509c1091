"""A merged delta of LoRA experts, written back as low-rank factors ``B @ A`` of the smallest exact rank.

Why this is possible: each LoRA expert's delta ``Δ_i = s_i B_i A_i`` has its columns in ``span(B_i)`` and its rows in
``span(A_iᵀ)``. The merge methods that work in factor space keep one or both of these spans (docs/methods.md):

- Task Arithmetic, Iso-C, Iso-CTS, TSV-M: both. Their result is built from singular vectors of sums, residuals or
  single deltas, all inside the joint column space ``span[B_1 … B_T]`` and the joint row space ``span[A_1ᵀ … A_Tᵀ]``.
  WUDI-closed: both too (``R M⁻¹``; ``M`` keeps the joint row space invariant).
- DRM-V, DRM-Iso-V: the joint row space (``Δ_merged = B · V_rᵀ``, ``V_r`` from the stacked rows); its ``B`` is pruned
  and elected entry by entry, so its columns leave ``span[B_i]``. DRM-H, DRM-Iso-H: the joint column space, the
  other way round. RegMean, RegMean++: the joint column space (``Σ_i B_i (A_i G̃_i S⁻¹)``; the data Grams move the
  rows out of ``span[A_iᵀ]``).
- TIES, DARE, WUDI (Adam): neither. Trimming or dropping single entries, or Adam's elementwise steps, make the
  result full rank.

Each method's registry entry says which (``MergeMethod.lora_span``); docs/interop.md has the proofs.

So ``Δ_merged = (Δ_merged Q)(Q)ᵀ`` with ``Q`` an orthonormal basis of the joint row space (or ``P Pᵀ Δ_merged`` for
the column space), and a thin SVD of the small ``n × Σr`` (or ``Σr × m``) matrix gives the factors with the rank of
the merged delta itself, at most ``Σ r_i``. ``factor_delta`` tries both spans and keeps the one that loses less; the
part it loses (the residual outside the span, plus any components cut by ``rank_tol`` or ``max_rank``) is reported as
the relative Frobenius error, from Pythagoras (the pieces are orthogonal), so no dense product is formed. All of it
runs in float64 on the delta's device.

Iso-CTS's orthogonalised ``U``/``V`` may hold more columns than the joint span has dimensions when its common and
task-specific blocks overlap there; components with ``σ ≤ rank_tol · σ_max`` are then dropped inside the method, and
what is left stays in the span: its error is measured, like every method's, and reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from drm_lightning.merging.ops.linalg import thin_svd
from drm_lightning.merging.ops.lowrank import LowRankDelta

RANK_TOL = 1e-7
"""Components with ``σ <= RANK_TOL · σ_max`` are rounding noise of the float32 merged delta, not rank."""
EXACT_TOL = 1e-5
"""A factored form whose relative error exceeds this is not exact: refused unless a ``max_rank`` is asked for."""
_F64 = torch.float64


@dataclass(frozen=True)
class Factored:
    """``B @ A`` ≈ the merged delta of one matrix.

    Attributes:
        B: ``[n, k]`` float64 (``k`` may be 0 for a zero delta).
        A: ``[k, m]`` float64.
        exact_rank: components above ``rank_tol`` before any ``max_rank`` cut (the merged delta's numerical rank
            within the span used; for ``basis="dense"``, up to ``max_rank`` only).
        error: ``‖Δ − B A‖_F / ‖Δ‖_F`` (0 for a zero delta).
        basis: ``"rows"`` (joint row space of the A factors), ``"columns"`` (of the B factors) or ``"dense"`` (a
            truncated SVD of the delta itself, where neither span holds it).
    """

    B: Tensor
    A: Tensor
    exact_rank: int
    error: float
    basis: str

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _split(u: Tensor, s: Tensor, vh: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Balanced factors ``(U √S, √S Vᵀ)`` of the first ``keep`` components (both sides of similar norm)."""
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root.unsqueeze(1) * vh[:keep]


def _kept(s: Tensor, rank_tol: float, max_rank: int | None) -> tuple[int, int]:
    """``(exact, keep)``: components above ``rank_tol · σ_max``, and those of them ``max_rank`` lets through."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0, 0
    exact = int((s > rank_tol * s[0]).sum())
    return exact, exact if max_rank is None else min(exact, max_rank)


def _error(total: Tensor, kept: Tensor) -> float:
    """``sqrt(‖Δ‖² − ‖kept part‖²) / ‖Δ‖``, clamped at 0 (rounding can make the difference slightly negative)."""
    return math.sqrt(max(float(total - kept), 0.0) / float(total))


def factor_delta(
    delta: Tensor,
    factors: Sequence[LowRankDelta | None],
    *,
    rank_tol: float = RANK_TOL,
    max_rank: int | None = None,
) -> Factored:
    """Factor one merged ``[n, m]`` delta through the joint spans of the experts' LoRA factors.

    Args:
        delta: the merged delta (any float dtype).
        factors: each task's LoRA factors of this matrix (``None``: that task left it unchanged).
        rank_tol: relative cut below which singular values count as zero.
        max_rank: keep at most this many components (``None``: the exact rank). Where neither span holds the delta
            (TIES, DARE), a truncated SVD of the delta itself is taken, which needs ``max_rank``.

    Returns:
        A ``Factored``; its ``error`` says how far ``B @ A`` is from ``delta`` (relative Frobenius norm).
    """
    if delta.dim() != 2:
        raise ValueError(f"factor_delta: expected a 2-D delta, got shape {tuple(delta.shape)}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank={max_rank!r}: expected a positive integer or None")
    d = delta.detach().to(_F64)
    n, m = d.shape
    total = (d * d).sum()
    empty = d.new_zeros((n, 0)), d.new_zeros((0, m))
    if float(total) == 0.0:
        return Factored(*empty, exact_rank=0, error=0.0, basis="rows")
    present = [f for f in factors if f is not None and f.rank > 0]
    best: tuple[Tensor, Tensor, Tensor, Tensor, str] | None = None  # (u, s, vh, captured ‖·‖², basis)
    if present:
        rows, _ = torch.linalg.qr(torch.cat([f.A.to(d.device, _F64) for f in present]).mT)  # [m, ≤Σr]
        cols, _ = torch.linalg.qr(torch.cat([f.B.to(d.device, _F64) for f in present], dim=1))  # [n, ≤Σr]
        x, y = d @ rows, cols.mT @ d
        if float((x * x).sum()) >= float((y * y).sum()):
            u, s, wh = torch.linalg.svd(x, full_matrices=False)
            best = (u, s, wh @ rows.mT, (s * s).sum(), "rows")
        else:
            w, s, vh = torch.linalg.svd(y, full_matrices=False)
            best = (cols @ w, s, vh, (s * s).sum(), "columns")
        if _error(total, best[3]) > EXACT_TOL and max_rank is not None:
            best = None  # not in either span: a truncated SVD of the delta does better than the projection
    if best is None:
        if max_rank is None:
            raise ValueError(
                "factor_delta: the delta lies in no span of LoRA factors and no max_rank was given to truncate it"
            )
        u, s, v = thin_svd(d, rank_tol=rank_tol, top=max_rank)
        order = torch.argsort(s, descending=True)
        u, s, v = u[:, order], s[order], v[:, order]
        exact, keep = _kept(s, rank_tol, max_rank)
        b, a = _split(u, s, v.mT, keep)
        return Factored(b, a, exact_rank=exact, error=_error(total, (s[:keep] ** 2).sum()), basis="dense")
    u, s, vh, _, basis = best
    exact, keep = _kept(s, rank_tol, max_rank)
    b, a = _split(u, s, vh, keep)
    return Factored(b, a, exact_rank=exact, error=_error(total, (s[:keep] ** 2).sum()), basis=basis)
