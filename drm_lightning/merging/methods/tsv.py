"""TSV-M (arXiv 2412.00081): each task's top singular components, concatenated and decorrelated.

Float64 throughout (``linalg.py``); dense deltas are decomposed one task at a time, ``LowRankDelta`` factors in
their own space. docs/methods.md has the equations and the rank tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from drm_lightning.merging.methods.basic import task_mean
from drm_lightning.merging.methods.checks import RANK_TOL, check_out_dtype, check_rank_tol
from drm_lightning.merging.methods.inputs import Coefficients, Delta, prepare, task_coefficients
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.linalg import factored_svd, polar_factor, thin_svd

_F64 = torch.float64


def tsv_m(
    deltas: Sequence[Delta],
    coefficients: Coefficients = None,
    rank_tol: float = RANK_TOL,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TSV-M (arXiv 2412.00081): each task's top ``k = min(n, m) // T`` singular components, decorrelated.

    The components of all tasks are concatenated, ``U`` and ``V`` replaced by their polar factors, and the merged
    delta is ``U diag(S) Vᵀ``. Coefficients scale each delta first. Components with ``σ <= rank_tol · σ_ref``,
    ``σ_ref`` the largest singular value of all tasks, are left out (see ``iso_c`` for the default).

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``); needs ``T <= min(n, m)``.
        coefficients: ``c_i``, default 1.
        rank_tol: Relative rank tolerance in ``[0, 1)``.
        out_dtype: Result dtype (default: the deltas').
    """
    rank_tol = check_rank_tol(rank_tol)
    out_dtype = check_out_dtype(out_dtype)
    inputs = prepare("tsv_m", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = task_coefficients("tsv_m", coefficients, inputs.count, inputs.device)
    n, m = inputs.shape
    k = min(n, m) // inputs.count
    if k == 0:
        raise ValueError(
            f"tsv_m keeps min(n, m) // T components per task: T={inputs.count} deltas of shape {(n, m)} leave none; "
            "merge this parameter with the elementwise rule instead"
        )
    if inputs.factors is None:  # one task at a time, straight into [n, T·k]: no float64 [T, n, m] stack
        u = torch.empty((n, inputs.count * k), dtype=_F64, device=inputs.device)
        v = torch.empty((m, inputs.count * k), dtype=_F64, device=inputs.device)
        s = torch.empty(inputs.count * k, dtype=_F64, device=inputs.device)
        for i, ci in enumerate(c.tolist()):
            u_i, s_i, v_i = thin_svd(inputs.task(i).mul_(ci), rank_tol=rank_tol, top=k)
            u[:, i * k : (i + 1) * k], s[i * k : (i + 1) * k], v[:, i * k : (i + 1) * k] = u_i, s_i, v_i
            del u_i, v_i
    else:
        svds = [factored_svd(ci * left, right) for ci, (left, right) in zip(c, inputs.factors, strict=True)]
        u = [f[0][:, :k] for f in svds]
        s = [f[1][:k] for f in svds]
        v = [f[2][:, :k] for f in svds]
        width = max(x.shape[0] for x in s)
        u = torch.stack([F.pad(x, (0, width - x.shape[1])) for x in u])
        v = torch.stack([F.pad(x, (0, width - x.shape[1])) for x in v])
        s = torch.stack([F.pad(x, (0, width - x.shape[0])) for x in s])
        u, s, v = u.permute(1, 0, 2).reshape(n, -1), s.reshape(-1), v.permute(1, 0, 2).reshape(m, -1)
    keep = s > rank_tol * s.amax()
    if not bool(keep.any()):
        return inputs.finish(torch.zeros(inputs.shape, dtype=_F64, device=inputs.device), out_dtype)
    if not bool(keep.all()):
        u, s, v = u[:, keep], s[keep], v[:, keep]
    u = polar_factor(u).mul_(s)
    v = polar_factor(v)
    return inputs.finish(u @ v.mT, out_dtype)


METHODS = (
    MergeMethod(
        "tsv_m",
        "TSV-M",
        "https://arxiv.org/abs/2412.00081",
        tsv_m,
        True,
        {"rank_tol": RANK_TOL},
        elementwise=task_mean,
        lora_span="both",
    ),
)
"""The registry's entry of this module; non-matrix parameters take the plain mean (``basic.task_mean``)."""
