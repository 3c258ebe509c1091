"""Model Stock (arXiv 2403.19522): the task mean pulled toward the base by the experts' agreement (docs/methods.md).

Per parameter (the paper's layer-wise ratio): ``cos θ`` is the mean of the pairwise cosines of the task deltas,
``t = T·cos θ / (1 + (T − 1)·cos θ)``, and the merged delta is ``t · (1/T) Σ_i c_i Δ_i``: the paper's
``w_H = t·w_avg + (1 − t)·w_0`` written on deltas. The cosines are taken on the unweighted deltas (the coefficients
weigh the mean only); a pair with a zero delta has cosine 0, a mean cosine at or below 0 gives ``t = 0`` (the base's
weight), one task gives ``t = 1``. Elementwise in the registry's sense: every parameter takes the same rule.

Memory: two chunked passes over the deltas (the Gram, then the weighted sum), float64 buffers of one chunk of the T
deltas; no ``[T, ...]`` stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from drm_lightning.merging.methods.inputs import Coefficients, Delta, prepare_elementwise
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.elementwise import chunk_size, merge_chunks

_F64 = torch.float64


def stock_ratio(gram: Tensor) -> Tensor:
    """Model Stock's ``t`` from the Grams ``[..., T, T]`` of the task deltas (any common scale per task).

    The mean of the pairwise cosines ``G_ij / sqrt(G_ii G_jj)`` over ``i < j`` (0 for a pair with a zero delta),
    held to ``[0, 1]``, then ``t = T·cos / (1 + (T − 1)·cos)``; ``T = 1`` gives 1.
    """
    tasks = gram.shape[-1]
    if tasks == 1:
        return torch.ones(gram.shape[:-2], dtype=gram.dtype, device=gram.device)
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    cosines = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1), 0).clamp(-1, 1)
    i, j = torch.triu_indices(tasks, tasks, 1, device=gram.device)
    cos = cosines[..., i, j].mean(-1).clamp(0, 1)
    return tasks * cos / (1 + (tasks - 1) * cos)


def _scales(flats: Sequence[Tensor]) -> Tensor:
    """Each delta's largest magnitude (1 for a zero delta): the Grams are taken on ``Δ_i / s_i``, which keeps them
    clear of underflow and overflow; the cosines do not depend on it."""
    values = [max(abs(float(low)), abs(float(high))) or 1.0 for low, high in (x.aminmax() for x in flats)]
    return torch.tensor(values, dtype=_F64, device=flats[0].device)


def model_stock(
    deltas: Sequence[Delta], coefficients: Coefficients = None, *, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Model Stock (arXiv 2403.19522): ``t · (1/T) Σ_i c_i Δ_i`` with ``t`` from the deltas' mean pairwise cosine.

    Args:
        deltas: Per-task deltas of one parameter (``LowRankDelta`` are densified).
        coefficients: ``c_i`` applied in the mean (the cosines are the unweighted deltas').
        out_dtype: Result dtype (default: the deltas').
    """
    flat, c, out = prepare_elementwise("model_stock", deltas, coefficients, out_dtype)
    tasks, numel = len(flat.flats), out.numel()
    if numel == 0:
        return out.reshape(flat.shape)
    scales = _scales(flat.flats)
    gram = torch.zeros((tasks, tasks), dtype=_F64, device=out.device)
    step = chunk_size(numel)
    buf = torch.empty((tasks, min(step, numel)), dtype=_F64, device=out.device)
    for a in range(0, numel, step):
        b = min(numel, a + step)
        x = buf[:, : b - a]
        for i, delta in enumerate(flat.flats):
            x[i].copy_(delta[a:b]).div_(scales[i])
        gram.addmm_(x, x.T)
    t = stock_ratio(gram)
    return merge_chunks(flat.flats, c * (t / tasks), out, elect=None).reshape(flat.shape)


METHODS = (
    MergeMethod(
        "model_stock",
        "Model Stock",
        "https://arxiv.org/abs/2403.19522",
        model_stock,
        False,
        {},
        lora_span="both",
    ),
)
"""The registry's entry of this module; ``lora_span="both"``: a multiple of ``Σ_i c_i B_i A_i``."""
