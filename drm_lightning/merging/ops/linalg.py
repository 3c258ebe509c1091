"""Float64 decompositions for the merge methods, built on one symmetric eigendecomposition each.

Why Gram matrices: a float64 ``eigh`` of the smaller Gram side is several times faster on a GPU than a float64 SVD
of the matrix itself, and docs/methods.md asks for float64 precision whatever dtype the weights arrive in. The price of
squaring the matrix is that a singular triplet with ``σ_j`` far below ``σ_max`` loses accuracy like
``eps64 · (σ_max / σ_j)²``: 1e-4 at ``σ_j = 1e-6 σ_max``, and the methods cut components below such ratios anyway.
Singular values are never taken from the eigenvalues: they are recomputed as column norms ``‖A v_j‖``, which keeps
them accurate to ``eps64 · σ_max`` in absolute terms (a Rayleigh-quotient effect) and makes exactly-zero directions
come out as (near) zero instead of ``sqrt(eps) · σ_max``.

Everything here is device-agnostic and expects float64 input; nothing leaves the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRAM_MIN_RATIO = 1e-5
"""Smallest ``σ_j / σ_1`` that the Gram route resolves to ~1e-6; below it ``thin_svd`` and ``polar_factor`` use SVD."""


def _normalise_columns(y: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``y = u · diag(s)`` into unit columns and their norms; a zero column gives a zero ``u`` column, not NaN.

    In place: ``y`` (always a fresh product here) becomes ``u``, so no second full-size temporary is made.
    """
    s = torch.linalg.vector_norm(y, dim=-2)
    y.div_(torch.where(s > 0, s, 1.0).unsqueeze(-2)).masked_fill_((s <= 0).unsqueeze(-2), 0.0)
    return y, s


def gram_svd(a: Tensor, *, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a (batch of) float64 matrices through ``eigh`` of the smaller Gram matrix.

    Args:
        a: ``[..., n, m]`` float64.
        top: Recompute only the first ``top`` components (``None``: all). The ``eigh`` is the same, but the product
            that recovers the other side's vectors shrinks to ``top`` columns: that matters when the caller keeps
            a few components of a large matrix (TSV-M's ``min(n, m) // T``, Iso-CTS's ``k_c``).

    Returns:
        ``(U [..., n, k], S [..., k], V [..., m, k])`` with ``k = min(n, m, top)`` and ``a ≈ U diag(S) Vᵀ`` on those
        components. Components come in decreasing eigenvalue order (decreasing ``S`` up to rounding at the noise
        level); ``S`` are column norms, and a direction with ``S = 0`` has a zero column in the recomputed factor.
    """
    n, m = a.shape[-2:]
    k = min(n, m) if top is None else min(n, m, top)
    if m <= n:
        _, v = torch.linalg.eigh(a.mT @ a)
        v = v[..., m - k :].flip(-1)  # a k-column copy: nothing keeps the full eigenbasis alive
        u, s = _normalise_columns(a @ v)
    else:
        _, u = torch.linalg.eigh(a @ a.mT)
        u = u[..., n - k :].flip(-1)
        v, s = _normalise_columns(a.mT @ u)
    return u, s, v


def factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``left @ right`` without forming it, for low-rank products.

    ``left = Q_l R_l`` and ``rightᵀ = Q_r R_r`` (Householder QR, backward stable), so ``left @ right =
    Q_l (R_l R_rᵀ) Q_rᵀ`` and only the small core ``R_l R_rᵀ`` needs an SVD (done directly: it is tiny).

    Args:
        left: ``[n, a]`` float64.
        right: ``[a, m]`` float64.

    Returns:
        ``(U [n, k], S [k], V [m, k])``, ``k = min(n, m, a)``, ``S`` decreasing.
    """
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.mT)
    u_c, s, v_ch = torch.linalg.svd(r_l @ r_r.mT, full_matrices=False)
    return q_l @ u_c, s, q_r @ v_ch.mT


