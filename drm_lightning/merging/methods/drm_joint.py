"""DRM's joint decomposition (steps 1–3 of docs/methods.md) built task by task, without a stack of the deltas.

Why: the obvious route — stack the T deltas into one float64 ``[T·n, m]`` matrix X and take its thin SVD — holds
twice the float32 inputs for X alone, as much again for ``U``, and copies X once more for DRM-H (a transposed
stack). Nothing downstream needs X or ``U``: DRM uses the joint right singular vectors ``V_r`` and the projections
``B_i = Δ_i V_r`` (which equal the task blocks of ``U·S``). So the Gram matrix ``XᵀX = Σ_i Δ_iᵀΔ_i`` (or the ``T·n``
row Gram ``XXᵀ`` when that side is smaller) is accumulated from one float64 task at a time, one ``eigh`` gives the
basis, and each task is projected on its own. Working memory: the Gram and its ``eigh`` (the floor of any Gram
route), then ``V_r`` and the float64 projections, which the merge needs anyway.

The rank cut ``σ_j > τ·σ_max`` is taken on the eigenvalues (``σ_j² = w_j``, exact to ``eps64·σ_max²``, so the
decision differs from one on column norms only for a component within ~1e-12 of the cut, where the method is not
well defined anyway). When a kept component lies below ``linalg.GRAM_MIN_RATIO·σ_max`` (possible only for a
``rank_tol`` below it) the Gram route is not precise enough and the stacked SVD of ``linalg.thin_svd`` is used, as
it is for factored (LoRA) deltas, whose joint coordinates are small.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drm_lightning.merging.methods.inputs import Inputs
from drm_lightning.merging.ops.linalg import GRAM_MIN_RATIO, thin_svd


def _factored_coordinates(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
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


def _stacked(stack: Tensor, rank_tol: float) -> tuple[Tensor, Tensor]:
    """``(blocks, V_r)`` from the thin SVD of the ``[T, n, k]`` stack (``thin_svd``: Gram or direct SVD)."""
    t, n, k = stack.shape
    u, s, v = thin_svd(stack.reshape(t * n, k), rank_tol=rank_tol)
    del stack
    keep = s > rank_tol * s.amax() if s.numel() else s > 0  # X = 0 keeps nothing: r = 0
    if not bool(keep.all()):
        u, s, v = u[:, keep], s[keep], v[:, keep]
    return u.mul_(s).reshape(t, n, -1), v  # U·S = X V_r: the projections Δ_i V_r


def _kept(w: Tensor, rank_tol: float) -> tuple[int, bool]:
    """How many of the ascending eigenvalues ``w`` of a Gram matrix are kept (``σ > τ·σ_max``), and whether the
    Gram route resolves all of them (``σ >= GRAM_MIN_RATIO·σ_max``, as ``linalg.thin_svd`` asks)."""
    top = w[-1] if w.numel() else w.new_zeros(())
    if not bool(top > 0):
        return 0, True
    keep = w > (rank_tol * rank_tol) * top
    coarse = keep & (w < (GRAM_MIN_RATIO * GRAM_MIN_RATIO) * top)
    return int(keep.sum()), not bool(coarse.any())


def _oriented(x: Tensor, horizontal: bool) -> Tensor:
    return x.mT if horizontal else x


def _column_route(inputs: Inputs, horizontal: bool, rank_tol: float) -> tuple[Tensor, Tensor] | None:
    """``Σ_i D_iᵀD_i`` (``D_i`` the oriented ``[n, m]`` delta), its ``eigh``, then ``B_i = D_i V_r`` task by task."""
    gram = None
    for i in range(inputs.count):
        d = _oriented(inputs.task(i), horizontal)
        gram = d.mT @ d if gram is None else gram.addmm_(d.mT, d)
        del d
    w, v = torch.linalg.eigh(gram)
    del gram
    r, precise = _kept(w, rank_tol)
    if not precise:
        return None
    m = v.shape[0]
    v_r = v[:, m - r :] if r == m else v[:, m - r :].clone()  # a copy only when something is dropped
    del v
    t = inputs.count
    n = inputs.shape[1] if horizontal else inputs.shape[0]
    blocks = torch.empty((t, n, r), dtype=v_r.dtype, device=v_r.device)
    for i in range(t):
        torch.matmul(_oriented(inputs.task(i), horizontal), v_r, out=blocks[i])
    return blocks, v_r


def _row_route(inputs: Inputs, horizontal: bool, rank_tol: float) -> tuple[Tensor, Tensor] | None:
    """``XXᵀ`` (``T·n`` square, when smaller than ``m``) block by block, its ``eigh`` ``U``, ``V_r = XᵀU_r / σ``."""
    t = inputs.count
    n = inputs.shape[1] if horizontal else inputs.shape[0]
    gram = None
    for i in range(t):
        d_i = _oriented(inputs.task(i), horizontal)
        if gram is None:
            gram = torch.empty((t * n, t * n), dtype=d_i.dtype, device=d_i.device)
        for j in range(i + 1):
            d_j = d_i if j == i else _oriented(inputs.task(j), horizontal)
            block = d_i @ d_j.mT
            gram[i * n : (i + 1) * n, j * n : (j + 1) * n] = block
            gram[j * n : (j + 1) * n, i * n : (i + 1) * n] = block.mT
            del d_j, block
        del d_i
    w, u = torch.linalg.eigh(gram)
    del gram
    r, precise = _kept(w, rank_tol)
    if not precise:
        return None
    u_r = u[:, t * n - r :].contiguous()
    del u
    m = inputs.shape[0] if horizontal else inputs.shape[1]
    v_r = torch.zeros((m, r), dtype=u_r.dtype, device=u_r.device)
    for i in range(t):
        v_r.addmm_(_oriented(inputs.task(i), horizontal).mT, u_r[i * n : (i + 1) * n])
    s = torch.linalg.vector_norm(v_r, dim=0)  # σ_j = ‖Xᵀu_j‖
    v_r.div_(torch.where(s > 0, s, 1.0))
    return u_r.mul_(s).reshape(t, n, r), v_r


def joint_basis(inputs: Inputs, horizontal: bool, rank_tol: float) -> tuple[Tensor, Tensor]:
    """Steps 1–3 of DRM on checked, normalised inputs: ``(blocks [T, n, r], V_r [m, r])`` in the vertical
    orientation (DRM-H: of the transposes), ``blocks[i] = D_i V_r``; for factored inputs ``V_r`` is ``Q`` times
    the basis of the coordinates. ``r = 0`` when every delta is zero."""
    if inputs.factors is not None:
        factors = [(right.mT, left.mT) for left, right in inputs.factors] if horizontal else inputs.factors
        coords, q = _factored_coordinates(factors)
        blocks, v = _stacked(coords, rank_tol)
        return blocks, q @ v
    t = inputs.count
    n, m = (inputs.shape[1], inputs.shape[0]) if horizontal else tuple(inputs.shape)
    if n * m == 0:  # an empty parameter: nothing to decompose, r = 0
        empty = torch.zeros((t, n, 0), dtype=inputs.unit.dtype, device=inputs.device)
        return empty, torch.zeros((m, 0), dtype=inputs.unit.dtype, device=inputs.device)
    found = _column_route(inputs, horizontal, rank_tol) if m <= t * n else _row_route(inputs, horizontal, rank_tol)
    if found is not None:
        return found
    first = inputs.task(0)  # the imprecise case: the stacked SVD
    stack = torch.empty((t, n, m), dtype=first.dtype, device=first.device)
    for i in range(t):
        stack[i].copy_(_oriented(first if i == 0 else inputs.task(i), horizontal))
    del first
    return _stacked(stack, rank_tol)
