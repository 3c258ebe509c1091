"""Float64 reference implementations of ALGORITHMS.md, written straight from its equations.

Deliberately naive and independent of ``drm_lightning.merging``: a full ``torch.linalg.svd`` of the stacked matrix,
explicit loops over tasks and columns, ``sort`` for "keep the largest fraction". ``dtype`` exists so that a test can
run the same equations in float32, the way the DRM authors' code does, and measure how far that lands.

The rank-tolerance and DARE-mask conventions that ALGORITHMS.md leaves to the implementation are the ones
documented in ``drm_lightning.merging.functional`` (σ_ref of Iso-CTS and TSV-M; one float32 ``torch.rand`` draw of
shape ``[T, *shape]`` from a generator seeded with ``seed``, kept where ``>= p``).
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def keep_top(x: Tensor, q: float) -> Tensor:
    """Keep exactly the round(q·numel) largest magnitudes (plus ties at the threshold)."""
    k = round(q * x.numel())
    if k == 0:
        return torch.zeros_like(x)
    threshold = x.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def elect_merge(blocks: list[Tensor], c: list[float]) -> Tensor:
    total = sum(blocks)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    numerator = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for block, ci in zip(blocks, c, strict=True):
        survive = (block != 0) & (torch.sign(block) == sign)
        numerator = numerator + ci * block * survive
        count = count + survive
    return numerator / torch.clamp(count, min=1)


def combine(blocks: list[Tensor], c: list[float], elect_sign: bool = True, disjoint_mean: bool = True) -> Tensor:
    """DRM's merge step with its switches: elect and merge when both are on; without the election every non-zero
    entry survives; without the disjoint mean the sum of survivors is divided by T."""
    if elect_sign and disjoint_mean:
        return elect_merge(blocks, c)
    total = sum(blocks)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    numerator = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for block, ci in zip(blocks, c, strict=True):
        survive = (block != 0) & ((torch.sign(block) == sign) if elect_sign else True)
        numerator = numerator + ci * block * survive
        count = count + survive
    return numerator / (torch.clamp(count, min=1) if disjoint_mean else len(blocks))


def _c(deltas: list[Tensor], c: list[float] | None) -> list[float]:
    return [1.0] * len(deltas) if c is None else [float(x) for x in c]


def task_arithmetic(deltas: list[Tensor], c: list[float] | None = None, dtype: torch.dtype = F64) -> Tensor:
    return sum(ci * d.to(dtype) for ci, d in zip(_c(deltas, c), deltas, strict=True))


def task_mean(deltas: list[Tensor], c: list[float] | None = None) -> Tensor:
    """(1/T) Σ c_i Δ_i: Iso-C's, Iso-CTS's and TSV-M's rule for non-matrix parameters."""
    return task_arithmetic(deltas, c) / len(deltas)


def drm_nonmatrix(
    deltas: list[Tensor],
    drop_rate: float = 0.0,
    c: list[float] | None = None,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
) -> Tensor:
    """DRM's rule for non-matrix parameters: trim each delta to its largest fraction 1 − p_nl, elect and merge."""
    return combine([keep_top(d.to(F64), 1 - drop_rate) for d in deltas], _c(deltas, c), elect_sign, disjoint_mean)


def ties(deltas: list[Tensor], density: float = 0.2, c: list[float] | None = None, dtype: torch.dtype = F64) -> Tensor:
    return elect_merge([keep_top(d.to(dtype), density) for d in deltas], _c(deltas, c))


def dare(
    deltas: list[Tensor],
    drop_rate: float = 0.9,
    seed: int = 0,
    merge: str = "task_arithmetic",
    c: list[float] | None = None,
    density: float = 0.2,
) -> Tensor:
    gen = torch.Generator(device=deltas[0].device)
    gen.manual_seed(seed)
    draw = torch.rand((len(deltas), *deltas[0].shape), generator=gen, dtype=torch.float32, device=deltas[0].device)
    kept = [torch.where(draw[i] >= drop_rate, d.to(F64) / (1 - drop_rate), 0.0) for i, d in enumerate(deltas)]
    if drop_rate == 0:
        kept = [d.to(F64) for d in deltas]
    if merge == "ties":
        return ties(kept, density, c)
    return task_arithmetic(kept, c)


