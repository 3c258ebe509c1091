"""A ``save_pretrained`` folder read lazily: its config and the tensors of its safetensors shards, one at a time.

Why lazy: converting a fine-tuned 8B model into a task vector must not hold it next to its base. Only the headers
of the shards are parsed up front (names, dtypes, shapes, byte ranges; ``model.safetensors.index.json`` or a single
``model.safetensors`` / ``adapter_model.safetensors``); each tensor is then read with one positioned read into a
fresh tensor, not through a memory map (whose touched pages stay resident while the file is open, see
``merging/reader.py``).

Only safetensors is read: a folder with ``pytorch_model.bin`` alone is refused (a pickle is code). A hub id is
resolved through the local Hugging Face cache only (``local_files_only``), never the network.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drm_lightning.models.resolve import resolve_pretrained

_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})


class CheckpointError(ValueError):
    """A model or adapter folder that cannot be converted; the message names the folder and the value at fault."""


def local_folder(name: str | os.PathLike[str]) -> Path:
    """A local folder for ``name``: a folder as is, ``package://...`` through its package, a hub id from the cache.

    Raises:
        CheckpointError: nothing local under that name (the hub is never asked).
    """
    text = os.fspath(name)
    resolved = Path(resolve_pretrained(text))
    if resolved.is_dir():
        return resolved
    if resolved.exists():
        raise CheckpointError(f"{text}: is a file, expected a save_pretrained folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises several types for "not cached" / "bad id"
        raise CheckpointError(
            f"{text}: not a local folder and not in the local Hugging Face cache ({type(err).__name__}); "
            "nothing is downloaded: give a folder, or fetch it once on a machine with network access"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype code, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFolder:
    """The tensors of a folder's safetensors file(s), by name, read one at a time.

    Args:
        folder: a local folder.
        stem: ``"model"`` (``model.safetensors`` or ``model.safetensors.index.json`` and its shards) or
            ``"adapter_model"`` (PEFT).

    Raises:
        CheckpointError: no safetensors weights (a ``.bin`` only is named as refused), an index naming a shard
            that is missing, or a file whose header is not safetensors.
    """

    def __init__(self, folder: Path, stem: str = "model") -> None:
        self.folder = folder
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted({str(v) for v in weight_map.values()})
        elif single.is_file():
            files = [single.name]
        else:
            pickles = sorted(p.name for p in folder.glob(f"{'pytorch_model' if stem == 'model' else stem}*.bin"))
            found = f" (found {pickles}: pickles are not loaded; save with safe_serialization)" if pickles else ""
            raise CheckpointError(f"{folder}: no {single.name} or {index.name}{found}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = folder / name
            if Path(name).name != name or not path.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is not a file in {folder}")
            for key, info in _header(path).items():
                if key in self.tensors:
                    raise CheckpointError(f"{path}: tensor {key!r} is also in {self.tensors[key].file.name}")
                self.tensors[key] = info

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def dtype_codes(self) -> set[str]:
        return {info.dtype for info in self.tensors.values()}

    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (a fresh CPU tensor of exactly its bytes)."""
        info = self.tensors[name]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as handle:
            handle.seek(info.start)
            got = handle.readinto(memoryview(raw.numpy()))
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {name!r}: file ends after {got} of {info.nbytes} bytes")
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which torch cannot hold")
        return raw.view(_DTYPES[info.dtype]).reshape(info.shape)

    def iter_read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.read(name)


def _header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header; errors name the file (missing, truncated, not safetensors)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} beyond the file's {size} bytes")
            meta = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    for key, info in meta.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            entry = TensorInfo(path, str(info["dtype"]), tuple(int(s) for s in info["shape"]), base + begin, base + end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
        if entry.end > size or entry.start > entry.end:
            raise CheckpointError(f"{path}: tensor {key!r} lies beyond the end of the file (truncated?)")
        out[key] = entry
    return out
