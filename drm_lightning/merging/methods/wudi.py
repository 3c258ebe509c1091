"""WUDI (arXiv 2503.08099): the merged delta each task's own row space reads as that task's delta, data-free.

Per linear layer the merged delta minimises ``L(Δ) = Σ_i w_i ‖(Δ − Δ_i) Δ_iᵀ‖²_F`` with ``w_i = 1/‖Δ_i‖²_F`` (0 for
a zero delta): the task vectors stand in for their layer's inputs. ``wudi`` runs the authors' Adam loop from the
Task Arithmetic sum; ``wudi_closed`` solves the ridge-regularised normal equations, ``Δ = R (G + ρ (tr G / m) I)⁻¹``
with ``G = Σ_i w_i Δ_iᵀΔ_i`` and ``R = Σ_i w_i Δ_i Δ_iᵀ Δ_i``. Both in float64; coefficients scale each delta before
anything else; non-matrix parameters take the plain mean (FusionBench's ``wudi_merging``). docs/methods.md, "WUDI",
has the equations, the defaults and why ρ = 0 is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merging.methods.basic import task_mean
from drm_lightning.merging.methods.checks import check_out_dtype, real_in
from drm_lightning.merging.methods.inputs import Coefficients, Delta, Inputs, prepare, task_coefficients
from drm_lightning.merging.methods.spec import MergeMethod

_F64 = torch.float64

WUDI_STEPS = 300
"""Adam steps per matrix: the authors' ``iter_num`` (their code's default; FusionBench's config says 400)."""
WUDI_LR = 1e-5
"""Adam's learning rate, the authors' (and FusionBench's)."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s defaults, which the authors keep (weight decay 0)."""
WUDI_RIDGE = 0.1
"""``wudi_closed``'s default ρ, measured on the quickstart's experts (docs/methods.md, "WUDI")."""


def check_steps(value: Any) -> int:
    """``wudi``'s Adam steps: an integer ``>= 0`` (0 returns the Task Arithmetic sum it starts from)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 0:
        raise ValueError(f"steps must be an integer >= 0, got {value!r}")
    return int(value)


def check_lr(value: Any) -> float:
    """``wudi``'s Adam learning rate, a finite real ``> 0``."""
    return real_in("lr", value, 0.0, math.inf, low_open=True, high_open=True)


def check_ridge(value: Any) -> float:
    """``wudi_closed``'s ridge ρ, a finite real ``> 0``: ρ → 0 is ill-posed on wide matrices (docs/methods.md)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"ridge must be a finite real number, got {value!r}")
    if float(value) <= 0:
        raise ValueError(
            f"ridge must be > 0, got {value!r}: without a ridge WUDI's closed form is ill-posed on wide matrices "
            "(near-singular Grams; docs/methods.md, WUDI)"
        )
    return float(value)


def _unit(part: Tensor) -> tuple[Tensor, float] | None:
    """``(E_i, s_i)``: ``s_i = ‖Δ_i‖_F`` and ``E_i = Δ_i / s_i = √w_i Δ_i`` (in place); ``None`` for a zero delta."""
    norm = float(torch.linalg.vector_norm(part))
    return (part.div_(norm), norm) if norm > 0 else None


def _grams(
    parts: Iterable[Tensor], shape: torch.Size, device: torch.device, start: Tensor | None = None
) -> tuple[Tensor, Tensor, int]:
    """``G = Σ_i E_iᵀE_i`` ``[m, m]``, ``Σ_i X_i E_iᵀE_i`` ``[n, m]`` and the number of nonzero deltas, one task at a
    time (``parts`` yields fresh float64 tensors ``P_i = c_i Δ_i``, which are consumed). ``X_i = P_i`` gives
    ``R``; with ``start`` ``S``, ``X_i = S − P_i`` gives half the gradient of WUDI's objective at ``S``, formed as
    the authors' autograd forms it (a task the sum already solves adds exactly zero)."""
    n, m = shape
    gram = torch.zeros((m, m), dtype=_F64, device=device)
    rhs = torch.zeros((n, m), dtype=_F64, device=device)
    count = 0
    for part in parts:
        other = None if start is None else torch.sub(start, part)
        found = _unit(part)
        if found is None:
            continue
        unit, norm = found
        alpha = norm if other is None else 1.0  # P_i = s_i E_i
        other = unit if other is None else other
        count += 1
        task_gram = unit.mT @ unit
        gram.add_(task_gram)
        if n < m:  # (X Eᵀ) E: 2n²m flops instead of n m²
            rhs.addmm_(other @ unit.mT, unit, alpha=alpha)
        else:
            rhs.addmm_(other, task_gram, alpha=alpha)
        del task_gram, unit, other
    return gram, rhs, count


