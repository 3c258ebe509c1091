"""DRM-Iso: DRM's merge, then the isotropic rescaling of the merged spectrum (not in the DRM paper).

Why (``docs/drm_study.md``): on the demo's four MiniLM experts DRM's merged delta keeps Task Arithmetic's
anisotropic spectrum (effective rank ~80 of 384, σ₁ ≈ 12 × the mean singular value) and with it Task Arithmetic's
accuracy, while Iso-C gains over Task Arithmetic by flattening that spectrum. DRM-Iso keeps DRM's subspace — joint
decomposition, renormalisation, pruning, sign election, disjoint mean — and gives every merged direction the same
singular value, as Iso-C does for the plain sum:

    M = DRM(Δ_1, …, Δ_T) = U S Vᵀ,   Δ_merged = σ̄ · U_k V_kᵀ,

``k`` the components of ``M`` above ``RANK_TOL · σ_1(M)`` and ``σ̄`` Iso-C's level, the mean singular value of
``Σ_i c_i Δ_i`` above ``RANK_TOL`` times its largest: λ then sits on Iso-C's scale (the SVD methods' default grid),
and only the directions differ from Iso-C. Non-matrix parameters take Iso-C's plain mean (registry).

Exact in float64 like every method here: DRM through ``drm.drm_basis`` (whose joint basis a drop-rate
search reuses, ``drm_iso_basis``), the flattening through a float64 decomposition of the merged ``[n, m]`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from drm_lightning.merging.methods.basic import task_arithmetic, task_mean
from drm_lightning.merging.methods.checks import DIRECTIONS, RANK_TOL, check_drop_rate, check_out_dtype
from drm_lightning.merging.methods.drm import DRM_RANK_TOL, DrmBasis, drm_basis
from drm_lightning.merging.methods.inputs import Coefficients, Delta
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.linalg import factored_svd, thin_svd
from drm_lightning.merging.ops.lowrank import LowRankDelta

_F64 = torch.float64
DRM_ISO_REFERENCE = "docs/drm_study.md"
"""Where DRM-Iso (a variant this project measured, not a paper's method) is described."""


def _result_dtype(deltas: Sequence[Delta]) -> torch.dtype:
    dtype = deltas[0].dtype
    for delta in deltas[1:]:
        dtype = torch.promote_types(dtype, delta.dtype)
    return dtype


def _kept(s: Tensor) -> Tensor:
    """Components above ``RANK_TOL`` times the largest (none of a zero matrix)."""
    return s > RANK_TOL * s.amax() if s.numel() else s > 0


def iso_level(deltas: Sequence[Delta], coefficients: Coefficients = None) -> Tensor:
    """Iso-C's ``σ̄``: the mean singular value of ``Σ_i c_i Δ_i`` above ``RANK_TOL · σ_1`` (0-d float64, 0 if none).

    Factored deltas are decomposed in the joint space of their factors (no dense ``[n, m]`` sum).
    """
    c = [1.0] * len(deltas) if coefficients is None else [float(x) for x in coefficients]
    if len(c) != len(deltas):
        raise ValueError(f"drm_iso: coefficients has {len(c)} entries for {len(deltas)} deltas: {list(c)!r}")
    if all(isinstance(d, LowRankDelta) for d in deltas) and sum(d.rank for d in deltas) > 0:
        factors = [d.factors(_F64) for d in deltas]  # type: ignore[union-attr]
        left = torch.cat([ci * b for ci, (b, _) in zip(c, factors, strict=True)], dim=1)
        s = factored_svd(left, torch.cat([a for _, a in factors]))[1]
    else:
        s = thin_svd(task_arithmetic(deltas, c, out_dtype=_F64), rank_tol=RANK_TOL)[1]
    keep = _kept(s)
    return s[keep].mean() if bool(keep.any()) else s.new_zeros(())


def flatten(merged: Tensor, level: Tensor) -> Tensor:
    """``level · U_k V_kᵀ`` for ``merged = U S Vᵀ`` (float64), components above ``RANK_TOL · σ_1``."""
    u, s, v = thin_svd(merged, rank_tol=RANK_TOL)
    keep = _kept(s)
    if not bool(keep.any()):
        return torch.zeros_like(merged)
    return level * (u[:, keep] @ v[:, keep].mT)


@dataclass(frozen=True, eq=False)
class DrmIsoBasis:
    """DRM's joint basis and Iso-C's level of one parameter: DRM-Iso at any drop rate from one decomposition.

    Attributes:
        drm: ``drm.drm_basis`` of the deltas.
        level: Iso-C's ``σ̄`` (``iso_level``).
        dtype: The deltas' dtype (the default result dtype).
    """

    drm: DrmBasis
    level: Tensor
    dtype: torch.dtype

    def merge(self, drop_rate: float = 0.8, *, out_dtype: torch.dtype | None = None) -> Tensor:
        """DRM-Iso at ``drop_rate`` (see ``drm_iso``)."""
        out_dtype = check_out_dtype(out_dtype)
        merged = self.drm.merge(check_drop_rate(drop_rate), out_dtype=_F64)
        return flatten(merged, self.level).to(out_dtype or self.dtype)


def drm_iso_basis(
    deltas: Sequence[Delta],
    direction: str = "vertical",
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
) -> DrmIsoBasis:
    """The drop-rate-independent part of ``drm_iso``: DRM's joint basis and Iso-C's level."""
    basis = drm_basis(deltas, direction, coefficients, rank_tol)  # validates everything
    return DrmIsoBasis(basis, iso_level(deltas, coefficients), _result_dtype(deltas))


def drm_iso(
    deltas: Sequence[Delta],
    direction: str = "vertical",
    drop_rate: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = DRM_RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DRM-Iso (see the module docstring): DRM's merged directions, each at Iso-C's mean singular value.

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        direction: DRM's ``"vertical"`` or ``"horizontal"``.
        drop_rate: DRM's pruned fraction ``p`` in ``[0, 1)``.
        coefficients: ``c_i``, as DRM and Iso-C use them.
        rank_tol: DRM's relative rank tolerance ``τ``.
        out_dtype: Result dtype (default: the deltas').
    """
    drop_rate, out_dtype = check_drop_rate(drop_rate), check_out_dtype(out_dtype)
    return drm_iso_basis(deltas, direction, coefficients, rank_tol).merge(drop_rate, out_dtype=out_dtype)


METHODS = tuple(  # not a published method: DRM followed by Iso-C's flat spectrum (docs/drm_study.md)
    MergeMethod(
        f"drm_iso_{direction[0]}",
        f"DRM-Iso-{direction[0].upper()}",
        DRM_ISO_REFERENCE,
        drm_iso,
        True,
        {"direction": direction, "drop_rate": 0.8, "rank_tol": DRM_RANK_TOL},
        frozenset({"direction"}),
        elementwise=task_mean,
        prepare=drm_iso_basis,
        prepare_keys=frozenset({"direction", "rank_tol"}),
        lora_span="rows" if direction[0] == "v" else "columns",
    )
    for direction in DIRECTIONS
)
"""The registry's entries of this module; non-matrix parameters take Iso-C's plain mean (``basic.task_mean``)."""
