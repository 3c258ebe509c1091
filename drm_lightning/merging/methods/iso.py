"""Iso-C and Iso-CTS (arXiv 2502.04959): the isotropic merges of the summed delta, Iso-CTS with task subspaces.

``iso_c`` flattens the spectrum of ``Σ_i c_i Δ_i``; ``iso_cts`` adds each task's top residual directions outside a
common subspace. ``iso_cts_basis`` / ``IsoCtsBasis`` share the decomposition of the sum across a search over
``common_fraction``. Float64 throughout (the Gram ``eigh`` of ``linalg.py``); ``LowRankDelta`` factors are
decomposed in their joint space. docs/methods.md has the equations and the rank tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from drm_lightning.merging.methods.basic import task_mean
from drm_lightning.merging.methods.checks import RANK_TOL, check_common_fraction, check_out_dtype, check_rank_tol
from drm_lightning.merging.methods.inputs import Coefficients, Delta, Inputs, prepare, task_coefficients
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.linalg import factored_svd, left_basis_svd, polar_factor_extend, thin_svd

_F64 = torch.float64


def _svd(inputs: Inputs, c: Tensor, rank_tol: float, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``M = Σ_i c_i Δ_i``: Gram ``eigh`` for dense deltas, QR of concatenated factors for factored ones."""
    if inputs.factors is not None:
        left = torch.cat([ci * left for ci, (left, _) in zip(c, inputs.factors, strict=True)], dim=1)
        return factored_svd(left, torch.cat([right for _, right in inputs.factors]))
    return thin_svd(inputs.weighted_sum(c), rank_tol=rank_tol, top=top)


