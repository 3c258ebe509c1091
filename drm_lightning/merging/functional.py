"""Merge methods as pure tensor functions, in one namespace: a façade over ``drm_lightning.merging.methods``.

Why a façade (as ``torch.nn.functional`` is one): callers — the tests, the benchmarks, a notebook — reach every
method and its shared checks as ``F.drm``, ``F.iso_c``, ``F.RANK_TOL`` without knowing which family module holds it,
and the split into ``methods/`` (one module per family, docs/architecture.md) stays an internal layout. Nothing is
defined here. A new method needs no edit here: the registry finds it in its own module (docs/methods.md, "Adding a
method"); re-export it below only if it should be callable as ``F.<name>``.

Every method takes the task deltas of *one* parameter (``Δ_i = W_i − W_0``, same shape, ``[out, in]`` for a linear
weight) and optional per-task coefficients ``c_i``, and returns the merged delta in the inputs' dtype and on their
device (``out_dtype`` asks for another dtype, e.g. float32 for bfloat16 weights). The scaling ``λ`` is never applied
here.

Numerics: all arithmetic runs in float64 on the inputs' device, whatever dtype arrives; the decompositions use the
float64 Gram eigendecompositions of ``linalg.py`` (one ``eigh`` per matrix where the method allows). The result
therefore agrees with a float64 evaluation of the contract to far better than 1e-3 relative Frobenius error; the
only error left for bfloat16 outputs is the final rounding to bfloat16.

``regmean`` also takes each task's input Gram of the parameter (``statistics=``).

The SVD methods (``drm``, ``iso_c``, ``iso_cts``, ``tsv_m``) and ``wudi_closed`` also accept ``LowRankDelta``
factors and then work in the joint ``Σ r_i``-dimensional space of the factors, materialising only the merged
``[out, in]`` result. A mix of dense and factored deltas is densified. The elementwise methods and ``wudi`` (Adam is
elementwise) densify factors.

Bad arguments raise ``ValueError`` naming the argument and the offending value.
"""

from __future__ import annotations

from drm_lightning.merging.methods.basic import (
    dare,
    elect_and_merge,
    keep_top_fraction,
    task_arithmetic,
    task_mean,
    ties,
)
from drm_lightning.merging.methods.checks import (
    DIRECTIONS,
    MERGES,
    PARAM_CHECKS,
    RANK_TOL,
    check_common_fraction,
    check_density,
    check_direction,
    check_drop_rate,
    check_merge,
    check_nonmatrix_drop_rate,
    check_rank_tol,
    check_seed,
    check_switch,
)
from drm_lightning.merging.methods.drm import DRM_RANK_TOL, DrmBasis, drm, drm_basis, drm_nonmatrix
from drm_lightning.merging.methods.drm_iso import DrmIsoBasis, drm_iso, drm_iso_basis
from drm_lightning.merging.methods.drm_prune import SHARE_EPS
from drm_lightning.merging.methods.inputs import Coefficients, Delta
from drm_lightning.merging.methods.iso import IsoCtsBasis, iso_c, iso_cts, iso_cts_basis, iso_cts_split
from drm_lightning.merging.methods.model_stock import model_stock
from drm_lightning.merging.methods.regmean import regmean
from drm_lightning.merging.methods.tsv import tsv_m
from drm_lightning.merging.methods.wudi import (
    WudiGrams,
    check_lr,
    check_ridge,
    check_steps,
    wudi,
    wudi_closed,
    wudi_closed_basis,
)

__all__ = [
    "DIRECTIONS",
    "DRM_RANK_TOL",
    "MERGES",
    "PARAM_CHECKS",
    "RANK_TOL",
    "SHARE_EPS",
    "Coefficients",
    "Delta",
    "DrmBasis",
    "DrmIsoBasis",
    "IsoCtsBasis",
    "WudiGrams",
    "check_common_fraction",
    "check_density",
    "check_direction",
    "check_drop_rate",
    "check_lr",
    "check_merge",
    "check_nonmatrix_drop_rate",
    "check_rank_tol",
    "check_ridge",
    "check_seed",
    "check_steps",
    "check_switch",
    "dare",
    "drm",
    "drm_basis",
    "drm_iso",
    "drm_iso_basis",
    "drm_nonmatrix",
    "elect_and_merge",
    "iso_c",
    "iso_cts",
    "iso_cts_basis",
    "iso_cts_split",
    "keep_top_fraction",
    "model_stock",
    "regmean",
    "task_arithmetic",
    "task_mean",
    "ties",
    "tsv_m",
    "wudi",
    "wudi_closed",
    "wudi_closed_basis",
]
