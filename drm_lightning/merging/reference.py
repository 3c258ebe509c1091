"""The merge methods of ``docs/methods.md`` evaluated straight from their equations, in float64 by default.

Why it exists, and why apart from ``functional.py``: the tests and the speed benchmark score the library against
an evaluation of the contract that shares no code with it (scoring it against its own float64 run would hide any
mistake common to both precisions). So this module is deliberately plain: a full ``torch.linalg.svd`` of exactly
the matrix the paper names, polar factors through a second SVD, ``kthvalue`` thresholds for "keep the largest
fraction", explicit loops over tasks; no Gram identities, no low-rank shortcuts, nothing for speed or memory.

``dtype`` runs the same equations in another precision: ``float32`` is the way the methods' authors run them, the
baseline ``benchmarks/merge_speed.py`` races and the error ``tests/methods/test_functional_reference.py`` measures.
Every function takes the task deltas of one parameter (same-shape tensors, any floating dtype), upcasts them to
``dtype`` and returns the merged delta in ``dtype``. The conventions the papers leave open (the rank tolerances, the
DARE mask) are the ones ``docs/methods.md`` fixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

F64 = torch.float64
SHARE_EPS = 1e-6
"""DRM step 4: a renormalisation share ``ν_ij`` at or below this counts as none."""
DRM_RANK_TOL = 1e-2
RANK_TOL = 1e-6
"""Default rank tolerance of Iso-C, Iso-CTS and TSV-M (docs/methods.md, "Rank tolerance")."""

Coefficients = Sequence[float] | None


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


def _coefficients(coefficients: Coefficients, stacked: Tensor) -> Tensor:
    """Per-task coefficients shaped to broadcast over ``stacked`` (default 1 for every task)."""
    tasks = stacked.shape[0]
    if coefficients is None:
        values = torch.ones(tasks, dtype=stacked.dtype, device=stacked.device)
    else:
        if len(coefficients) != tasks:
            raise ValueError(f"coefficients: need one per task ({tasks}), got {len(coefficients)}")
        values = torch.as_tensor([float(c) for c in coefficients], dtype=stacked.dtype, device=stacked.device)
    return values.view(tasks, *([1] * (stacked.ndim - 1)))


def _matrices(stacked: Tensor, name: str) -> None:
    if stacked.ndim != 3:
        raise ValueError(f"deltas: {name} needs 2-D deltas, got shape {tuple(stacked.shape[1:])}")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``‖actual − expected‖_F / ‖expected‖_F`` in float64 (the absolute error where ``expected`` is zero)."""
    actual, expected = actual.detach().to("cpu", F64), expected.detach().to("cpu", F64)
    denominator = float(torch.linalg.vector_norm(expected))
    difference = float(torch.linalg.vector_norm(actual - expected))
    return difference / denominator if denominator > 0 else difference


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


def keep_top_fraction(x: Tensor, fraction: float) -> Tensor:
    """Keep the ``round(fraction · numel)`` entries of largest magnitude (ties at the threshold may keep more).

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


def combine(
    blocks: Sequence[Tensor] | Tensor,
    coefficients: Coefficients | Tensor = None,
    *,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
) -> Tensor:
    """DRM's merge step with its two switches; both on is ``elect_and_merge``. ``elect_sign`` off: every non-zero
    entry survives. ``disjoint_mean`` off: ``Σ c_i · survivors_i`` is divided by ``T`` instead of the survivors."""
    stacked = blocks if isinstance(blocks, Tensor) else torch.stack(list(blocks))
    weights = coefficients if isinstance(coefficients, Tensor) else _coefficients(coefficients, stacked)
    if elect_sign:
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
        survives = (stacked != 0) & (torch.sign(stacked) == elected)
    else:
        survives = stacked != 0
    total = torch.where(survives, stacked * weights, torch.zeros_like(stacked)).sum(dim=0)
    if not disjoint_mean:
        return total / stacked.shape[0]
    return total / survives.sum(dim=0).clamp_min(1).to(stacked.dtype)


def elect_and_merge(blocks: Sequence[Tensor] | Tensor, coefficients: Coefficients | Tensor = None) -> Tensor:
    """Unweighted sign election over the blocks (a zero sum elects +), then ``Σ c_i · survivors_i`` over the number
    of survivors (at least 1). ``blocks``: a sequence or a ``[T, ...]`` stack; a tensor ``coefficients`` must
    broadcast against the stack."""
    return combine(blocks, coefficients)


def polar(a: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``a = P Σ Qᵀ`` (the Iso-CTS and TSV-M orthogonalisation)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


# --------------------------------------------------------------------------------------------------------------------
# Elementwise methods
# --------------------------------------------------------------------------------------------------------------------


def task_arithmetic(deltas: Sequence[Tensor], coefficients: Coefficients = None, *, dtype: torch.dtype = F64) -> Tensor:
    """``Σ_i c_i Δ_i``."""
    stacked = _stack(deltas, dtype)
    return (stacked * _coefficients(coefficients, stacked)).sum(dim=0)


def task_mean(deltas: Sequence[Tensor], coefficients: Coefficients = None, *, dtype: torch.dtype = F64) -> Tensor:
    """``(1/T) Σ_i c_i Δ_i``: Iso-C's, Iso-CTS's and TSV-M's rule for non-matrix parameters."""
    return task_arithmetic(deltas, coefficients, dtype=dtype) / len(deltas)


