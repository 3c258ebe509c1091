"""Straightforward merge methods: the baseline that ``merge_speed.py`` races, and its float64 reference.

Each function follows ``ALGORITHMS.md`` literally, the way the methods' authors wrote them: a thin SVD
(``torch.linalg.svd``) of exactly the matrix the paper names, polar factors through a second SVD, and ``kthvalue``
thresholds for "keep the largest fraction". No Gram-matrix identities, no low-rank shortcuts.

That makes this file useful twice. Run in float32 (``dtype=torch.float32``, what the authors run) it is the speed
and accuracy baseline. Run in float64 it is an evaluation of the contract that shares no code with
``drm_lightning.merging.functional``, so the benchmark can score both implementations against it: scoring the
library against its own float64 run would hide any mistake common to both precisions.

Every function takes the task deltas of one parameter (a sequence of same-shape tensors, any floating dtype),
upcasts them to ``dtype`` (as the authors' code does before its SVD) and returns the merged delta in ``dtype``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SHARE_EPS = 1e-6
"""A renormalisation share ``nu_ij`` at or below this counts as none (ALGORITHMS.md, DRM step 4)."""


def _stack(deltas: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Stack the deltas into ``[T, ...]`` in the compute dtype; reject what the contract does not define."""
    if len(deltas) == 0:
        raise ValueError("deltas: need at least one task delta, got an empty sequence")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"deltas: all task deltas must have one shape, got {sorted(shapes)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: need a floating dtype, got {dtype}")
    return torch.stack([d.to(dtype) for d in deltas])


def _coefficients(coefficients: Sequence[float] | None, stacked: Tensor) -> Tensor:
    """Per-task coefficients shaped to broadcast over ``stacked`` (default 1 for every task)."""
    tasks = stacked.shape[0]
    if coefficients is None:
        values = torch.ones(tasks, dtype=stacked.dtype, device=stacked.device)
    else:
        if len(coefficients) != tasks:
            raise ValueError(f"coefficients: need one per task ({tasks}), got {len(coefficients)}")
        values = torch.as_tensor(list(coefficients), dtype=stacked.dtype, device=stacked.device)
    return values.view(tasks, *([1] * (stacked.ndim - 1)))


def _matrices(stacked: Tensor, name: str) -> None:
    if stacked.ndim != 3:
        raise ValueError(f"deltas: {name} needs 2-D deltas, got shape {tuple(stacked.shape[1:])}")


def keep_top_fraction(x: Tensor, fraction: float) -> Tensor:
    """Keep the ``round(fraction * numel)`` entries of largest magnitude (ties at the threshold may keep more).

    The threshold is the ``k``-th largest magnitude found with ``kthvalue``, as the TIES and DRM authors do.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: must lie in [0, 1], got {fraction}")
    total = x.numel()
    keep = round(fraction * total)
    if keep >= total:
        return x.clone()
    if keep <= 0:
        return torch.zeros_like(x)
    magnitude = x.abs()
    threshold = magnitude.reshape(-1).kthvalue(total - keep + 1).values
    return torch.where(magnitude >= threshold, x, torch.zeros_like(x))


def elect_and_merge(blocks: Tensor, coefficients: Tensor) -> Tensor:
    """Sign election over ``blocks[T, ...]`` then the survivors' weighted sum over their count (ALGORITHMS.md)."""
    elected = torch.where(blocks.sum(dim=0) >= 0, 1.0, -1.0).to(blocks.dtype)
    survives = (blocks != 0) & (torch.sign(blocks) == elected)
    count = survives.sum(dim=0).clamp_min(1).to(blocks.dtype)
    return torch.where(survives, blocks * coefficients, torch.zeros_like(blocks)).sum(dim=0) / count


