"""Merged folders (``merge_task_vectors`` output) as the evaluation sees them.

``merge.json`` gives the method, label and merge timings; ``merged_delta/`` holds Δ_merged, sharded, with a
Hugging Face style index; ``MergedBackbone`` turns the folder into a backbone at any λ without reloading the base.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from drm_lightning.merging.shards import merged_delta_index


class MergedBackbone:
    """The base backbone of a merged folder, rescaled in place to ``W_0 + λ·Δ_merged`` for any λ.

    Why: the base is loaded (and its fingerprint checked) once by ``apply_merged_delta(merged, 0)``; the weights
    Δ_merged touches are copied, and each ``at(lam)`` restores them and adds ``lam·Δ_merged``: the same arithmetic,
    hence the same bytes, as ``apply_merged_delta(merged, lam)`` without reloading the base per λ. Costs one copy
    of the touched weights.
    """

    def __init__(
        self,
        merged: str | os.PathLike[str],
        *,
        torch_dtype: str | torch.dtype | None = None,
        gguf_file: str | None = None,
    ) -> None:
        """Load the base of ``merged`` (checking its fingerprint) at λ = 0.

        Args:
            merged: a folder written by ``merge_task_vectors``.
            torch_dtype, gguf_file: how to load the base; default: what ``merge.json`` records (the task vectors'
                own, so a base fitted in bfloat16 or from a GGUF file is reloaded the same way).
        """
        from drm_lightning.merging.apply import apply_merged_delta

        self.merged = Path(merged)
        self.model = apply_merged_delta(self.merged, 0.0, torch_dtype=torch_dtype, gguf_file=gguf_file)
        state = self.model.state_dict()
        self._base = {name: state[name].detach().clone() for name in sorted(merged_delta_index(self.merged))}
        self.lam: float | None = 0.0

    @torch.no_grad()
    def at(self, lam: float):  # -> the backbone module (a transformers PreTrainedModel)
        """The backbone with ``W_0 + lam·Δ_merged`` (the same module object every time, changed in place)."""
        from drm_lightning.merging.apply import add_merged_delta

        if lam != self.lam:
            state = self.model.state_dict()
            for name, value in self._base.items():
                state[name].copy_(value.to(state[name].device))
            self.lam = None  # a failure half-way leaves no claim about the weights
            add_merged_delta(self.model, self.merged, lam)
            self.lam = lam
        return self.model


def merge_seconds(info: dict[str, Any]) -> float | None:
    """Wall time of the merge from ``merge.json``'s ``timings`` (its ``total``); ``None`` when not recorded."""
    total = (info.get("timings") or {}).get("total")
    return None if total is None else float(total)


def merge_label(info: dict[str, Any]) -> str:
    """The name a merged model goes by in the report: its ``label`` (e.g. ``drm_v``), else its method."""
    return str(info.get("label") or info["method"])
