"""The merged delta on disk: safetensors shards under ``merged_delta/`` and their index (HF ``*.index.json``).

Why one module: ``merge_task_vectors`` and the distributed merge write this layout, ``apply_merged_delta``, the
evaluator and the report read it back; one writer and one reader keep them byte-for-byte in agreement::

    <merged>/merged_delta/delta-00001.safetensors ...   float32 Δ_merged, sharded (``io.shards.ShardWriter``)
    <merged>/merged_delta/delta.safetensors.index.json  {"metadata": {"total_size": ...}, "weight_map": {name: shard}}
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.shards import DEFAULT_MAX_SHARD_BYTES, BackgroundShardWriter, ShardWriter, index_name, read_index

MERGED_DIR = "merged_delta"
SHARD_PREFIX = "delta"
INDEX_FILE = index_name(SHARD_PREFIX)


def delta_writer(
    merged: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, background: bool = False
) -> ShardWriter:
    """The writer of ``<merged>/merged_delta/``: add Δ_merged parameter by parameter, then ``close()``.

    Args:
        background: write each full shard in a thread while the next fills (``BackgroundShardWriter``; the caller
            calls ``abort()`` if it stops before ``close()``).
    """
    cls = BackgroundShardWriter if background else ShardWriter
    return cls(Path(merged) / MERGED_DIR, max_shard_bytes, SHARD_PREFIX)


def merged_delta_index(merged: str | os.PathLike[str]) -> dict[str, Path]:
    """Parameter name -> the shard of a merged folder (``merge_task_vectors`` output) that holds its merged delta."""
    folder = Path(merged) / MERGED_DIR
    weight_map = read_index(folder / INDEX_FILE, f"{merged} a folder written by merge_task_vectors")
    return {name: folder / shard for name, shard in weight_map.items()}


def iter_merged_delta(merged: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, Δ_merged)`` from a merged folder, one shard open at a time (bounded memory)."""
    by_shard: dict[Path, list[str]] = {}
    for name, shard in merged_delta_index(merged).items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        with open_safetensors(shard) as f:
            keys = set(f.keys())
            for name in sorted(by_shard[shard]):
                if name not in keys:
                    raise ValueError(f"{shard}: key {name!r} listed in {INDEX_FILE} is missing")
                yield name, f.get_tensor(name)
