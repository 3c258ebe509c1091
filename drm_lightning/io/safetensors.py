"""The safetensors format, read and written by hand where ``safetensors`` itself would cost memory.

One dtype table, one header parser, one positioned tensor read, ``open_safetensors`` (``safe_open`` with errors that
name the file) and ``StreamingSafetensorsWriter`` (one file written tensor by tensor). The layout: an 8-byte
little-endian header length, a JSON header (name -> dtype code, shape, byte range relative to the data; an optional
``__metadata__``), then the data.

Why positioned reads and not ``safe_open(...).get_tensor``: that memory-maps the file, and pages touched through a
mapping count as resident memory for as long as it is open, so T open handles grow to T whole task vectors, and
re-opening per tensor instead costs a header parse each time. ``read_tensor`` reads exactly one tensor's bytes
into a fresh tensor (freed with it), each byte once; ``map_tensor`` maps exactly one tensor's pages (unmapped with
it), for the merge's deltas, read and dropped one parameter at a time.

Errors: every function raises ``error`` (``SafetensorsError`` unless the caller passes its own ``ValueError``
subclass, so a task-vector reader raises ``TaskVectorError`` and an importer ``CheckpointError``), with a message
that names the file and the tensor.

Why a streaming writer: ``safetensors.torch.save_file`` takes a dict of every tensor; converting an 8B model would
hold its whole float32 delta (twice the bf16 model) at once. The names, shapes and dtype of every tensor that may be
written are known before the first one is (``candidates``), so room for the largest possible header is reserved
first, tensors are appended as they are computed (any candidate may be left out, e.g. a zero delta), and the real
header is written into the reserved room at the end, padded with spaces (as safetensors itself pads headers).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

#: safetensors dtype code -> the torch dtype that holds it (the codes torch can hold).
DTYPES: dict[str, torch.dtype] = {
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
#: torch floating dtype -> its safetensors code (what a writer puts in the header).
CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
#: The floating codes: what a delta, or a weight that a dtype cast changes, may be stored in.
FLOAT_CODES = frozenset(CODES.values())
#: Bytes per element of every code a checkpoint's header may name (also those torch cannot hold).
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message names the file and the tensor at fault."""


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


def read_header(path: str | os.PathLike[str], *, error: type[ValueError] = SafetensorsError) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file: name -> ``TensorInfo`` (reads the header only, never the data).

    Raises:
        error: the file is missing, truncated, or its header is not safetensors (naming the file and tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} beyond the file's {size} bytes")
            meta = json.loads(f.read(length))
        if not isinstance(meta, dict):
            raise ValueError(f"the header is a JSON {type(meta).__name__}, not an object")
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise error(f"{path}: not a readable safetensors file ({err})") from None
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    for key, info in meta.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            entry = TensorInfo(path, str(info["dtype"]), tuple(int(s) for s in info["shape"]), base + begin, base + end)
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
        if entry.end > size or entry.start > entry.end:
            raise error(f"{path}: tensor {key!r} lies beyond the end of the file (truncated?)")
        out[key] = entry
    return out


def read_tensor(
    handle: BinaryIO, info: TensorInfo, name: str, *, error: type[ValueError] = SafetensorsError
) -> torch.Tensor:
    """The tensor ``info`` describes, read from the open file ``handle`` with one positioned read into a fresh CPU
    tensor of exactly its bytes (the caller opens the file once for the tensors it reads together).

    Raises:
        error: the file ends early, or the dtype is one torch cannot hold (naming the file and ``name``).
    """
    if info.dtype not in DTYPES:
        raise error(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which torch cannot hold")
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    handle.seek(info.start)
    got = handle.readinto(memoryview(raw.numpy()))
    if got != info.nbytes:
        raise error(f"{info.file}: tensor {name!r}: file ends after {got} of {info.nbytes} bytes (truncated?)")
    return raw.view(DTYPES[info.dtype]).reshape(info.shape)


def map_tensor(
    handle: BinaryIO, info: TensorInfo, name: str, *, error: type[ValueError] = SafetensorsError
) -> torch.Tensor:
    """The tensor ``info`` describes, memory-mapped from the open file ``handle``: a private (copy-on-write) mapping
    of exactly its pages, unmapped when the tensor is freed.

    Why: reading a large tensor into a fresh one faults in and zeroes new pages, then copies the file's bytes into
    them; a mapping uses the page cache's pages as they are (reading a merge's task vectors: 2-4x less time, most of
    it kernel time). Why one mapping per tensor, not one per file: pages touched through a mapping stay resident for
    as long as it lives, so a file-wide map would grow to the whole file (``read_tensor``'s reasoning); this one
    lives exactly as long as the tensor. Private: writing to the tensor copies the page, never the file. Each mapping
    holds a file descriptor while it lives, so it is for tensors used and dropped one parameter at a time (a merge's
    deltas), not for a whole model held at once. A tensor of no bytes, or one stored at an offset its dtype cannot
    be aligned to, is read with ``read_tensor`` instead.

    Raises:
        error: the file is shorter than the header says (truncated since), or a dtype torch cannot hold.
    """
    if info.dtype not in DTYPES:
        raise error(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which torch cannot hold")
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0 or info.start % dtype.itemsize:
        return read_tensor(handle, info, name, error=error)
    if os.fstat(handle.fileno()).st_size < info.end:  # mapping beyond the end would fault (SIGBUS) on first touch
        raise error(f"{info.file}: tensor {name!r}: file ends before byte {info.end} (truncated?)")
    first = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(handle.fileno(), info.end - first, offset=first, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_WILLNEED"):  # the kernel starts reading a file not in its cache now, not at first touch
        mapped.madvise(mmap.MADV_WILLNEED)
    count = info.nbytes // dtype.itemsize
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=info.start - first).reshape(info.shape)


@contextmanager
def open_safetensors(path: str | os.PathLike[str], *, error: type[ValueError] = SafetensorsError) -> Iterator[Any]:
    """``safe_open`` (CPU, torch) with an error that names the file when it is missing, truncated or not safetensors.

    For what needs ``safetensors``' own validation of the whole header, or reads a small file whole (a head).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        raise error(f"{path}: not a readable safetensors file ({err})") from None
    with handle as f:
        yield f


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
            name: {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [total, total]}
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
        self._entries[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [self._offset, end]}
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
