"""DRM — Decom-Renorm-Merge (arXiv 2505.23117): the joint decomposition, its cached basis and the non-matrix rule.

``drm_basis`` computes steps 1–3 of docs/methods.md once (the cost), ``DrmBasis.merge`` / ``merge_all`` steps 4–7
at any drop rate and switch setting (a search shares the basis), ``drm`` is the two in one call, and
``drm_nonmatrix`` is DRM's rule for non-matrix parameters and excluded matrices. Float64 throughout (the Gram
``eigh`` of ``linalg.py``); ``LowRankDelta`` factors are merged in their joint ``Σ r_i``-dimensional space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merging.elementwise import keep_count, kth_largest_abs, merge_chunks, trim_threshold
from drm_lightning.merging.linalg import thin_svd
from drm_lightning.merging.methods.basic import elect_merge, keep_top
from drm_lightning.merging.methods.checks import (
    DIRECTIONS,
    check_direction,
    check_drop_rate,
    check_out_dtype,
    check_rank_tol,
    check_switch,
)
from drm_lightning.merging.methods.inputs import (
    Coefficients,
    Delta,
    Inputs,
    prepare,
    prepare_elementwise,
    task_coefficients,
)
from drm_lightning.merging.methods.spec import MergeMethod

SHARE_EPS = 1e-6
"""DRM: a per-task share ``ν_ij`` at or below this counts as none (that column of ``Û_i`` is zero)."""
DRM_RANK_TOL = 1e-2
"""DRM's rank tolerance ``τ`` (docs/methods.md)."""


def _combine(stack: Tensor, c: Tensor, elect_sign: bool, disjoint_mean: bool) -> Tensor:
    """The merge step of DRM with its two switches (the DRM authors' ``enable_sign_resolution`` and
    ``enable_disjoint_mean``): both on is elect and merge (``elect_merge``).

    ``elect_sign`` off: every non-zero entry survives. ``disjoint_mean`` off: divide ``Σ_i c_i · survivors_i`` by
    ``T`` (the plain mean) instead of by the number of survivors.
    """
    if elect_sign and disjoint_mean:
        return elect_merge(stack, c)
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
    _inputs: Inputs

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
        out_dtype = check_out_dtype(out_dtype)
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
    inputs = prepare("drm", deltas, matrix=True, keep_factors=True, normalise=True)
    c = task_coefficients("drm", coefficients, inputs.count, inputs.device)
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
    out_dtype = check_out_dtype(out_dtype)
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
    out_dtype = check_out_dtype(out_dtype)
    if elect_sign and disjoint_mean:  # DRM's rule itself: chunked, no float64 stack (elementwise.merge_chunks)
        flat, c, out = prepare_elementwise("drm", deltas, coefficients, out_dtype)
        thresholds = [trim_threshold(x, 1.0 - nonmatrix_drop_rate) for x in flat.flats] if nonmatrix_drop_rate else None
        return merge_chunks(flat.flats, c, out, elect=True, thresholds=thresholds).reshape(flat.shape)
    inputs = prepare("drm", deltas)
    c = task_coefficients("drm", coefficients, inputs.count, inputs.device)
    stack = inputs.dense
    if nonmatrix_drop_rate > 0:
        stack = keep_top(stack, 1.0 - nonmatrix_drop_rate, per_row=True)
    return inputs.finish(_combine(stack, c, elect_sign, disjoint_mean), out_dtype)


_DRM_DEFAULTS: dict[str, Any] = {
    "drop_rate": 0.8,
    "rank_tol": DRM_RANK_TOL,
    "nonmatrix_drop_rate": 0.0,
    "renormalise": True,
    "elect_sign": True,
    "disjoint_mean": True,
}
METHODS = tuple(
    MergeMethod(
        f"drm_{direction[0]}",
        f"DRM-{direction[0].upper()}",
        "https://arxiv.org/abs/2505.23117",
        drm,
        True,
        {"direction": direction, **_DRM_DEFAULTS},
        frozenset({"direction"}),
        elementwise=drm_nonmatrix,
        elementwise_keys=frozenset({"nonmatrix_drop_rate", "elect_sign", "disjoint_mean"}),
        elementwise_only=frozenset({"nonmatrix_drop_rate"}),
        prepare=drm_basis,
        prepare_keys=frozenset({"direction", "rank_tol"}),
    )
    for direction in DIRECTIONS
)
"""The registry's entries of this module: DRM-V and DRM-H (``merging/registry.py`` collects them)."""
