"""A ``save_pretrained`` folder read lazily: its config and the tensors of its safetensors shards, one at a time.

Why lazy: converting a fine-tuned 8B model into a task vector must not hold it next to its base. Only the headers
of the shards are parsed up front (names, dtypes, shapes, byte ranges; ``model.safetensors.index.json`` or a single
``model.safetensors`` / ``adapter_model.safetensors``); each tensor is then read with one positioned read into a
fresh tensor, not through a memory map (``io.safetensors``: one header parser and positioned read for every
reader).

Only safetensors is read: a folder with ``pytorch_model.bin`` alone is refused (a pickle is code). A hub id is
resolved through the local Hugging Face cache only (``local_files_only``), never the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from drm_lightning.io.json_file import read_json_object
from drm_lightning.io.safetensors import TensorInfo, map_tensor, read_header, read_tensor
from drm_lightning.models.resolve import resolve_pretrained


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
            weight_map = read_json_object(index, error=CheckpointError).get("weight_map")
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
            for key, info in read_header(path, error=CheckpointError).items():
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
        with open(info.file, "rb") as handle:
            return read_tensor(handle, info, name, error=CheckpointError)

    def map(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored, mapped from its file rather than copied (``io.safetensors.map_tensor``): for a
        tensor read, used and dropped (a conversion's fine-tuned weights), not for a whole model held at once."""
        info = self.tensors[name]
        with open(info.file, "rb") as handle:
            return map_tensor(handle, info, name, error=CheckpointError)

    def iter_read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.read(name)
