"""Float64 decompositions for the merge methods, built on one symmetric eigendecomposition each.

Why Gram matrices: a float64 ``eigh`` of the smaller Gram side is several times faster on a GPU than a float64 SVD
of the matrix itself, and ALGORITHMS.md asks for float64 precision whatever dtype the weights arrive in. The price of
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
    """Split ``y = u · diag(s)`` into unit columns and their norms; a zero column gives a zero ``u`` column, not NaN."""
    s = torch.linalg.vector_norm(y, dim=-2)
    u = torch.where(s.unsqueeze(-2) > 0, y / torch.where(s > 0, s, 1.0).unsqueeze(-2), 0.0)
    return u, s


def gram_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a (batch of) float64 matrices through ``eigh`` of the smaller Gram matrix.

    Args:
        a: ``[..., n, m]`` float64.

    Returns:
        ``(U [..., n, k], S [..., k], V [..., m, k])`` with ``k = min(n, m)`` and ``a ≈ U diag(S) Vᵀ``. Components come
        in decreasing eigenvalue order (decreasing ``S`` up to rounding at the noise level); ``S`` are column norms,
        and a direction with ``S = 0`` has a zero column in the recomputed factor.
    """
    n, m = a.shape[-2:]
    if m <= n:
        _, v = torch.linalg.eigh(a.mT @ a)
        v = v.flip(-1)
        u, s = _normalise_columns(a @ v)
    else:
        _, u = torch.linalg.eigh(a @ a.mT)
        u = u.flip(-1)
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


def thin_svd(a: Tensor, *, rank_tol: float = 0.0, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``gram_svd``, or a float64 ``torch.linalg.svd`` where the Gram route would not be precise enough.

    The Gram route is used when every component the caller will keep — among the first ``top``, those with
    ``σ > rank_tol · σ_1`` of their matrix — has ``σ >= GRAM_MIN_RATIO · σ_1``, which bounds its error near
    ``eps64 / GRAM_MIN_RATIO² ≈ 1e-6``. Otherwise the whole batch falls back to the (slower) direct SVD.

    Args:
        a: ``[..., n, m]`` float64.
        rank_tol: The relative cut the caller applies afterwards (its own matrix's ``σ_1`` as reference, or a
            smaller value to be conservative).
        top: Only the first ``top`` components will be used (``None``: all).

    Returns:
        As ``gram_svd``.
    """
    u, s, v = gram_svd(a)
    head = s[..., :top] if top is not None else s
    s_1 = s.amax(dim=-1, keepdim=True)
    if bool(((head > rank_tol * s_1) & (head < GRAM_MIN_RATIO * s_1)).any()):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.mT
    return u, s, v


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
    w_max = w.amax()
    if bool(w.amin() >= GRAM_MIN_RATIO**2 * w_max) and bool(w_max > 0):
        return a @ ((q * w.rsqrt()) @ q.mT)
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    keep = s > s.amax() * (k * torch.finfo(torch.float64).eps)
    return p[:, keep] @ qh[keep]


def power_of_two_scale(x: Tensor) -> Tensor:
    """A power of two near ``max |x|`` (1 for an all-zero ``x``), as a 0-d tensor on ``x``'s device.

    Dividing by it is exact in floating point, and every merge method is positively homogeneous, so the methods
    normalise by it: the Gram matrices then neither underflow for tiny float64 deltas nor overflow for huge ones.
    """
    amax = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    _, exponent = torch.frexp(amax.to(torch.float64))
    return torch.ldexp(torch.ones((), dtype=torch.float64, device=x.device), exponent)
