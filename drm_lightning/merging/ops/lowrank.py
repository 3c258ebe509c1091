"""Factored (LoRA) task deltas: ``Δ = scale · B @ A`` kept as its factors.

A LoRA expert's delta of a ``[out, in]`` weight has rank ``r ≪ min(out, in)``. Keeping the factors is exact and small,
and it lets the SVD-based methods work in the joint ``T·r``-dimensional row/column space instead of materialising
``T`` dense ``[out, in]`` deltas (see ``functional.drm``, ``iso_c``, ``iso_cts``, ``tsv_m``). The on-disk layout
(``name.lora_A`` / ``name.lora_B`` and ``meta.lora.scale``) is described in ``io/task_vector.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """The delta ``scale · B @ A`` of one task for one linear weight.

    Attributes:
        B: ``[out, r]`` (``lora_B``).
        A: ``[r, in]`` (``lora_A``).
        scale: LoRA scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name, factor in (("B", self.B), ("A", self.A)):
            if not isinstance(factor, Tensor):
                raise ValueError(f"LowRankDelta.{name} must be a torch.Tensor, got {type(factor).__name__}")
            if factor.dim() != 2:
                raise ValueError(f"LowRankDelta.{name} must be 2-D, got shape {tuple(factor.shape)}")
            if not factor.is_floating_point():
                raise ValueError(f"LowRankDelta.{name} must be a floating-point tensor, got dtype {factor.dtype}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRankDelta: B is {tuple(self.B.shape)} and A is {tuple(self.A.shape)}; "
                "B.shape[1] must equal A.shape[0] (the rank)"
            )
        if self.B.device != self.A.device:
            raise ValueError(f"LowRankDelta: B is on {self.B.device} but A is on {self.A.device}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(float(scale)):
            raise ValueError(f"LowRankDelta.scale must be a finite real number, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))

    @property
    def shape(self) -> torch.Size:
        """``[out, in]``, the shape of the dense delta."""
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    @property
    def rank(self) -> int:
        """The inner dimension ``r`` of the factors (an upper bound on the delta's rank)."""
        return self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the dense delta is given in: the promotion of the factors' dtypes."""
        return torch.promote_types(self.B.dtype, self.A.dtype)

    @property
    def device(self) -> torch.device:
        return self.B.device

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``[out, in]`` delta, multiplied out in at least float32 and returned in ``dtype``.

        Args:
            dtype: Result dtype; defaults to ``self.dtype``.
        """
        dtype = dtype or self.dtype
        work = torch.promote_types(dtype, torch.float32)
        return ((self.B.to(work) @ self.A.to(work)) * self.scale).to(dtype)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``(scale · B, A)`` in ``dtype``, so that the delta is their product."""
        return self.B.to(dtype) * self.scale, self.A.to(dtype)

    def transpose(self) -> LowRankDelta:
        """The delta of the transposed weight, ``(scale · B A)ᵀ = scale · Aᵀ Bᵀ``."""
        return LowRankDelta(self.A.mT, self.B.mT, self.scale)
