"""Write a safetensors file one tensor at a time, so a task vector never has to sit in memory whole.

Why: ``safetensors.torch.save_file`` takes a dict of every tensor; converting an 8B model would hold its whole
float32 delta (twice the bf16 model) at once. The safetensors layout is an 8-byte header length, a JSON header
with each tensor's byte range, then the data back to back. The names, shapes and dtype of every tensor that may
be written are known before the first one is (``candidates``), so room for the largest possible header is reserved
first, tensors are appended as they are computed (any candidate may be left out, e.g. a zero delta), and the real
header is written into the reserved room at the end, padded with spaces (as safetensors itself pads headers).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

_CODES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


class StreamingSafetensorsWriter:
    """Append tensors to ``path``; ``close()`` writes the header. Use as a context manager.

    Args:
        path: the file to create.
        candidates: ``(name, shape, dtype)`` of every tensor that may be added, in any order.
    """

    def __init__(self, path: Path, candidates: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self.path = path
        self._allowed = {name: (tuple(shape), dtype) for name, shape, dtype in candidates}
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in candidates)
        worst = {
            name: {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [total, total]}
            for name, shape, dtype in candidates
        }
        self._reserved = len(json.dumps(worst, separators=(",", ":")).encode()) + 8
        self._reserved += -self._reserved % 8  # data starts 8-byte aligned, as safetensors writes it
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._handle: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(b"\0" * (8 + self._reserved))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name`` (a candidate, with its declared shape and dtype)."""
        if name not in self._allowed or name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} is not an unwritten candidate")
        shape, dtype = self._allowed[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, declared {shape}")
        assert self._handle is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        end = self._offset + data.nbytes
        self._entries[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [self._offset, end]}
        self._offset = end

    def written(self) -> list[str]:
        return sorted(self._entries)

    def close(self) -> None:
        """Write the header into the reserved room and close the file."""
        if self._handle is None:
            return
        header = json.dumps(dict(sorted(self._entries.items())), separators=(",", ":")).encode()
        if len(header) > self._reserved:  # cannot happen: the reservation is the worst case
            raise AssertionError(f"{self.path}: header of {len(header)} bytes exceeds the {self._reserved} reserved")
        self._handle.seek(0)
        self._handle.write(struct.pack("<Q", self._reserved))
        self._handle.write(header + b" " * (self._reserved - len(header)))
        self._handle.close()
        self._handle = None

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._handle is not None:
            self._handle.close()
            self._handle = None