def drm_nonmatrix(
    deltas: Sequence[Tensor],
    nonmatrix_drop_rate: float = 0.0,
    coefficients: Coefficients = None,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
    *,
    dtype: torch.dtype = F64,
) -> Tensor:
    """DRM's rule for non-matrix parameters: trim each delta to its largest fraction ``1 − p_nl``, elect, merge."""
    stacked = _stack(deltas, dtype)
    trimmed = torch.stack([keep_top_fraction(d, 1.0 - nonmatrix_drop_rate) for d in stacked])
    return combine(trimmed, coefficients, elect_sign=elect_sign, disjoint_mean=disjoint_mean)


def ties(
    deltas: Sequence[Tensor], density: float = 0.2, coefficients: Coefficients = None, *, dtype: torch.dtype = F64
) -> Tensor:
    """Trim each delta to its largest fraction ``density`` (``kthvalue`` per task), then elect and merge."""
    stacked = _stack(deltas, dtype)
    trimmed = torch.stack([keep_top_fraction(d, density) for d in stacked])
    return elect_and_merge(trimmed, _coefficients(coefficients, stacked))


def dare(
    deltas: Sequence[Tensor],
    drop_rate: float = 0.9,
    seed: int = 0,
    merge: str = "task_arithmetic",
    coefficients: Coefficients = None,
    density: float = 0.2,
    *,
    dtype: torch.dtype = F64,
) -> Tensor:
    """Drop with probability ``drop_rate`` (one float32 ``torch.rand([T, *shape])`` draw from a generator on the
    deltas' device seeded with ``seed``, kept where ``>= drop_rate``), rescale by ``1/(1 − p)``, then TA or TIES."""
    if merge not in ("task_arithmetic", "ties"):
        raise ValueError(f"merge: must be 'task_arithmetic' or 'ties', got {merge!r}")
    stacked = _stack(deltas, dtype)
    if drop_rate > 0:
        generator = torch.Generator(device=stacked.device)
        generator.manual_seed(seed)
        draw = torch.rand(stacked.shape, generator=generator, dtype=torch.float32, device=stacked.device)
        stacked = torch.where(draw >= drop_rate, stacked / (1 - drop_rate), torch.zeros_like(stacked))
    if merge == "ties":
        return ties(list(stacked), density, coefficients, dtype=dtype)
    return task_arithmetic(list(stacked), coefficients, dtype=dtype)