def _task_blocks(basis: Tensor, t: int, s: Tensor, renormalise: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """Split the stacked singular basis into its T row blocks; per block, unit columns (a column of norm <= 1e-6
    stays zero) and the task's singular values s·ν. The same step for DRM-V (U blocks) and DRM-H (V blocks).
    Without renormalisation, the raw blocks and the joint singular values."""
    size = basis.shape[0] // t
    hats, s_task = [], []
    for i in range(t):
        block = basis[i * size : (i + 1) * size]
        if not renormalise:
            hats.append(block.clone())
            s_task.append(s.clone())
            continue
        nu = block.norm(dim=0)
        cols = torch.zeros_like(block)
        for j in range(block.shape[1]):
            if nu[j] > 1e-6:
                cols[:, j] = block[:, j] / nu[j]
        hats.append(cols)
        s_task.append(s * nu)
    return hats, s_task


def drm_vertical(
    deltas: list[Tensor],
    drop_rate: float = 0.8,
    c: list[float] | None = None,
    rank_tol: float = 1e-2,
    dtype=F64,
    renormalise: bool = True,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
) -> Tensor:
    t = len(deltas)
    n, m = deltas[0].shape
    x = torch.cat([d.to(dtype) for d in deltas], dim=0)  # [T n, m]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s[0] == 0:
        return torch.zeros(n, m, dtype=dtype)
    r = int((s > rank_tol * s[0]).sum())
    u, s, v = u[:, :r], s[:r], vh[:r].T
    u_hat, s_task = _task_blocks(u, t, s, renormalise)
    pruned = keep_top(torch.stack(u_hat), 1 - drop_rate)
    blocks = [pruned[i] @ torch.diag(s_task[i]) for i in range(t)]
    return combine(blocks, _c(deltas, c), elect_sign, disjoint_mean) @ v.T


def drm_horizontal(
    deltas: list[Tensor],
    drop_rate: float = 0.8,
    c: list[float] | None = None,
    rank_tol: float = 1e-2,
    dtype=F64,
    renormalise: bool = True,
    elect_sign: bool = True,
    disjoint_mean: bool = True,
) -> Tensor:
    t = len(deltas)
    n, m = deltas[0].shape
    x = torch.cat([d.to(dtype) for d in deltas], dim=1)  # [n, T m]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s[0] == 0:
        return torch.zeros(n, m, dtype=dtype)
    r = int((s > rank_tol * s[0]).sum())
    u, s, v = u[:, :r], s[:r], vh[:r].T  # v: [T m, r]
    v_hat, s_task = _task_blocks(v, t, s, renormalise)
    pruned = keep_top(torch.stack(v_hat), 1 - drop_rate)
    blocks = [torch.diag(s_task[i]) @ pruned[i].T for i in range(t)]  # [r, m]
    return u @ combine(blocks, _c(deltas, c), elect_sign, disjoint_mean)


def polar(a: Tensor) -> Tensor:
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def iso_c(deltas: list[Tensor], c: list[float] | None = None, rank_tol: float = 1e-6) -> Tensor:
    m_sum = task_arithmetic(deltas, c)
    u, s, vh = torch.linalg.svd(m_sum, full_matrices=False)
    keep = s > rank_tol * s[0]
    if not keep.any():
        return torch.zeros_like(m_sum)
    return s[keep].mean() * u[:, keep] @ vh[keep]


def iso_cts(
    deltas: list[Tensor], common_fraction: float = 0.8, c: list[float] | None = None, rank_tol: float = 1e-6
) -> Tensor:
    t = len(deltas)
    scaled = [ci * d.to(F64) for ci, d in zip(_c(deltas, c), deltas, strict=True)]
    n, m = scaled[0].shape
    d = min(n, m)
    k_c = int(common_fraction * d)
    k_c = d - round((d - k_c) / t) * t
    s_task = (d - k_c) // t
    u, s, vh = torch.linalg.svd(sum(scaled), full_matrices=False)
    u, s, vh = u[:, :k_c], s[:k_c], vh[:k_c]
    keep = s > rank_tol * s.max() if len(s) else s > 0
    u, s, vh = u[:, keep], s[keep], vh[keep]
    us, ss, vs = [u], [s], [vh]
    for delta in scaled:
        residual = delta - u @ u.T @ delta
        ur, sr, vr = torch.linalg.svd(residual, full_matrices=False)
        us.append(ur[:, :s_task])
        ss.append(sr[:s_task])
        vs.append(vr[:s_task])
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=0)
    keep = s > rank_tol * s.max()
    if not keep.any():
        return torch.zeros(n, m, dtype=F64)
    u, s, vh = u[:, keep], s[keep], vh[keep]
    return s.mean() * polar(u) @ polar(vh.T).T


def tsv_m(deltas: list[Tensor], c: list[float] | None = None, rank_tol: float = 1e-6) -> Tensor:
    t = len(deltas)
    scaled = [ci * d.to(F64) for ci, d in zip(_c(deltas, c), deltas, strict=True)]
    n, m = scaled[0].shape
    k = min(n, m) // t
    us, ss, vs = [], [], []
    for delta in scaled:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=0)
    keep = s > rank_tol * s.max()
    if not keep.any():
        return torch.zeros(n, m, dtype=F64)
    u, s, vh = u[:, keep], s[keep], vh[keep]
    return polar(u) @ torch.diag(s) @ polar(vh.T).T


# --------------------------------------------------------------------------------------------------------------------
# Inputs with known structure (shared by the functional tests)
# --------------------------------------------------------------------------------------------------------------------


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=F64))[0]


