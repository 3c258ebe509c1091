"""Task deltas with known structure for the merge-method tests (the float64 reference math itself is
``drm_lightning.merging.reference``): random ones, clustered spectra where a method's cut is or is not well
defined, disjoint tasks, rank-deficient (LoRA-like) and zero or tiny tasks, and LoRA factors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64


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


def agreeing_factors(
    shape: tuple[int, int], ranks: Sequence[int], gen: torch.Generator, dtype: torch.dtype = F64
) -> list[tuple[Tensor, Tensor]]:
    """``(B, A)`` per task whose products share one rank-1 direction (the first column of every ``B`` and the first
    row of every ``A``), as fine-tunes of one base do: the deltas' cosines are positive, so Model Stock's ratio is
    not 0 (on independent factors it often is: a mean cosine below 0 gives the base)."""
    n, m = shape
    b0, a0 = torch.randn(n, 1, generator=gen, dtype=dtype), torch.randn(1, m, generator=gen, dtype=dtype)
    return [
        (torch.cat([b0, torch.randn(n, r - 1, generator=gen, dtype=dtype)], dim=1),
         torch.cat([a0, torch.randn(r - 1, m, generator=gen, dtype=dtype)]))
        for r in ranks
    ]  # fmt: skip