def model_stock(deltas: Sequence[Tensor], coefficients: Coefficients = None, *, dtype: torch.dtype = F64) -> Tensor:
    """Model Stock: ``t · (1/T) Σ_i c_i Δ_i``, ``t = T·cos θ / (1 + (T − 1)·cos θ)``, ``cos θ`` the mean over pairs
    ``i < j`` of ``⟨Δ_i, Δ_j⟩ / (‖Δ_i‖ ‖Δ_j‖)`` of the flattened deltas (0 where a norm is 0) held to ``[0, 1]``;
    ``T = 1``: ``t = 1``."""
    stacked = _stack(deltas, dtype)
    tasks = stacked.shape[0]
    vectors = stacked.reshape(tasks, -1)
    t = torch.ones((), dtype=dtype)
    if tasks > 1:
        cosines = []
        for i in range(tasks):
            for j in range(i + 1, tasks):
                a, b = vectors[i], vectors[j]
                norms = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
                cosines.append(torch.dot(a, b) / norms if norms > 0 else torch.zeros((), dtype=dtype))
        cos = torch.stack(cosines).mean().clamp(0, 1)
        t = tasks * cos / (1 + (tasks - 1) * cos)
    return t * task_mean(list(stacked), coefficients, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# DRM
# --------------------------------------------------------------------------------------------------------------------


def drm(
    deltas: Sequence[Tensor],
    direction: str = "vertical",
    drop_rate: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
    *,
    dtype: torch.dtype = F64,
    renormalise: bool = True,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
) -> Tensor:
    """Decom-Renorm-Merge through a thin SVD of the stacked deltas, as the DRM authors' code does.

    Vertical stacks rows (``[T·n, m]``); horizontal is the same on the transposes, which is the authors' column
    stacking with ``U`` and ``V`` swapped. The switches are the paper's ablations (all on is DRM): ``renormalise``
    off prunes the raw blocks ``U_i`` and weights them by the joint ``σ``; ``elect_sign`` and ``disjoint_mean`` as
    ``combine``.
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
    if renormalise:
        shares = torch.linalg.vector_norm(u_blocks, dim=1)  # [T, r]; over tasks, Σ shares² = 1
        counted = shares > SHARE_EPS
        safe_shares = torch.where(counted, shares, torch.ones_like(shares))
        u_hat = torch.where(counted[:, None, :], u_blocks / safe_shares[:, None, :], torch.zeros_like(u_blocks))
        task_s = s[:rank] * shares  # S_i = S ⊙ ν_i
    else:
        u_hat, task_s = u_blocks, s[:rank].expand(tasks, rank)
    blocks = keep_top_fraction(u_hat, 1.0 - drop_rate) * task_s[:, None, :]
    switches = {"elect_sign": elect_sign, "disjoint_mean": disjoint_mean}
    merged = combine(blocks, _coefficients(coefficients, blocks), **switches) @ vh[:rank]
    return merged.T if direction == "horizontal" else merged


def _drm_in(direction: str) -> Callable[..., Tensor]:
    """``drm`` with ``direction`` fixed, called as ``f(deltas, drop_rate, coefficients, rank_tol, *, dtype,
    **switches)`` (``switches``: ``renormalise``, ``elect_sign``, ``disjoint_mean``)."""

    def fixed(
        deltas: Sequence[Tensor],
        drop_rate: float = 0.8,
        coefficients: Coefficients = None,
        rank_tol: float = DRM_RANK_TOL,
        *,
        dtype: torch.dtype = F64,
        **switches: bool,
    ) -> Tensor:
        return drm(deltas, direction, drop_rate, coefficients, rank_tol, dtype=dtype, **switches)

    fixed.__name__ = fixed.__qualname__ = f"drm_{direction}"
    fixed.__doc__ = f"DRM-{direction[0].upper()}: ``drm(direction={direction!r})``, the switches as ``drm``'s."
    return fixed


drm_vertical = _drm_in("vertical")
drm_horizontal = _drm_in("horizontal")


# --------------------------------------------------------------------------------------------------------------------
# Iso-C, Iso-CTS, TSV-M
# --------------------------------------------------------------------------------------------------------------------


def iso_c(
    deltas: Sequence[Tensor], coefficients: Coefficients = None, rank_tol: float = RANK_TOL, *, dtype: torch.dtype = F64
) -> Tensor:
    """``mean(S) U Vᵀ`` from the thin SVD of ``Σ_i c_i Δ_i``, components above ``rank_tol · σ_max`` only."""
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "iso_c")
    total = (stacked * _coefficients(coefficients, stacked)).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(total)
    rank = int((s > rank_tol * s[0]).sum())
    return s[:rank].mean() * (u[:, :rank] @ vh[:rank])


def iso_cts_split(rows: int, cols: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(k_c, s)``: common components and per-task components, so that ``k_c + T·s = min(rows, cols)``."""
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction: must lie in [0, 1], got {common_fraction}")
    full = min(rows, cols)
    common = int(common_fraction * full)
    common = full - round((full - common) / tasks) * tasks
    return common, (full - common) // tasks


def _drop_small(parts: list[tuple[Tensor, Tensor, Tensor]], rank_tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate SVD blocks, dropping components with ``σ <= rank_tol · max σ`` over all blocks."""
    largest = max((float(s.max()) for _, s, _ in parts if s.numel()), default=0.0)
    keep = [s > rank_tol * largest for _, s, _ in parts]
    u = torch.cat([p[0][:, k] for p, k in zip(parts, keep, strict=True)], dim=1)
    s = torch.cat([p[1][k] for p, k in zip(parts, keep, strict=True)])
    vh = torch.cat([p[2][k] for p, k in zip(parts, keep, strict=True)], dim=0)
    return u, s, vh


def iso_cts(
    deltas: Sequence[Tensor],
    common_fraction: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    dtype: torch.dtype = F64,
) -> Tensor:
    """Iso-CTS: common subspace of the sum plus each task's top residual components, orthogonalised, isotropic.

    Common components at or below ``rank_tol · σ_1`` of the sum are dropped before the residuals are taken (their
    singular vectors are arbitrary); then every component, common or task-specific, at or below ``rank_tol`` times
    the largest singular value of all these decompositions is dropped before ``mean(S)``.
    """
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "iso_cts")
    tasks, rows, cols = stacked.shape
    weighted = stacked * _coefficients(coefficients, stacked)
    common, per_task = iso_cts_split(rows, cols, tasks, common_fraction)
    u, s, vh = torch.linalg.svd(weighted.sum(dim=0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    if s_c.numel():
        kept = s_c > rank_tol * s_c[0]
        u_c, s_c, vh_c = u_c[:, kept], s_c[kept], vh_c[kept]
    parts = [(u_c, s_c, vh_c)]
    for delta in weighted:
        residual = delta - u_c @ (u_c.T @ delta)
        u_i, s_i, vh_i = torch.linalg.svd(residual, full_matrices=False)
        parts.append((u_i[:, :per_task], s_i[:per_task], vh_i[:per_task]))
    u, s, vh = _drop_small(parts, rank_tol)
    if s.numel() == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=stacked.device)
    return s.mean() * (polar(u) @ polar(vh.T).T)


def tsv_m(
    deltas: Sequence[Tensor], coefficients: Coefficients = None, rank_tol: float = RANK_TOL, *, dtype: torch.dtype = F64
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


def drm_iso(
    deltas: Sequence[Tensor],
    direction: str = "vertical",
    drop_rate: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
    *,
    dtype: torch.dtype = F64,
) -> Tensor:
    """DRM-Iso (``merging/methods/drm_iso.py``, not in the DRM paper): DRM's merged delta ``M = U S Vᵀ`` flattened to
    ``σ̄ · U_k V_kᵀ`` over its components above ``RANK_TOL · σ_1(M)``, ``σ̄`` the mean singular value of
    ``Σ_i c_i Δ_i`` above ``RANK_TOL`` times its largest (Iso-C's level)."""
    merged = drm(deltas, direction, drop_rate, coefficients, rank_tol, dtype=dtype)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(merged)
    rank = int((s > RANK_TOL * s[0]).sum())
    s_sum = torch.linalg.svdvals(task_arithmetic(deltas, coefficients, dtype=dtype))
    level = s_sum[s_sum > RANK_TOL * s_sum[0]].mean()
    return level * (u[:, :rank] @ vh[:rank])


REGMEAN_RIDGE = 1e-8
"""RegMean's default relative ridge (docs/methods.md, RegMean)."""


def regmean(
    deltas: Sequence[Tensor],
    grams: Sequence[Tensor] | None,
    alpha: float = 0.9,
    coefficients: Coefficients = None,
    ridge: float = REGMEAN_RIDGE,
    *,
    dtype: torch.dtype = F64,
) -> Tensor:
    """RegMean: ``G̃_i = α G_i + (1 − α) diag(G_i)``, ``ρ̄ = ridge · tr(Σ G̃_i) / (T m)``,
    ``Δ = (Σ_i c_i Δ_i (G̃_i + ρ̄ I)) (Σ_i (G̃_i + ρ̄ I))⁻¹``; no Grams, or all zero: the plain mean."""
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "regmean")
    if grams is None:
        return task_mean(deltas, coefficients, dtype=dtype)
    tasks, _, cols = stacked.shape
    eye = torch.eye(cols, dtype=dtype)
    shrunk = [alpha * g.to(dtype) + (1 - alpha) * torch.diag(torch.diagonal(g.to(dtype))) for g in grams]
    rho = ridge * float(torch.trace(sum(shrunk))) / (tasks * cols)
    if rho == 0:
        return task_mean(deltas, coefficients, dtype=dtype)
    c = _coefficients(coefficients, stacked)
    left = sum(c[i] * stacked[i] @ (shrunk[i] + rho * eye) for i in range(tasks))
    right = sum(g + rho * eye for g in shrunk)
    return left @ torch.linalg.inv(right)


# --------------------------------------------------------------------------------------------------------------------
# WUDI
# --------------------------------------------------------------------------------------------------------------------


def wudi_objective(
    merged: Tensor, deltas: Sequence[Tensor], coefficients: Coefficients = None, ridge: float = 0.0
) -> Tensor:
    """``Σ_i w_i ‖(Δ − Δ_i) Δ_iᵀ‖²_F + ρ (tr G / m) ‖Δ‖²_F`` over ``Δ_i ← c_i Δ_i``, ``w_i = 1/‖Δ_i‖²_F`` (0 for a
    zero delta), ``G = Σ_i w_i Δ_iᵀ Δ_i``, ``m`` the input dimension; in ``merged``'s dtype, differentiable in it."""
    stacked = _stack(deltas, merged.dtype)
    _matrices(stacked, "wudi")
    weighted = stacked * _coefficients(coefficients, stacked)
    total = merged.new_zeros(())
    trace = 0.0
    for delta in weighted:
        norm2 = float((delta * delta).sum())
        if norm2 == 0:
            continue
        total = total + ((merged - delta) @ delta.T).square().sum() / norm2
        trace += float(torch.trace(delta.T @ delta)) / norm2
    return total + ridge * trace / merged.shape[1] * merged.square().sum()


def wudi(
    deltas: Sequence[Tensor],
    steps: int = 300,
    lr: float = 1e-5,
    coefficients: Coefficients = None,
    *,
    dtype: torch.dtype = F64,
) -> Tensor:
    """WUDI as the authors' loop: ``torch.optim.Adam`` (defaults, lr ``lr``) on ``wudi_objective`` through autograd,
    ``steps`` steps from ``Σ_i c_i Δ_i``."""
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "wudi")
    merged = torch.nn.Parameter((stacked * _coefficients(coefficients, stacked)).sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        loss = wudi_objective(merged, list(stacked), coefficients)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def wudi_closed(
    deltas: Sequence[Tensor], ridge: float = 0.01, coefficients: Coefficients = None, *, dtype: torch.dtype = F64
) -> Tensor:
    """``Δ = R (G + ρ (tr G / m) I)⁻¹``, ``G = Σ_i w_i Δ_iᵀΔ_i``, ``R = Σ_i w_i Δ_i Δ_iᵀ Δ_i`` over ``Δ_i ← c_i Δ_i``,
    ``w_i = 1/‖Δ_i‖²_F`` (0 for a zero delta); a linear solve of the full ``m × m`` system. All-zero deltas give 0."""
    stacked = _stack(deltas, dtype)
    _matrices(stacked, "wudi_closed")
    tasks, rows, cols = stacked.shape
    weighted = stacked * _coefficients(coefficients, stacked)
    gram = torch.zeros(cols, cols, dtype=dtype, device=stacked.device)
    rhs = torch.zeros(rows, cols, dtype=dtype, device=stacked.device)
    for delta in weighted:
        norm2 = (delta * delta).sum()
        if norm2 == 0:
            continue
        gram += delta.T @ delta / norm2
        rhs += delta @ delta.T @ delta / norm2
    trace = torch.trace(gram)
    if trace == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=stacked.device)
    system = gram + ridge * trace / cols * torch.eye(cols, dtype=dtype, device=stacked.device)
    return torch.linalg.solve(system, rhs.T).T  # Δ·system = R, system symmetric