def iso_c(
    deltas: Sequence[Delta],
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Iso-C (arXiv 2502.04959): ``M = Σ_i c_i Δ_i = U S Vᵀ``, merged ``mean(S) · U Vᵀ``.

    ``rank_tol`` drops the components with ``σ <= rank_tol · σ_max`` (mean(S) is over the kept ones). The default
    1e-6 changes nothing on the full-rank deltas of full fine-tuning, whose smallest singular values sit orders of
    magnitude above it, and removes the exactly-zero directions of rank-deficient (LoRA) deltas, which the float64
    Gram route leaves near ``eps64 · σ_max² / σ_r`` (about 1e-13 · σ_max for ``σ_r = 1e-3 · σ_max``; factored
    ``LowRankDelta`` inputs have no such directions at all). Dense LoRA deltas stored in float32 carry rounding
    noise near 1e-8 · σ_max, also removed; bfloat16 ones carry noise near 1e-3 · σ_max, which no tolerance can tell
    from signal: keep LoRA deltas factored or in float32. Use 0 to keep every nonzero direction.

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        coefficients: ``c_i`` of the sum, default 1.
        rank_tol: Relative rank tolerance in ``[0, 1)``.
        out_dtype: Result dtype (default: the deltas').
    """
    rank_tol = check_rank_tol(rank_tol)
    out_dtype = check_out_dtype(out_dtype)
    inputs = prepare("iso_c", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = task_coefficients("iso_c", coefficients, inputs.count, inputs.device)
    u, s, v = _svd(inputs, c, rank_tol)
    keep = s > rank_tol * s.amax()
    if not bool(keep.any()):
        return inputs.finish(torch.zeros(inputs.shape, dtype=_F64, device=inputs.device), out_dtype)
    if not bool(keep.all()):
        u, s, v = u[:, keep], s[keep], v[:, keep]
    merged = u @ v.mT
    del u, v
    return inputs.finish(merged.mul_(s.mean()), out_dtype)


def iso_cts_split(dim: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS's ``(k_c, s)``: ``k_c = int(f·d)``, then ``k_c = d − round((d − k_c)/T)·T`` and ``s = (d − k_c)/T``.

    ``round`` is Python's (half to even), as in the authors' code.
    """
    common = int(common_fraction * dim)
    common = dim - round((dim - common) / tasks) * tasks
    if common < 0:
        raise ValueError(
            f"iso_cts: common_fraction={common_fraction!r} leaves k_c={common} < 0 common components for "
            f"min(n, m)={dim} and T={tasks} tasks; raise common_fraction"
        )
    return common, (dim - common) // tasks


def _residual_svds(
    inputs: Inputs, c: Tensor, u_c: Tensor, complement: Tensor | None, rank_tol: float, top: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``top`` components of ``R_i = c_i Δ_i − U_c U_cᵀ c_i Δ_i`` for all tasks, as ``[T, ...]`` batches.

    ``complement`` (dense inputs only) is an orthonormal ``[n, q]`` basis of the orthogonal complement of the kept
    ``U_c``: then ``R_i = Q Qᵀ c_i Δ_i`` and ``R_i``'s SVD is ``Q`` times that of the small ``[q, m]`` matrix
    ``Qᵀ c_i Δ_i``, whose Gram is ``q``-sized instead of ``min(n, m)``-sized. Without it (``n > m``) each residual
    is formed and decomposed on its ``m`` side, one task at a time to bound memory.
    """
    if inputs.factors is not None:
        svds = []
        for ci, (left, right) in zip(c, inputs.factors, strict=True):
            left = ci * left
            svds.append(factored_svd(left - u_c @ (u_c.mT @ left), right))
        width = max(s.shape[0] for _, s, _ in svds)  # ranks may differ: pad with zero components
        pad = [
            (F.pad(u, (0, width - u.shape[1])), F.pad(s, (0, width - s.shape[0])), F.pad(v, (0, width - v.shape[1])))
            for u, s, v in svds
        ]
        return tuple(torch.stack(parts) for parts in zip(*pad, strict=True))  # type: ignore[return-value]
    if complement is not None:
        projected = torch.empty((inputs.count, complement.shape[1], inputs.shape[1]), dtype=_F64, device=c.device)
        for i, ci in enumerate(c.tolist()):  # [T, q, m], filled one task at a time
            torch.matmul(complement.mT, inputs.task(i), out=projected[i]).mul_(ci)
        u, s, v = thin_svd(projected, rank_tol=rank_tol, top=top)
        return complement @ u, s, v
    svds = []
    for i, ci in enumerate(c.tolist()):  # plain floats: addmm takes numbers
        delta = inputs.task(i)
        residual = torch.addmm(delta, u_c, u_c.mT @ delta, beta=ci, alpha=-ci) if u_c.shape[1] else ci * delta
        svds.append(thin_svd(residual, rank_tol=rank_tol, top=top))
    return tuple(torch.stack(parts) for parts in zip(*svds, strict=True))  # type: ignore[return-value]


def _common_decomposition(inputs: Inputs, c: Tensor, top: int, rank_tol: float) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The top ``top`` components of ``Σ c_i Δ_i`` for Iso-CTS: ``(U or W, S, V, full)``.

    Dense ``n <= m``: the Gram side of the sum is the ``n`` side, whose full eigenbasis ``W`` (or the full SVD when
    the precision rule asks for it) holds both the leading left vectors and an orthonormal basis of everything else
    (``full`` true). Dense ``n > m`` and factored inputs: the leading components only (``full`` false).
    """
    if inputs.factors is not None or inputs.shape[0] > inputs.shape[1]:
        u, s, v = _svd(inputs, c, rank_tol, top=top)
        return u, s, v, False
    basis, s, v = left_basis_svd(inputs.weighted_sum(c), rank_tol=rank_tol, top=top)
    return basis, s, v, True


def _common_take(
    decomposition: tuple[Tensor, Tensor, Tensor, bool], k_c: int, rank_tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Iso-CTS's kept common components ``(U_c, S_c, V_c)`` among the first ``k_c`` of ``decomposition`` (those with
    ``σ > rank_tol · σ_1``) and, where it comes for free (``full``), an orthonormal basis of their complement,
    including the common directions dropped by ``rank_tol``; else ``None``."""
    u, s, v, full = decomposition
    s, v = s[:k_c], v[:, :k_c]
    keep = s > rank_tol * s.amax()
    if not full:
        return u[:, :k_c][:, keep], s[keep], v[:, keep], None
    if bool(keep.all()):  # the usual case: views, no copies
        return u[:, :k_c], s, v, u[:, k_c:]
    complement = torch.cat([u[:, :k_c][:, ~keep], u[:, k_c:]], dim=1)
    return u[:, :k_c][:, keep], s[keep], v[:, keep], complement


@dataclass(frozen=True, eq=False)
class IsoCtsBasis:
    """Iso-CTS on one parameter at any common fraction, the decomposition of the summed delta shared.

    Why: a search over ``common_fraction`` changes ``k_c`` and so every task's residual, but the decomposition of
    ``Σ c_i Δ_i`` is the same: ``merge_all`` computes its top ``max k_c`` components once and takes each fraction's
    ``k_c`` from them. ``merge`` alone computes exactly what ``iso_cts`` does. Built by ``iso_cts_basis``; it reads
    the caller's deltas (one float64 task at a time), which the residuals need.
    """

    coefficients: Tensor
    rank_tol: float
    _inputs: Inputs

    def merge(self, common_fraction: float = 0.8, *, out_dtype: torch.dtype | None = None) -> Tensor:
        """Iso-CTS at ``common_fraction`` (see ``iso_cts``)."""
        return self.merge_all([{"common_fraction": common_fraction}], out_dtype=out_dtype)[0]

    def merge_all(self, param_sets: Sequence[dict[str, Any]], *, out_dtype: torch.dtype | None = None) -> list[Tensor]:
        """``merge(**p)`` for every ``p`` of ``param_sets`` (key ``common_fraction``), one common decomposition."""
        out_dtype = check_out_dtype(out_dtype)
        unknown = sorted({k for p in param_sets for k in p} - {"common_fraction"})
        if unknown:
            raise ValueError(f"IsoCtsBasis.merge: unknown parameter(s) {unknown}; allowed: ['common_fraction']")
        inputs, c, rank_tol = self._inputs, self.coefficients, self.rank_tol
        n, m = inputs.shape
        fractions = [check_common_fraction(p.get("common_fraction", 0.8)) for p in param_sets]
        splits = [iso_cts_split(min(n, m), inputs.count, f) for f in fractions]
        top = max(k_c for k_c, _ in splits)
        decomposition = _common_decomposition(inputs, c, top, rank_tol) if top > 0 else None
        out = []
        for k_c, s_task in splits:
            if k_c == 0:  # the residuals are the deltas themselves
                empty = torch.zeros(0, dtype=_F64, device=inputs.device)
                common = (empty.reshape(n, 0), empty, empty.reshape(m, 0), None)
            else:
                common = _common_take(decomposition, k_c, rank_tol)
            out.append(inputs.finish(_iso_cts_finish(inputs, c, common, s_task, rank_tol), out_dtype))
        return out


def _iso_cts_finish(
    inputs: Inputs, c: Tensor, common: tuple[Tensor, Tensor, Tensor, Tensor | None], s_task: int, rank_tol: float
) -> Tensor:
    """Steps 2–5 of Iso-CTS given the kept common components: residual components, concatenation, polar factors;
    a fresh float64 tensor."""
    n, m = inputs.shape
    u_c, s_c, v_c, complement = common
    u_r, s_r, v_r = u_c[:, :0], s_c[:0], v_c[:, :0]
    if s_task > 0:
        u_r, s_r, v_r = _residual_svds(inputs, c, u_c, complement, rank_tol, s_task)
        u_r, s_r, v_r = u_r[..., :s_task], s_r[:, :s_task], v_r[..., :s_task]
        u_r, s_r, v_r = u_r.permute(1, 0, 2).reshape(n, -1), s_r.reshape(-1), v_r.permute(1, 0, 2).reshape(m, -1)
    s_ref = torch.cat([s_c, s_r]).amax() if s_c.numel() + s_r.numel() else s_c.new_zeros(())
    keep_c, keep_r = s_c > rank_tol * s_ref, s_r > rank_tol * s_ref
    if not bool(keep_c.any() or keep_r.any()):
        return torch.zeros(inputs.shape, dtype=_F64, device=inputs.device)
    s = torch.cat([s_c[keep_c], s_r[keep_r]])
    if not bool(keep_c.all()):
        u_c, v_c = u_c[:, keep_c], v_c[:, keep_c]
    if not bool(keep_r.all()):
        u_r, v_r = u_r[:, keep_r], v_r[:, keep_r]
    u = polar_factor_extend(u_c, u_r)
    del u_c, u_r
    v = polar_factor_extend(v_c, v_r)
    del v_c, v_r
    return (u @ v.mT).mul_(s.mean())


def iso_cts_basis(
    deltas: Sequence[Delta], coefficients: Coefficients = None, rank_tol: float = RANK_TOL
) -> IsoCtsBasis:
    """Iso-CTS's inputs, checked, ready to merge at any common fraction (``IsoCtsBasis``)."""
    rank_tol = check_rank_tol(rank_tol)
    inputs = prepare("iso_cts", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = task_coefficients("iso_cts", coefficients, inputs.count, inputs.device)
    return IsoCtsBasis(c, rank_tol, inputs)


def iso_cts(
    deltas: Sequence[Delta],
    common_fraction: float = 0.8,
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Iso-CTS (arXiv 2502.04959): a common subspace of ``Σ_i c_i Δ_i`` plus task-specific directions, isotropic.

    The top ``k_c`` components of the sum, the top ``s`` components of each task's residual outside the common
    subspace, concatenated; ``U`` and ``V`` replaced by their polar factors; merged ``mean(S) · U Vᵀ``
    (``k_c`` and ``s`` from ``iso_cts_split``). Coefficients scale each delta before anything else.

    Rank tolerance (see ``iso_c`` for the default): common components with ``σ <= rank_tol · σ_1(Σ c_i Δ_i)`` are
    left out *before* the residuals are taken, so the projection never uses arbitrary null-space vectors; then every
    kept component, common or task-specific, must have ``σ > rank_tol · σ_ref`` with ``σ_ref`` the largest singular
    value of all these decompositions. ``mean(S)`` is over the kept ones.

    Cost: for ``n <= m`` the residuals live in the ``(n − k_c)``-dimensional complement of the common subspace,
    whose basis comes with the ``eigh`` of the sum, so each task costs a ``(n − k_c)``-sized ``eigh``; for
    ``n > m`` that complement is larger than ``m`` and each task costs an ``m``-sized one. The polar factors use
    that ``U_c`` and ``V_c`` are orthonormal already (``polar_factor_extend``).

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        common_fraction: ``f`` in ``(0, 1]``.
        coefficients: ``c_i``, default 1.
        rank_tol: Relative rank tolerance in ``[0, 1)``.
        out_dtype: Result dtype (default: the deltas').
    """
    common_fraction, rank_tol = check_common_fraction(common_fraction), check_rank_tol(rank_tol)
    out_dtype = check_out_dtype(out_dtype)
    return iso_cts_basis(deltas, coefficients, rank_tol).merge(common_fraction, out_dtype=out_dtype)


METHODS = (
    MergeMethod(
        "iso_c",
        "Iso-C",
        "https://arxiv.org/abs/2502.04959",
        iso_c,
        True,
        {"rank_tol": RANK_TOL},
        elementwise=task_mean,
        lora_span="both",
    ),
    MergeMethod(
        "iso_cts",
        "Iso-CTS",
        "https://arxiv.org/abs/2502.04959",
        iso_cts,
        True,
        {"common_fraction": 0.8, "rank_tol": RANK_TOL},
        elementwise=task_mean,
        prepare=iso_cts_basis,
        prepare_keys=frozenset({"rank_tol"}),
        lora_span="both",
    ),
)
"""The registry's entries of this module; non-matrix parameters take the plain mean (``basic.task_mean``)."""
