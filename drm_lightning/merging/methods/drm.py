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

from drm_lightning.merging.methods.checks import (
    DIRECTIONS,
    check_direction,
    check_drop_rate,
    check_out_dtype,
    check_rank_tol,
    check_switch,
)
from drm_lightning.merging.methods.drm_joint import joint_basis
from drm_lightning.merging.methods.drm_prune import SHARE_EPS, keep_counts, magnitude_scale, prune_and_merge, thresholds
from drm_lightning.merging.methods.inputs import (
    Coefficients,
    Delta,
    Inputs,
    prepare,
    prepare_elementwise,
    task_coefficients,
)
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.elementwise import Election, merge_chunks, trim_threshold

__all__ = ["DRM_RANK_TOL", "METHODS", "SHARE_EPS", "DrmBasis", "drm", "drm_basis", "drm_nonmatrix"]
DRM_RANK_TOL = 1e-2
"""DRM's rank tolerance ``τ`` (docs/methods.md)."""


def _product(combined: Tensor, basis: Tensor, horizontal: bool, finisher: Inputs, out: torch.dtype | None) -> Tensor:
    """Step 7, ``Δ = B V_rᵀ`` (DRM-H: its transpose, formed directly in the deltas' layout), in the result dtype."""
    return finisher.finish(basis @ combined.mT if horizontal else combined @ basis.mT, out)


def _check_sets(param_sets: Sequence[dict[str, Any]]) -> list[tuple[float, bool, bool, bool]]:
    """``(drop_rate, renormalise, elect_sign, disjoint_mean)`` of every set, defaults filled in, values checked."""
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
    return checked


def _merged_blocks(
    blocks: Tensor, norms: Tensor, sigma: Tensor, c: Tensor, checked: Sequence[tuple[float, bool, bool, bool]]
) -> list[Tensor]:
    """Steps 4–6 for every checked set: the merged ``[n, r]`` blocks ``B``. Sets with the same ``renormalise`` share
    the magnitudes, one selection of all their thresholds and one pass over the chunks (``drm_prune``)."""
    results: list[Tensor | None] = [None] * len(checked)
    for renormalise in (True, False):
        group = [i for i, setting in enumerate(checked) if setting[1] == renormalise]
        if not group:
            continue
        scale = magnitude_scale(norms, sigma, renormalise)
        keeps = keep_counts([checked[i][0] for i in group], blocks.numel())
        found = thresholds(blocks, scale, keeps)
        settings = [(found[k], checked[i][2], checked[i][3]) for i, k in zip(group, keeps, strict=True)]
        for i, merged in zip(group, prune_and_merge(blocks, scale, c, settings), strict=True):
            results[i] = merged
    return results  # type: ignore[return-value]


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
        same ``renormalise`` share those magnitudes, one sample and two counting passes for all their thresholds
        (``elementwise.kth_largest_many``), and one pass that prunes, elects and merges every set chunk by chunk;
        per set there remain the mask, the election and the final product. The kept entries of the weighted blocks
        ``Û_i diag(S_i)`` are the blocks ``B_i = Δ_i V_r`` themselves (no ``Û_i · S_i`` product, no rounding of it).
        """
        out_dtype = check_out_dtype(out_dtype)
        checked = _check_sets(param_sets)
        t, n, r = self.blocks.shape
        if r == 0:  # X = 0 (or a tolerance that keeps nothing)
            shape = (self.basis.shape[0], n) if self.horizontal else (n, self.basis.shape[0])
            return [self._inputs.finish(self.blocks.new_zeros(shape), out_dtype) for _ in checked]
        merged = _merged_blocks(self.blocks, self.norms, self.sigma, self.coefficients, checked)
        return [_product(b, self.basis, self.horizontal, self._inputs, out_dtype) for b in merged]


def _decompose(
    deltas: Sequence[Delta], direction: str, coefficients: Coefficients, rank_tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, bool, Inputs]:
    """Steps 1–3 (``drm_joint.joint_basis``): ``(blocks, norms, sigma, basis, c, horizontal, finisher)``."""
    direction, rank_tol = check_direction(direction), check_rank_tol(rank_tol)
    inputs = prepare("drm", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = task_coefficients("drm", coefficients, inputs.count, inputs.device)
    horizontal = direction == "horizontal"
    blocks, basis = joint_basis(inputs, horizontal, rank_tol)
    finisher = replace(inputs, dense=None, factors=None, lazy=None)  # the unit and dtype; not the deltas
    norms = torch.linalg.vector_norm(blocks, dim=1)  # [T, r]: ‖Δ_i v_j‖ = σ_j ν_ij
    sigma = torch.linalg.vector_norm(norms, dim=0)  # [r]
    return blocks, norms, sigma, basis, c, horizontal, finisher


def drm_basis(
    deltas: Sequence[Delta],
    direction: str = "vertical",
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
) -> DrmBasis:
    """Steps 1–3 of DRM: the joint basis of the stacked deltas and each delta's projection onto it.

    ``drm(deltas, direction, p, c, τ)`` is ``drm_basis(deltas, direction, c, τ).merge(p)``; a search over drop
    rates or DRM's switches calls ``merge`` (or ``merge_all``) on one ``drm_basis``.

    The joint basis comes from one float64 ``eigh`` of the smaller Gram side of the stack (``Σ Δ_iᵀΔ_i`` for
    vertical, ``Σ Δ_iΔ_iᵀ`` for horizontal, or the ``T·n`` row Gram when that is smaller), accumulated one task at a
    time (no float64 stack; ``drm_joint``), and the projections ``B_i = Δ_i V_r`` are formed once, task by task.
    With ``LowRankDelta`` inputs it works in the ``Σ r_i``-dimensional joint row (vertical) or column (horizontal)
    space of the factors: DRM-V is equivariant under ``Δ_i → Δ_i Q`` for orthonormal ``Q``, so this is exact.
    """
    return DrmBasis(*_decompose(deltas, direction, coefficients, rank_tol))


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
    blocks, norms, sigma, basis, c, horizontal, finisher = _decompose(deltas, direction, coefficients, rank_tol)
    if blocks.shape[2] == 0:  # X = 0 (or a tolerance that keeps nothing)
        return finisher.finish(blocks.new_zeros(finisher.shape), out_dtype)
    setting = (drop_rate, switches["renormalise"], switches["elect_sign"], switches["disjoint_mean"])
    (merged,) = _merged_blocks(blocks, norms, sigma, c, [setting])
    del blocks  # the projections' last use: freed before the product (the working memory's second peak)
    return _product(merged, basis, horizontal, finisher, out_dtype)


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
    flat, c, out = prepare_elementwise("drm", deltas, coefficients, out_dtype)  # chunked: no float64 stack
    thresholds = [trim_threshold(x, 1.0 - nonmatrix_drop_rate) for x in flat.flats] if nonmatrix_drop_rate else None
    rule = Election(elect_sign, disjoint_mean)
    return merge_chunks(flat.flats, c, out, elect=rule, thresholds=thresholds).reshape(flat.shape)


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
        lora_span="rows" if direction[0] == "v" else "columns",
    )
    for direction in DIRECTIONS
)
"""The registry's entries of this module: DRM-V and DRM-H (``merging/methods/registry.py`` collects them)."""