def make_deltas(case: str, shape: tuple[int, int], tasks: int, seed: int = 0) -> list[Tensor]:
    """Float64 task deltas of one ``[n, m]`` parameter for a named case.

    ``random``: a shared direction plus independent noise (so signs partly agree, as for real experts).
    ``clustered``: ``w_i · U_c S_c V_cᵀ + P_i`` with ``S_c`` in pairs of equal values (24 common components) and
        ``P_i`` small, random, in the orthogonal complement on both sides; for 4 tasks and ``min(n, m) = 32`` no
        cut of Iso-CTS (k_c = 24, s = 2) or TSV-M (k = 8) falls inside a pair, so those methods are well defined.
    ``clustered_tasks``: ``U_i diag(s) V_iᵀ`` with independent random ``U_i, V_i`` and ``s`` in pairs of equal values
        over the first 8 components, distinct after: TSV-M's per-task cut (k = 8 for 4 tasks) is well defined.
    ``disjoint``: block-diagonal tasks (disjoint rows and columns) with the same spectrum: every singular value of
        the stack repeats ``tasks`` times, yet DRM without pruning is well defined.
    ``rank_deficient``: rank-3 deltas (``B_i A_i`` plus a shared rank-1 part), the LoRA situation.
    ``zero_task`` / ``tiny_task``: ``random`` with task 1 zero / scaled by 1e-9 (shares below DRM's 1e-6 rule).
    ``all_zero``: every delta zero.
    """
    gen = torch.Generator().manual_seed(seed)
    n, m = shape
    if case in ("random", "zero_task", "tiny_task"):
        shared = torch.randn(n, m, generator=gen, dtype=F64)
        deltas = [0.5 * shared + torch.randn(n, m, generator=gen, dtype=F64) for _ in range(tasks)]
        if case != "random":
            deltas[1] = deltas[1] * (0.0 if case == "zero_task" else 1e-9)
        return deltas
    if case == "all_zero":
        return [torch.zeros(n, m, dtype=F64) for _ in range(tasks)]
    if case == "rank_deficient":
        common = torch.randn(n, 1, generator=gen, dtype=F64) @ torch.randn(1, m, generator=gen, dtype=F64)
        return [
            common + torch.randn(n, 2, generator=gen, dtype=F64) @ torch.randn(2, m, generator=gen, dtype=F64)
            for _ in range(tasks)
        ]
    if case == "clustered":
        u = orthonormal(n, n, gen)
        v = orthonormal(m, m, gen)
        s_c = torch.arange(12, 0, -1, dtype=F64).repeat_interleave(2) + 2.0
        common = (u[:, :24] * s_c) @ v[:, :24].T
        deltas = []
        for _ in range(tasks):
            w = 0.5 + torch.rand((), generator=gen, dtype=F64)
            p = u[:, 24:] @ (0.1 * torch.randn(n - 24, m - 24, generator=gen, dtype=F64)) @ v[:, 24:].T
            deltas.append(w * common + p)
        return deltas
    if case == "clustered_tasks":
        d = min(n, m)
        s = torch.cat(
            [torch.tensor([4.0, 3.0, 2.0, 1.5], dtype=F64).repeat_interleave(2), torch.linspace(0.5, 0.1, d - 8)]
        )
        return [(orthonormal(n, d, gen) * s) @ orthonormal(m, d, gen).T for _ in range(tasks)]
    if case == "disjoint":
        rows, cols = n // tasks, m // tasks
        spectrum = torch.linspace(3.0, 1.0, min(rows, cols), dtype=F64)
        deltas = []
        for i in range(tasks):
            block = (orthonormal(rows, len(spectrum), gen) * spectrum) @ orthonormal(cols, len(spectrum), gen).T
            delta = torch.zeros(n, m, dtype=F64)
            delta[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = block
            deltas.append(delta)
        return deltas
    raise ValueError(f"unknown case {case!r}")


def low_rank_factors(
    shape: tuple[int, int], ranks: list[int], seed: int = 0, shared: bool = False
) -> list[tuple[Tensor, Tensor, float]]:
    """``(B, A, scale)`` per task, float64; ``shared`` gives every ``A`` the same first row (overlapping row spaces).

    Overlapping row spaces make TSV-M's and Iso-CTS's concatenated singular vectors linearly dependent, where their
    polar factors (and so the methods) are not defined; DRM and Iso-C are fine with them.
    """
    gen = torch.Generator().manual_seed(seed)
    n, m = shape
    shared_a = torch.randn(1, m, generator=gen, dtype=F64)
    out = []
    for r in ranks:
        own = torch.randn(r, m, generator=gen, dtype=F64)
        a = torch.cat([shared_a, own[1:]]) if shared else own
        out.append((torch.randn(n, r, generator=gen, dtype=F64), a, 2.0 / r))
    return out


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Relative Frobenius error in float64 (absolute when ``expected`` is zero)."""
    diff = (actual.to(F64) - expected.to(F64)).norm()
    scale = expected.to(F64).norm()
    return float(diff / scale) if scale > 0 else float(diff)