def _dense_parts(inputs: Inputs, c: Tensor) -> Iterator[Tensor]:
    """``c_i Δ_i / unit`` in float64, one fresh tensor per task, made when asked for."""
    for i, ci in enumerate(c.tolist()):
        yield inputs.task(i).mul_(ci)


def _factored_parts(inputs: Inputs, c: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """LoRA deltas in the factors' joint space: ``c_i Δ_i = Q_l K_i Q_rᵀ`` with orthonormal ``Q_l`` ``[n, p]`` (the
    span of every ``B_i``), ``Q_r`` ``[m, q]`` (of every ``A_iᵀ``) and small ``K_i`` ``[p, q]``, ``p, q <= Σ r_i``."""
    lefts = [ci * left for ci, (left, _) in zip(c, inputs.factors, strict=True)]
    q_l, _ = torch.linalg.qr(torch.cat(lefts, dim=1))
    q_r, _ = torch.linalg.qr(torch.cat([right.mT for _, right in inputs.factors], dim=1))
    parts = [(q_l.mT @ left) @ (right @ q_r) for left, (_, right) in zip(lefts, inputs.factors, strict=True)]
    return parts, q_l, q_r


@dataclass(frozen=True, eq=False)
class WudiGrams:
    """WUDI's normal equations of one parameter, diagonalised once, ready to solve at any ridge.

    ``Δ(ρ) = left · diag(1 / (Λ + μ)) · right`` with ``μ = ρ · tr G / m``: on the ``m`` side ``G = V Λ Vᵀ``,
    ``left = R V``, ``right = Vᵀ``; on the ``n`` side (``T n < m``) ``K = E Eᵀ = U Λ Uᵀ`` for the stacked unit
    deltas ``E`` ``[T n, m]``, ``left = C U`` with ``C = [s_1 E_1 E_1ᵀ, …, s_T E_T E_Tᵀ]`` and ``right = Uᵀ E``
    (the push-through identity ``E (EᵀE + μ I)⁻¹ = (E Eᵀ + μ I)⁻¹ E``, and ``R = C E``). Built by
    ``wudi_closed_basis``; a search over ``ridge`` reuses it (``merge``).
    """

    left: Tensor
    values: Tensor
    right: Tensor
    trace: float
    width: int
    _inputs: Inputs

    def merge(self, ridge: float = WUDI_RIDGE, *, out_dtype: torch.dtype | None = None) -> Tensor:
        """``wudi_closed`` at ``ridge`` (see there)."""
        ridge, out_dtype = check_ridge(ridge), check_out_dtype(out_dtype)
        inputs = self._inputs
        if self.trace <= 0:  # every delta zero: G = 0 and R = 0
            return inputs.finish(torch.zeros(inputs.shape, dtype=_F64, device=inputs.device), out_dtype)
        shift = ridge * self.trace / self.width
        merged = (self.left / (self.values + shift)) @ self.right
        return inputs.finish(merged, out_dtype)


def _closed_factors(
    parts: Iterable[Tensor], count: int, shape: torch.Size, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(left, Λ, right, tr G)`` of ``WudiGrams`` for ``count`` dense float64 ``parts`` of ``shape`` ``[n, m]``, on
    the cheaper side: the ``n`` side when ``T n < m`` (its stack of unit deltas is then smaller than ``G``)."""
    n, m = shape
    if count * n < m:
        units = [found for found in map(_unit, parts) if found is not None]
        if not units:
            empty = torch.zeros(0, dtype=_F64, device=device)
            return empty.reshape(n, 0), empty, empty.reshape(0, m), 0.0
        stacked = torch.cat([unit for unit, _ in units], dim=0)  # E, [T n, m]
        norms = [norm for _, norm in units]
        del units
        outer = stacked @ stacked.mT  # K = E Eᵀ
        coupling = torch.cat(  # C = [s_1 E_1 E_1ᵀ, …], [n, T n]: the diagonal blocks of K
            [norm * outer[i * n : (i + 1) * n, i * n : (i + 1) * n] for i, norm in enumerate(norms)], dim=1
        )
        trace = float(outer.diagonal().sum())
        values, vectors = torch.linalg.eigh(outer)
        del outer
        return coupling @ vectors, values.clamp_min_(0.0), vectors.mT @ stacked, trace
    gram, rhs, _ = _grams(parts, shape, device)
    trace = float(gram.diagonal().sum())
    values, vectors = torch.linalg.eigh(gram)
    del gram
    return rhs @ vectors, values.clamp_min_(0.0), vectors.mT, trace


def wudi_closed_basis(deltas: Sequence[Delta], coefficients: Coefficients = None) -> WudiGrams:
    """``wudi_closed``'s inputs, checked and diagonalised, ready to solve at any ridge (``WudiGrams``)."""
    inputs = prepare("wudi_closed", deltas, matrix=True, keep_factors=True, normalise=True, stack=False)
    c = task_coefficients("wudi_closed", coefficients, inputs.count, inputs.device)
    n, m = inputs.shape
    if inputs.factors is not None:
        parts, q_l, q_r = _factored_parts(inputs, c)
        left, values, right, trace = _closed_factors(parts, len(parts), parts[0].shape, inputs.device)
        left, right = q_l @ left, right @ q_r.mT
    else:
        left, values, right, trace = _closed_factors(_dense_parts(inputs, c), inputs.count, (n, m), inputs.device)
    return WudiGrams(left, values, right, trace, m, inputs)


def wudi_closed(
    deltas: Sequence[Delta],
    ridge: float = WUDI_RIDGE,
    coefficients: Coefficients = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """WUDI's closed form with a ridge: ``Δ = R (G + ρ (tr G / m) I)⁻¹``.

    ``G = Σ_i w_i Δ_iᵀΔ_i``, ``R = Σ_i w_i Δ_i Δ_iᵀ Δ_i``, ``w_i = 1/‖Δ_i‖²_F`` (0 for a zero delta) over the
    coefficient-scaled deltas ``c_i Δ_i``, ``m`` the input dimension; this is the minimiser of WUDI's objective plus
    ``ρ (tr G / m) ‖Δ‖²_F``. ``tr G`` is the number of nonzero deltas, so ρ is the ridge relative to ``G``'s mean
    eigenvalue. One float64 ``eigh`` on the cheaper side: of ``G`` (``m``-sized), or for ``T n < m`` of the stacked
    deltas' ``T n``-sized Gram. ``LowRankDelta`` factors are solved in their joint row and column spaces
    (``Σ r_i``-sized; exact: the ridge term leaves the complement of the factors' row space at zero).

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        ridge: ρ ``> 0``; ρ → 0 is ill-posed on wide matrices and refused at 0.
        coefficients: ``c_i``, default 1.
        out_dtype: Result dtype (default: the deltas').
    """
    ridge, out_dtype = check_ridge(ridge), check_out_dtype(out_dtype)
    return wudi_closed_basis(deltas, coefficients).merge(ridge, out_dtype=out_dtype)


def wudi_closed_terms(
    deltas: Sequence[Delta],
    ridge: float = WUDI_RIDGE,
    coefficients: Coefficients = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``wudi_closed``'s per-task terms ``D_i = w_i P_i P_iᵀ P_i M⁻¹``, stacked ``[T, n, m]`` (``P_i = c_i Δ_i``,
    ``M = G + ρ (tr G / m) I``; a zero delta's term is zero).

    ``Σ_i D_i`` is ``wudi_closed``; ``w_i = 1/‖P_i‖²`` makes ``G`` independent of the coefficients, so for nonzero
    ``λ_i`` ``Σ_i λ_i D_i`` is ``wudi_closed`` with coefficients ``λ_i c_i``: what learned per-task coefficients
    weigh (``evaluation/coefficients.py``). Dense float64 (``LowRankDelta`` factors are densified), one solve.
    """
    ridge, out_dtype = check_ridge(ridge), check_out_dtype(out_dtype)
    inputs = prepare("wudi_closed", deltas, matrix=True, keep_factors=False, normalise=True, stack=False)
    c = task_coefficients("wudi_closed", coefficients, inputs.count, inputs.device)
    n, m = inputs.shape
    out = torch.zeros((inputs.count, n, m), dtype=_F64, device=inputs.device)
    gram = torch.zeros((m, m), dtype=_F64, device=inputs.device)
    for i, part in enumerate(_dense_parts(inputs, c)):
        found = _unit(part)
        if found is None:
            continue
        unit, norm = found  # P_i = s_i E_i, w_i P_i P_iᵀ P_i = s_i E_i E_iᵀ E_i
        task_gram = unit.mT @ unit
        gram.add_(task_gram)
        out[i] = (unit @ task_gram).mul_(norm)
    trace = float(gram.diagonal().sum())
    if trace <= 0:
        return out.to(out_dtype or inputs.dtype)
    gram.diagonal().add_(ridge * trace / m)
    solved = torch.linalg.solve(gram, out.reshape(-1, m).mT).mT  # M symmetric
    return solved.reshape(inputs.count, n, m).mul_(inputs.unit).to(out_dtype or inputs.dtype)


def wudi(
    deltas: Sequence[Delta],
    steps: int = WUDI_STEPS,
    lr: float = WUDI_LR,
    coefficients: Coefficients = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """WUDI as its authors run it: Adam on ``L(Δ) = Σ_i w_i ‖(Δ − Δ_i) Δ_iᵀ‖²_F`` from ``Δ = Σ_i c_i Δ_i``.

    ``w_i = 1/‖c_i Δ_i‖²_F`` (0 for a zero delta, where the authors' code divides by zero), ``steps`` Adam steps at
    ``lr`` with ``torch.optim.Adam``'s defaults (β = (0.9, 0.999), ε = 1e-8, no weight decay). Deterministic: with
    ``Δ = S + Y`` (``S`` the sum) the gradient is the exact ``∇L = 2 (Y G + Σ_i w_i (S − Δ_i) Δ_iᵀΔ_i)`` with ``G``
    of ``wudi_closed`` and the second term formed once (the authors' autograd evaluates the same expression through
    ``T`` products of ``[n, n]`` per step; a task the sum already solves contributes exactly zero in both); float64
    where the authors run float32. Near the minimum Adam's normalised step keeps every entry moving by about ``lr``
    per step, so results agree with another implementation only as far as the trajectory stays away from it. Adam
    is not invariant to rotations or scale (ε and ``lr`` are absolute), so the deltas are used as given:
    ``LowRankDelta`` factors are densified, and the result depends on the deltas' scale as the authors' does.

    Args:
        deltas: Per-task ``[n, m]`` deltas (tensors or ``LowRankDelta``).
        steps: Adam steps ``>= 0`` (0: the sum).
        lr: Adam's learning rate ``> 0``.
        coefficients: ``c_i``, default 1.
        out_dtype: Result dtype (default: the deltas').
    """
    steps, lr, out_dtype = check_steps(steps), check_lr(lr), check_out_dtype(out_dtype)
    inputs = prepare("wudi", deltas, matrix=True, keep_factors=False, normalise=False, stack=False)
    c = task_coefficients("wudi", coefficients, inputs.count, inputs.device)
    start = inputs.weighted_sum(c)
    if steps == 0:
        return inputs.finish(start, out_dtype)
    gram, at_start, count = _grams(_dense_parts(inputs, c), inputs.shape, inputs.device, start=start)
    if count == 0:
        return inputs.finish(start, out_dtype)
    # Δ = S + Y: ∇L(Δ) = 2 (Y G + Σ_i (S − P_i) E_iᵀE_i), exactly 0 where the sum is already the minimiser
    beta1, beta2 = ADAM_BETAS
    moved = torch.zeros_like(start)
    moment = torch.zeros_like(start)
    second = torch.zeros_like(start)
    grad = torch.empty_like(start)  # the gradient, then (once the moments have it) Adam's denominator
    for step in range(1, steps + 1):
        torch.mm(moved, gram, out=grad).add_(at_start).mul_(2.0)
        moment.mul_(beta1).add_(grad, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = torch.sqrt(second, out=grad).div_(math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
        moved.addcdiv_(moment, denominator, value=-lr / (1 - beta1**step))
    return inputs.finish(start.add_(moved), out_dtype)


METHODS = (
    MergeMethod(
        "wudi",
        "WUDI",
        "https://arxiv.org/abs/2503.08099",
        wudi,
        True,
        {"steps": WUDI_STEPS, "lr": WUDI_LR},
        elementwise=task_mean,
        param_checks={"steps": check_steps, "lr": check_lr},
        # lora_span None: Adam divides the gradient entry by entry, so its steps leave the factors' spans
    ),
    MergeMethod(
        "wudi_closed",
        "WUDI-closed",
        "https://arxiv.org/abs/2503.08099",
        wudi_closed,
        True,
        {"ridge": WUDI_RIDGE},
        elementwise=task_mean,
        prepare=wudi_closed_basis,
        param_checks={"ridge": check_ridge},
        task_terms=wudi_closed_terms,
        lora_span="both",
    ),
)
"""The registry's entries of this module; non-matrix parameters take the plain mean (``basic.task_mean``), as
FusionBench's ``wudi_merging`` does (the sum over ``T``)."""