def polar(a: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``a = P Sigma Q^T`` (the Iso-CTS and TSV-M orthogonalisation)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def task_arithmetic(
    deltas: Sequence[Tensor], coefficients: Sequence[float] | None = None, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``sum_i c_i Delta_i``."""
    stacked = _stack(deltas, dtype)
    return (stacked * _coefficients(coefficients, stacked)).sum(dim=0)


def ties(
    deltas: Sequence[Tensor],
    density: float = 0.2,
    coefficients: Sequence[float] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Trim each delta to its largest fraction ``density`` (``kthvalue`` per task), then elect and merge."""
    stacked = _stack(deltas, dtype)
    trimmed = torch.stack([keep_top_fraction(d, density) for d in stacked])
    return elect_and_merge(trimmed, _coefficients(coefficients, stacked))


def drm(
    deltas: Sequence[Tensor],
    direction: str = "vertical",
    drop_rate: float = 0.8,
    coefficients: Sequence[float] | None = None,
    rank_tol: float = 1e-2,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decom-Renorm-Merge through a thin SVD of the stacked deltas, as the DRM authors' code does.

    Vertical stacks rows (``[T n, m]``); horizontal is the same on the transposes, which is the authors'
    column stacking with ``U`` and ``V`` swapped.
    """
    if direction not in ("vertical", "horizontal"):
        raise ValueError(f"direction: must be 'vertical' or 'horizontal', got {direction!r}")
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate: must lie in [0, 1], got {drop_rate}")
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "drm")
    if direction == "horizontal":
        stacked = stacked.transpose(1, 2)
    tasks, rows, cols = stacked.shape
    u, s, vh = torch.linalg.svd(stacked.reshape(tasks * rows, cols), full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        merged = torch.zeros(rows, cols, dtype=dtype, device=stacked.device)
        return merged.T if direction == "horizontal" else merged
    rank = int((s > rank_tol * s[0]).sum())
    u_blocks = u[:, :rank].reshape(tasks, rows, rank)
    shares = torch.linalg.vector_norm(u_blocks, dim=1)  # [T, r]; sum over tasks of shares^2 is 1
    counted = shares > SHARE_EPS
    safe_shares = torch.where(counted, shares, torch.ones_like(shares))
    u_hat = torch.where(counted[:, None, :], u_blocks / safe_shares[:, None, :], torch.zeros_like(u_blocks))
    task_s = s[:rank] * shares  # S_i = S * nu_i
    blocks = keep_top_fraction(u_hat, 1.0 - drop_rate) * task_s[:, None, :]
    merged = elect_and_merge(blocks, _coefficients(coefficients, blocks)) @ vh[:rank]
    return merged.T if direction == "horizontal" else merged


def iso_c(
    deltas: Sequence[Tensor],
    coefficients: Sequence[float] | None = None,
    rank_tol: float = 1e-2,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``mean(S) U V^T`` from the thin SVD of ``sum_i c_i Delta_i``, components above ``rank_tol`` only."""
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "iso_c")
    total = (stacked * _coefficients(coefficients, stacked)).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(total)
    rank = int((s > rank_tol * s[0]).sum())
    return s[:rank].mean() * (u[:, :rank] @ vh[:rank])


def iso_cts_split(rows: int, cols: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(k_c, s)``: common components and per-task components, so that ``k_c + T s = min(rows, cols)``."""
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction: must lie in [0, 1], got {common_fraction}")
    full = min(rows, cols)
    common = int(common_fraction * full)
    common = full - round((full - common) / tasks) * tasks
    return common, (full - common) // tasks


def _isotropic(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """``mean(S) polar(U) polar(V^T)^T``: the Iso-CTS final step."""
    if s.numel() == 0:
        return torch.zeros(u.shape[0], vh.shape[1], dtype=u.dtype, device=u.device)
    return s.mean() * (polar(u) @ polar(vh.T).T)


def iso_cts(
    deltas: Sequence[Tensor],
    common_fraction: float = 0.8,
    coefficients: Sequence[float] | None = None,
    rank_tol: float = 1e-2,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Iso-CTS: common subspace of the sum plus each task's top residual components, orthogonalised, isotropic.

    ``rank_tol``: common components at or below ``rank_tol * sigma_1`` of the sum are dropped before the residuals
    are taken (their singular vectors are arbitrary); then every component, common or task-specific, at or below
    ``rank_tol`` times the largest singular value of all these decompositions is dropped before ``mean(S)``.
    """
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "iso_cts")
    tasks, rows, cols = stacked.shape
    weighted = stacked * _coefficients(coefficients, stacked)
    common, per_task = iso_cts_split(rows, cols, tasks, common_fraction)
    u, s, vh = torch.linalg.svd(weighted.sum(dim=0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    if s_c.numel():  # tiny common components are noise directions: keep them out of the projection too
        kept = s_c > rank_tol * s_c[0]
        u_c, s_c, vh_c = u_c[:, kept], s_c[kept], vh_c[kept]
    parts = [(u_c, s_c, vh_c)]
    for delta in weighted:
        residual = delta - u_c @ (u_c.T @ delta)
        u_i, s_i, vh_i = torch.linalg.svd(residual, full_matrices=False)
        parts.append((u_i[:, :per_task], s_i[:per_task], vh_i[:per_task]))
    return _isotropic(*_drop_small(parts, rank_tol))


def _drop_small(parts: list[tuple[Tensor, Tensor, Tensor]], rank_tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate SVD blocks, dropping components with ``sigma <= rank_tol * max sigma`` over all blocks."""
    largest = max((float(s.max()) for _, s, _ in parts if s.numel()), default=0.0)
    keep = [s > rank_tol * largest for _, s, _ in parts]
    u = torch.cat([p[0][:, k] for p, k in zip(parts, keep, strict=True)], dim=1)
    s = torch.cat([p[1][k] for p, k in zip(parts, keep, strict=True)])
    vh = torch.cat([p[2][k] for p, k in zip(parts, keep, strict=True)], dim=0)
    return u, s, vh


def tsv_m(
    deltas: Sequence[Tensor],
    coefficients: Sequence[float] | None = None,
    rank_tol: float = 1e-2,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """TSV-M: each task's top ``min(n, m) // T`` components, orthogonalised by polar factors, recombined."""
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "tsv_m")
    tasks, rows, cols = stacked.shape
    keep = min(rows, cols) // tasks
    if keep == 0:
        raise ValueError(f"deltas: TSV-M keeps min(n, m) // T = 0 components for T={tasks} deltas of {(rows, cols)}")
    parts = []
    for delta in stacked * _coefficients(coefficients, stacked):
        u_i, s_i, vh_i = torch.linalg.svd(delta, full_matrices=False)
        parts.append((u_i[:, :keep], s_i[:keep], vh_i[:keep]))
    u, s, vh = _drop_small(parts, rank_tol)
    if s.numel() == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=stacked.device)
    return polar(u) @ torch.diag(s) @ polar(vh.T).T