def _gram_is_precise(head: Tensor, rank_tol: float) -> bool:
    """Whether every component of ``head`` (the leading singular values, largest first) that a caller keeps, those
    with ``σ > rank_tol · σ_1``, has ``σ >= GRAM_MIN_RATIO · σ_1``: then the Gram route resolves them to ~1e-6."""
    if head.shape[-1] == 0:
        return True
    s_1 = head.amax(dim=-1, keepdim=True)
    return not bool(((head > rank_tol * s_1) & (head < GRAM_MIN_RATIO * s_1)).any())


def thin_svd(a: Tensor, *, rank_tol: float = 0.0, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``gram_svd``, or a float64 ``torch.linalg.svd`` where the Gram route would not be precise enough.

    The Gram route is used when every component the caller will keep — among the first ``top``, those with
    ``σ > rank_tol · σ_1`` of their matrix — has ``σ >= GRAM_MIN_RATIO · σ_1``, which bounds its error near
    ``eps64 / GRAM_MIN_RATIO² ≈ 1e-6``. Otherwise the whole batch falls back to the (slower) direct SVD.

    Args:
        a: ``[..., n, m]`` float64.
        rank_tol: The relative cut the caller applies afterwards (its own matrix's ``σ_1`` as reference, or a
            smaller value to be conservative).
        top: Only the first ``top`` components are computed and returned (``None``: all).

    Returns:
        As ``gram_svd``.
    """
    u, s, v = gram_svd(a, top=top)
    if not _gram_is_precise(s, rank_tol):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        if top is not None:  # copies of the kept columns, so the full factors can be freed
            u, s, vh = u[..., :top].contiguous(), s[..., :top].contiguous(), vh[..., :top, :].contiguous()
        v = vh.mT
    return u, s, v


def left_basis_svd(a: Tensor, *, rank_tol: float = 0.0, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``top`` singular triplets of an ``[n, m]`` float64 matrix, plus an orthonormal basis of the rest of
    ``R^n``: ``(W [n, n], S [top], V [m, top])`` with ``W`` orthogonal, ``a v_j = S_j W[:, j]`` for ``j < top``.

    Why: a projection onto the orthogonal complement of some leading left singular vectors (Iso-CTS's residuals)
    is then ``W[:, j:]ᵀ``, which is exactly orthogonal to the kept vectors, at no extra cost: the Gram route takes
    ``W`` from one ``eigh`` of ``a aᵀ`` (meant for ``n <= m``, where that is the smaller side), the fallback from a
    full float64 SVD, under the same precision rule as ``thin_svd``.

    Args:
        a: ``[n, m]`` float64.
        rank_tol: As ``thin_svd``.
        top: How many leading components get ``S`` and ``V``, ``0 <= top <= min(n, m)``.
    """
    _, w = torch.linalg.eigh(a @ a.mT)
    w = w.flip(-1)
    v, s = _normalise_columns(a.mT @ w[:, :top])
    if not _gram_is_precise(s, rank_tol):
        w, s, vh = torch.linalg.svd(a, full_matrices=True)
        s, v = s[:top], vh[:top].mT
    return w, s, v


def _polar_svd(a: Tensor) -> Tensor:
    """``polar_factor`` through a float64 SVD, leaving out numerically rank-deficient directions."""
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    keep = s > s.amax() * (min(a.shape) * torch.finfo(torch.float64).eps)
    return p[:, keep] @ qh[keep]


def _gram_is_conditioned(w_min: Tensor, w_max: Tensor) -> bool:
    """Whether a Gram spectrum in ``[w_min, w_max]`` allows ``a (aᵀa)^{-1/2}``: ``σ_min >= GRAM_MIN_RATIO · σ_max``."""
    return bool(w_min >= GRAM_MIN_RATIO**2 * w_max) and bool(w_max > 0)


def polar_factor(a: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``a = P Σ Qᵀ`` (the nearest matrix with orthonormal columns or rows).

    Computed as ``a (aᵀa)^{-1/2}`` from one ``eigh`` of the smaller Gram matrix when ``a`` is well conditioned
    (``σ_min >= GRAM_MIN_RATIO · σ_max``, error near 1e-6 at worst), else from a float64 SVD. Where ``a`` is
    numerically rank deficient (``σ <= k · eps64 · σ_max``) the polar factor is not unique; those directions are
    left out, which keeps the result finite and deterministic.

    Args:
        a: ``[n, k]`` float64.
    """
    n, k = a.shape
    if k > n:
        return polar_factor(a.mT).mT
    w, q = torch.linalg.eigh(a.mT @ a)
    if _gram_is_conditioned(w.amin(), w.amax()):
        return a @ ((q * w.rsqrt()) @ q.mT)
    return _polar_svd(a)


def polar_factor_extend(basis: Tensor, extra: Tensor) -> Tensor:
    """``polar_factor([basis, extra])`` for a ``basis`` with orthonormal columns, at the cost of the extra columns.

    With ``a = [B, E]`` and ``BᵀB = I``, ``aᵀa = I + L`` where ``L = [[0, C], [Cᵀ, EᵀE − I]]``, ``C = BᵀE``, has rank
    at most ``2r`` (``r`` extra columns). With ``C = Q_C R_C`` (QR) and ``Z = diag(Q_C, I_r)`` (orthonormal),
    ``L = Z K Zᵀ`` for the small ``K = [[0, R_C], [R_Cᵀ, EᵀE − I]]``, so ``(aᵀa)^{-1/2} = I + Z Y (Λ^{-1/2} − I) Yᵀ Zᵀ``
    from one ``eigh`` of ``I + K = Y Λ Yᵀ``, ``(min(k, r) + r)``-sized instead of ``(k + r)``-sized. Iso-CTS's
    ``[U_c, U_task]`` and ``[V_c, V_task]`` are such matrices, with ``r`` a fifth of the width at the default
    common fraction. The same conditioning rule and SVD fallback as ``polar_factor`` apply.

    Args:
        basis: ``[n, k]`` float64 with orthonormal columns (to rounding: the result is as orthonormal as it is).
        extra: ``[n, r]`` float64.

    Returns:
        ``[n, k + r]``, columns in the order of ``[basis, extra]``.
    """
    n, k = basis.shape
    r = extra.shape[1]
    if r == 0:
        return basis
    if k == 0 or k + r > n:
        return polar_factor(torch.cat([basis, extra], dim=1))
    q_c, r_c = torch.linalg.qr(basis.mT @ extra)  # [k, p], [p, r] with p = min(k, r)
    p = q_c.shape[1]
    core = torch.zeros(p + r, p + r, dtype=extra.dtype, device=extra.device)
    core[:p, p:] = r_c
    core[p:, :p] = r_c.mT
    core[p:, p:] = extra.mT @ extra
    core[:p, :p].diagonal().fill_(1.0)  # I + K
    w, y = torch.linalg.eigh(core)
    # The other k − p eigenvalues of aᵀa are exactly 1 (and w_min <= 1 <= w_max anyway: aᵀa has the block I_k).
    if not _gram_is_conditioned(w.amin().clamp_max(1.0), w.amax().clamp_min(1.0)):
        return _polar_svd(torch.cat([basis, extra], dim=1))
    a_z = torch.cat([basis @ q_c, extra], dim=1)  # a Z, [n, p + r]
    yt_zt = torch.cat([y[:p].mT @ q_c.mT, y[p:].mT], dim=1)  # Yᵀ Zᵀ, [p + r, k + r]
    return torch.cat([basis, extra], dim=1).addmm_((a_z @ y).mul_(w.rsqrt() - 1.0), yt_zt)


def power_of_two_scale(x: Tensor) -> Tensor:
    """A power of two near ``max |x|`` (1 for an all-zero ``x``), as a 0-d tensor on ``x``'s device.

    Dividing by it is exact in floating point, and every merge method is positively homogeneous, so the methods
    normalise by it: the Gram matrices then neither underflow for tiny float64 deltas nor overflow for huge ones.
    """
    amax = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    _, exponent = torch.frexp(amax.to(torch.float64))
    return torch.ldexp(torch.ones((), dtype=torch.float64, device=x.device), exponent)
