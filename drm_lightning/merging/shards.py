"""The merged delta on disk: safetensors shards under ``merged_delta/`` and their index (HF ``*.index.json``).

Why one module: ``merge_task_vectors`` and the distributed merge write this layout, ``apply_merged_delta``, the
evaluator and the report read it back; one writer and one reader keep them byte-for-byte in agreement::

    <merged>/merged_delta/delta-00001.safetensors ...   float32 Δ_merged, sharded
    <merged>/merged_delta/delta.safetensors.index.json  {"metadata": {"total_size": ...}, "weight_map": {name: shard}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from drm_lightning.task_vectors.format import open_safetensors

MERGED_DIR = "merged_delta"
INDEX_FILE = "delta.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 500 * 1000**2


def check_max_shard_bytes(max_shard_bytes: int) -> None:
    """Reject a shard size that is not a positive integer (bools too) before any file is read or written."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: expected a positive number of bytes")


class ShardWriter:
    """Append tensors to safetensors shards under ``folder``, flushing each shard as soon as it holds
    ``max_shard_bytes``; ``close`` writes the index. Memory: at most one shard's tensors.

    Args:
        folder: created if missing.
        max_shard_bytes: flush threshold (a single larger tensor gets a shard of its own).
        prefix: shard file prefix; distinct per rank when several processes write into one folder.
    """

    def __init__(
        self, folder: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, prefix: str = "delta"
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self.prefix = prefix
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._pending:
            raise ValueError(f"ShardWriter: tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_size += nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending tensors as the next shard and drop them from memory."""
        if not self._pending:
            return
        self._shards += 1
        filename = f"{self.prefix}-{self._shards:05d}.safetensors"
        save_file(self._pending, str(self.folder / filename), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self._pending, filename))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> dict[str, str]:
        """Flush and write ``INDEX_FILE``; return the weight map (name -> shard file)."""
        self.flush()
        write_index(self.folder, self.weight_map, self.total_size)
        return dict(self.weight_map)


def write_index(folder: str | os.PathLike[str], weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write the shard index (HF ``*.safetensors.index.json`` layout, keys sorted for byte-identical output)."""
    path = Path(folder) / INDEX_FILE
    data = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def iter_merged_delta(merged: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, Δ_merged)`` from a merged folder, one shard open at a time (bounded memory)."""
    folder = Path(merged) / MERGED_DIR
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ValueError(f"{index_path}: not found (is {merged} a folder written by merge_task_vectors?)")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path}: not a shard index ({err!r})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if Path(shard).name != shard:
            raise ValueError(f"{index_path}: shard {shard!r} of {name!r} is not a plain file name")
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        with open_safetensors(folder / shard) as f:
            keys = set(f.keys())
            for name in sorted(by_shard[shard]):
                if name not in keys:
                    raise ValueError(f"{folder / shard}: key {name!r} listed in {INDEX_FILE} is missing")
                yield name, f.get_tensor(name)


def merged_delta_index(merged: str | os.PathLike[str]) -> dict[str, Path]:
    """Parameter name -> the shard of a merged folder (``merge_task_vectors`` output) that holds its merged delta."""
    folder = Path(merged)
    index_path = folder / MERGED_DIR / INDEX_FILE
    if not index_path.is_file():
        raise ValueError(f"{index_path}: not found (is {folder} a folder written by merge_task_vectors?)")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path}: not a shard index ({err!r})") from None
    return {str(name): folder / MERGED_DIR / Path(str(shard)).name for name, shard in weight_map.items()}
