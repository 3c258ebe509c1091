"""Merged folders (``merge_task_vectors`` output) as the evaluation sees them.

``merge.json`` gives the method, label and merge timings; ``merged_delta/`` holds Δ_merged, sharded, with a
Hugging Face style index; ``MergedBackbone`` turns the folder into a backbone at any λ without reloading the base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from drm_lightning.io.merged_delta import INDEX_FILE, MERGED_DIR, merged_delta_index

CACHE_SHARE = 0.25
"""Δ_merged is kept in memory across a λ search when it takes at most this share of the available RAM."""


def merged_delta_bytes(merged: str | os.PathLike[str]) -> int:
    """Bytes of Δ_merged (float32) from its shard index's ``total_size``; the shards' sizes where it has none."""
    try:
        total = json.loads((Path(merged) / MERGED_DIR / INDEX_FILE).read_text())["metadata"]["total_size"]
        return int(total)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return sum(path.stat().st_size for path in set(merged_delta_index(merged).values()))


def delta_fits_in_memory(merged: str | os.PathLike[str], share: float = CACHE_SHARE) -> bool:
    """Whether Δ_merged of ``merged`` takes at most ``share`` of the RAM available now (False when unknown)."""
    from drm_lightning.memory import available_memory_bytes

    available = available_memory_bytes()
    return available is not None and merged_delta_bytes(merged) <= share * available


class MergedBackbone:
    """The base backbone of a merged folder, rescaled in place to ``W_0 + λ·Δ_merged`` for any λ.

    Why: the base is loaded (and its fingerprint checked) once; the weights Δ_merged touches are copied, and each
    ``at(lam)`` restores them and adds ``lam·Δ_merged``: the same arithmetic, hence the same bytes, as
    ``apply_merged_delta(merged, lam)`` without reloading the base per λ. Costs one copy of the touched weights.

    Δ_merged itself (float32, as large as the touched weights in float32) is read from disk once and kept in memory
    when it fits (``delta_fits_in_memory``: a quarter of the available RAM at most), so a λ search of n points reads
    it once instead of n + 1 times; otherwise it is streamed from the shards for each λ, in bounded memory.
    """

    def __init__(
        self,
        merged: str | os.PathLike[str],
        *,
        torch_dtype: str | torch.dtype | None = None,
        gguf_file: str | None = None,
        keep_delta: bool | None = None,
    ) -> None:
        """Load the base of ``merged`` (checking its fingerprint) at λ = 0.

        Args:
            merged: a folder written by ``merge_task_vectors``.
            torch_dtype, gguf_file: how to load the base; default: what ``merge.json`` records (the task vectors'
                own, so a base fitted in bfloat16 or from a GGUF file is reloaded the same way).
            keep_delta: keep Δ_merged in memory (True), stream it per λ (False), or decide by the available RAM
                (``None``, the default).
        """
        from drm_lightning.io.merged_delta import iter_merged_delta
        from drm_lightning.merging.engine.apply import apply_merged_delta

        self.merged = Path(merged)
        keep = delta_fits_in_memory(self.merged) if keep_delta is None else bool(keep_delta)
        # the one read of Δ_merged when kept; it also checks every key and shape against the base below
        self._delta: dict[str, torch.Tensor] | None = dict(iter_merged_delta(self.merged)) if keep else None
        self.model = apply_merged_delta(
            self.merged, 0.0, torch_dtype=torch_dtype, gguf_file=gguf_file, deltas=self._deltas()
        )
        state = self.model.state_dict()
        self._base = {name: state[name].detach().clone() for name in sorted(merged_delta_index(self.merged))}
        self.lam: float | None = 0.0

    @property
    def keeps_delta(self) -> bool:
        """Whether Δ_merged is held in memory (else it is read from the shards for each λ)."""
        return self._delta is not None

    def _deltas(self):  # -> Iterable[tuple[str, Tensor]] | None
        return None if self._delta is None else self._delta.items()

    @torch.no_grad()
    def at(self, lam: float):  # -> the backbone module (a transformers PreTrainedModel)
        """The backbone with ``W_0 + lam·Δ_merged`` (the same module object every time, changed in place)."""
        from drm_lightning.merging.engine.apply import add_merged_delta

        if lam != self.lam:
            state = self.model.state_dict()
            for name, value in self._base.items():
                state[name].copy_(value.to(state[name].device))
            self.lam = None  # a failure half-way leaves no claim about the weights
            add_merged_delta(self.model, self.merged, lam, deltas=self._deltas())
            self.lam = lam
        return self.model


def merge_seconds(info: dict[str, Any]) -> float | None:
    """Wall time of the merge from ``merge.json``'s ``timings`` (its ``total``); ``None`` when not recorded."""
    total = (info.get("timings") or {}).get("total")
    return None if total is None else float(total)


def merge_label(info: dict[str, Any]) -> str:
    """The name a merged model goes by in the report: its ``label`` (e.g. ``drm_v``), else its method."""
    return str(info.get("label") or info["method"])
