"""Safetensors shards written as they fill, and their index (Hugging Face ``<prefix>.safetensors.index.json``).

Why: a merged 8B model is tens of gigabytes; ``ShardWriter`` holds at most one shard's tensors and writes each shard
with ``safetensors.torch.save_file`` as soon as it is full, then the index that names every tensor's shard::

    <folder>/<prefix>-00001.safetensors ...          the tensors in the order they were added
    <folder>/<prefix>.safetensors.index.json         {"metadata": {"total_size": ...}, "weight_map": {name: shard}}

``BackgroundShardWriter`` writes each full shard in a thread of its own while the next one fills (``io.background``):
the same files, at most two shards in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from drm_lightning.io.background import Worker

DEFAULT_MAX_SHARD_BYTES = 500 * 1000**2


def index_name(prefix: str) -> str:
    """The index file of shards named ``<prefix>-NNNNN.safetensors`` (``model`` -> ``model.safetensors.index.json``)."""
    return f"{prefix}.safetensors.index.json"


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
        prefix: shard file prefix (``<prefix>-00001.safetensors``, index ``index_name(prefix)``); distinct per rank
            when several processes write into one folder.
    """

    def __init__(
        self, folder: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, prefix: str = "model"
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
        self._save(self._pending, self.folder / filename)
        self.weight_map.update(dict.fromkeys(self._pending, filename))
        self._pending = {}
        self._pending_bytes = 0

    def _save(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})

    def _wait(self) -> None:
        """Every shard flushed so far is on disk (a no-op here: ``flush`` wrote it)."""

    def close(self) -> dict[str, str]:
        """Flush and write the index; return the weight map (name -> shard file)."""
        self.flush()
        self._wait()
        write_index(self.folder / index_name(self.prefix), self.weight_map, self.total_size)
        return dict(self.weight_map)

    def abort(self) -> None:
        """Give up: nothing more is written (the caller removes the folder). Safe to call after ``close``."""
        self._pending = {}


class BackgroundShardWriter(ShardWriter):
    """A ``ShardWriter`` whose full shards are written by one thread while the next fills: the same files.

    Memory: at most two shards' tensors (one being written, one filling). A failed write (a full disk) is raised
    at the next flush or at ``close``. A caller that stops early must call ``abort`` before it removes the folder,
    so that no shard is written into it afterwards.
    """

    def __init__(
        self, folder: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, prefix: str = "model"
    ) -> None:
        super().__init__(folder, max_shard_bytes, prefix)
        self._worker = Worker(f"drm-lightning-write-{prefix}")

    def _save(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self._worker.submit(lambda: save_file(tensors, str(path), metadata={"format": "pt"}))

    def _wait(self) -> None:
        self._worker.finish()

    def abort(self) -> None:
        super().abort()
        self._worker.abort()


def write_index(path: str | os.PathLike[str], weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write the shard index ``path`` (HF ``*.safetensors.index.json`` layout; keys sorted: byte-identical output)."""
    path = Path(path)
    data = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_index(path: str | os.PathLike[str], what: str) -> dict[str, str]:
    """The ``weight_map`` of the shard index ``path`` (name -> shard file name, a plain name in its folder).

    Args:
        what: the folder the index belongs to, for the "not found" message.

    Raises:
        ValueError: no index, not a shard index, or a shard that is not a plain file name.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {what}?)")
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        items = {str(name): str(shard) for name, shard in weight_map.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a shard index ({err!r})") from None
    for name, shard in items.items():
        if Path(shard).name != shard:
            raise ValueError(f"{path}: shard {shard!r} of {name!r} is not a plain file name")
    return items
