"""RegMean (arXiv 2212.09849): each linear layer merged as the least-squares fit to every task's outputs on its data.

For a weight ``[out, in]`` with per-task input Grams ``G_i`` (``[in, in]``, the per-row mean ``Σ x xᵀ / rows`` that
``io/statistics.py`` stores) and ``G̃_i = α·G_i + (1 − α)·diag(G_i)``::

    Δ = (Σ_i c_i Δ_i (G̃_i + ρ̄ I)) (Σ_i (G̃_i + ρ̄ I))⁻¹,    ρ̄ = ridge · tr(Σ_i G̃_i) / (T · in)

The ridge ``ρ̄`` (relative, default 1e-8) is the rule for a singular ``Σ G̃``: it is the exact minimiser of
``Σ_i ‖X_i(W − W_i)ᵀ‖²`` plus ``ρ̄ Σ_i ‖Δ − c_i Δ_i‖²``, so along input directions no task's data reaches the result
is the plain mean of the ``c_i Δ_i`` (the rule of every parameter without statistics) and elsewhere it moves the
solution by about ``ridge × condition``. All Grams zero, or no statistics for the parameter: the plain mean.

LoRA deltas ``Δ_i = B_i A_i`` stay factored: ``Δ = Σ_i c_i B_i (A_i (G̃_i + ρ̄ I) S⁻¹)`` with one solve of the
stacked ``Σ r_i × in`` right factors, so the result has rank ≤ Σ r_i and its columns lie in ``span[B_i]``
(``export/factor.py`` writes it back as an exact adapter). Everything runs in float64 on the deltas' device, one
Gram at a time (the Grams arrive on the CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merging.methods.basic import task_mean
from drm_lightning.merging.methods.checks import check_out_dtype, real_in
from drm_lightning.merging.methods.inputs import Coefficients, Delta, prepare, task_coefficients
from drm_lightning.merging.methods.spec import MergeMethod

ALPHA = 0.9
"""Default α (off-diagonal share kept): FusionBench's CLIP setting is 0.95, the authors' configs 0.1 or 0.9."""
ALPHA_PLUSPLUS = 0.95
"""RegMean++'s default α: FusionBench's ``regmean_plusplus/clip_regmean_plusplus.yaml`` (which the RegMean++
authors' experiments run), ``reduce_non_diagonal_ratio: 0.95``."""
RIDGE = 1e-8
"""Default relative ridge ``ρ`` (of the mean eigenvalue of ``Σ G̃``): the rule for a singular ``Σ G̃``."""
_F64 = torch.float64


def check_alpha(value: Any) -> float:
    """RegMean's α, the share of each Gram's off-diagonal kept, in ``[0, 1]`` (0: diagonal Grams, 1: full Grams)."""
    return real_in("alpha", value, 0.0, 1.0, low_open=False, high_open=False)


def check_ridge(value: Any) -> float:
    """RegMean's relative ridge in ``(0, 1]``; 0 is refused: a singular ``Σ G̃`` has no unique solution."""
    return real_in("ridge", value, 0.0, 1.0, low_open=True, high_open=False)


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """``α·G + (1 − α)·diag(G)`` in float64, a new tensor."""
    out = gram.to(_F64, copy=True)
    diagonal = out.diagonal().clone()
    out.mul_(alpha)
    out.diagonal().copy_(diagonal)
    return out


def _check_statistics(statistics: Any, count: int, cols: int) -> list[Tensor]:
    if isinstance(statistics, Tensor | str) or not isinstance(statistics, Sequence):
        got = type(statistics).__name__
        raise ValueError(f"regmean: statistics must be a sequence of {count} Gram matrices, got {got}")
    grams = list(statistics)
    if len(grams) != count:
        raise ValueError(f"regmean: {len(grams)} Gram matrices for {count} deltas")
    for i, gram in enumerate(grams):
        if not isinstance(gram, Tensor) or not gram.is_floating_point() or tuple(gram.shape) != (cols, cols):
            got = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
            raise ValueError(f"regmean: statistics[{i}] must be a float [{cols}, {cols}] Gram matrix, got {got}")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"regmean: statistics[{i}] contains NaN or Inf")
    return grams


def regmean(
    deltas: Sequence[Delta],
    alpha: float = ALPHA,
    ridge: float = RIDGE,
    coefficients: Coefficients = None,
    *,
    statistics: Sequence[Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """RegMean on one linear weight's deltas (module docstring; docs/methods.md, RegMean).

    Args:
        deltas: Per-task ``[out, in]`` deltas (all ``LowRankDelta``: kept factored).
        alpha: α, the share of each Gram's off-diagonal kept.
        ridge: relative ridge, the rule for a singular ``Σ G̃``.
        coefficients: ``c_i``, default 1; they scale the deltas, not the Grams.
        statistics: per task, the ``[in, in]`` input Gram of this layer; ``None``: the plain mean.
        out_dtype: Result dtype (default: the deltas').
    """
    alpha, ridge, out_dtype = check_alpha(alpha), check_ridge(ridge), check_out_dtype(out_dtype)
    inputs = prepare("regmean", deltas, matrix=True, keep_factors=True, stack=False)
    if statistics is None:
        return task_mean(deltas, coefficients, out_dtype=out_dtype)
    count, (rows, cols), device = inputs.count, inputs.shape, inputs.device
    c = task_coefficients("regmean", coefficients, count, device)
    grams = _check_statistics(statistics, count, cols)
    total = torch.zeros(cols, cols, dtype=_F64, device=device)
    for gram in grams:
        total.add_(shrink(gram.to(device), alpha))
    level = float(total.diagonal().sum()) / (count * cols)
    if level <= 0.0:  # every Gram zero: no data says anything
        return task_mean(deltas, coefficients, out_dtype=out_dtype)
    rho = ridge * level
    total.diagonal().add_(count * rho)
    if inputs.factors is not None:  # Σ_i c_i B_i (A_i G̃'_i) S⁻¹: one solve for the stacked right factors
        lefts, rights = [], []
        for i, (left, right) in enumerate(inputs.factors):
            lefts.append(left * c[i])
            rights.append(right @ shrink(grams[i].to(device), alpha) + rho * right)
        solved = torch.linalg.solve(total, torch.cat(rights).mT).mT  # S symmetric: (K S⁻¹)ᵀ = S⁻¹ Kᵀ
        merged = torch.cat(lefts, dim=1) @ solved
        return merged.mul_(inputs.unit).to(out_dtype or inputs.dtype)
    weighted = torch.zeros(rows, cols, dtype=_F64, device=device)
    for i in range(count):
        task = inputs.task(i)  # float64, a fresh tensor
        weighted.addmm_(task, shrink(grams[i].to(device), alpha), alpha=float(c[i])).add_(task, alpha=rho * float(c[i]))
        del task
    merged = torch.linalg.solve(total, weighted.mT).mT.contiguous()
    return inputs.finish(merged, out_dtype)


def regmean_terms(
    deltas: Sequence[Delta],
    alpha: float = ALPHA,
    ridge: float = RIDGE,
    coefficients: Coefficients = None,
    *,
    statistics: Sequence[Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """RegMean's per-task terms ``D_i = c_i Δ_i (G̃_i + ρ̄ I) S⁻¹``, ``S = Σ_j (G̃_j + ρ̄ I)``, stacked ``[T, out, in]``.

    ``Σ_i D_i`` is ``regmean`` with the same arguments, and ``S`` does not depend on the coefficients, so
    ``Σ_i λ_i D_i`` is ``regmean`` with coefficients ``λ_i c_i``: what learned per-task coefficients weigh
    (``evaluation/coefficients.py``). Without statistics, or all Grams zero: the plain mean's terms ``c_i Δ_i / T``.
    Dense float64 (``LowRankDelta`` factors are densified).
    """
    alpha, ridge, out_dtype = check_alpha(alpha), check_ridge(ridge), check_out_dtype(out_dtype)
    inputs = prepare("regmean", deltas, matrix=True, keep_factors=False, stack=False)
    count, (rows, cols), device = inputs.count, inputs.shape, inputs.device
    c = task_coefficients("regmean", coefficients, count, device)
    out = torch.stack([inputs.task(i).mul_(float(c[i])) for i in range(count)])
    grams = None if statistics is None else _check_statistics(statistics, count, cols)
    shrunk = [] if grams is None else [shrink(g.to(device), alpha) for g in grams]
    level = float(sum(float(g.diagonal().sum()) for g in shrunk)) / (count * cols)
    if level <= 0.0:
        return out.div_(count).mul_(inputs.unit).to(out_dtype or inputs.dtype)
    rho = ridge * level
    total = torch.stack(shrunk).sum(dim=0)
    total.diagonal().add_(count * rho)
    for i, gram in enumerate(shrunk):
        gram.diagonal().add_(rho)
        out[i] = out[i] @ gram
    solved = torch.linalg.solve(total, out.reshape(count * rows, cols).mT).mT  # S symmetric
    return solved.reshape(count, rows, cols).mul_(inputs.unit).to(out_dtype or inputs.dtype)


def regmean_plusplus(
    deltas: Sequence[Delta],
    alpha: float = ALPHA_PLUSPLUS,
    ridge: float = RIDGE,
    coefficients: Coefficients = None,
    *,
    statistics: Sequence[Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """RegMean++ (arXiv 2508.03121) on one linear weight: RegMean's solve (``regmean``) with Grams taken on the inputs
    the *merged* model's earlier layers produce, which ``evaluation/block_merge.py`` computes block by block while it
    merges (docs/methods.md, RegMean++); only the default α differs."""
    return regmean(deltas, alpha, ridge, coefficients, statistics=statistics, out_dtype=out_dtype)


METHODS = (
    MergeMethod(
        "regmean",
        "RegMean",
        "https://arxiv.org/abs/2212.09849",
        regmean,
        True,
        {"alpha": ALPHA, "ridge": RIDGE},
        elementwise=task_mean,
        param_checks={"alpha": check_alpha, "ridge": check_ridge},
        needs_statistics=True,
        task_terms=regmean_terms,
        lora_span="columns",
    ),
    MergeMethod(
        "regmean_plusplus",
        "RegMean++",
        "https://arxiv.org/abs/2508.03121",
        regmean_plusplus,
        True,
        {"alpha": ALPHA_PLUSPLUS, "ridge": RIDGE},
        elementwise=task_mean,
        param_checks={"alpha": check_alpha, "ridge": check_ridge},
        needs_statistics=True,
        block_by_block=True,
        lora_span="columns",
    ),
)
"""The registry's entries of this module (``merging/methods/registry.py`` collects them)."""
