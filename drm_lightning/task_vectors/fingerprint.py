"""Base-model fingerprints: which weights a task vector was taken against, cheap enough for a 16 GB base.

Why a fingerprint at all: deltas added onto another base (another model, revision or dtype) merge silently into
garbage. Why cheap: every ``merge``, ``evaluate`` and task-vector write checks one, and a SHA-256 of every byte of
an 8B model costs tens of seconds each time.

Schemes (the recorded string says which):

- ``"sampled1:<sha256 hex>"`` (written now): SHA-256 over, for every ``state_dict()`` entry in sorted order, its
  name, dtype and shape and the raw bytes of a fixed sample of its values: the first and last ``EDGE`` entries
  and ``STRIDED`` entries evenly spaced over the whole tensor (in the tensor's logical row-major order, so a
  transposed view and its contiguous copy agree). Cost: O(number of tensors · 4,608 values), milliseconds for an
  8B model, whatever its size on disk.
- a bare 64-digit hex string (task vectors written before ``sampled1``): SHA-256 of every byte of every tensor.
  Still verified exactly that way, so old task vectors load unchanged (slowly for a big base).

What ``sampled1`` detects: another architecture, size, parameter name, shape or dtype (bfloat16 vs float32 as
loaded); any other checkpoint of the same architecture (another pretrained model, a fine-tuned one, another
revision: training changes essentially every entry of every tensor, so the sampled ones). What it does not detect:
a change confined to entries outside the sample, for example a few re-initialised rows of an embedding table or a
single edited value; for a tensor of n entries a change to k random entries escapes with probability about
(1 - 4608/n)^k. It is a guard against mixing up models, not a tamper check.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

SCHEME = "sampled1"
#: Entries hashed at each end of every tensor.
EDGE = 256
#: Entries hashed evenly spaced over every tensor.
STRIDED = 4096
_LEGACY = re.compile(r"[0-9a-f]{64}")


def fingerprint(module: torch.nn.Module) -> str:
    """The current-scheme fingerprint (``"sampled1:..."``) of a module's ``state_dict()``."""
    return fingerprint_state(module.state_dict())


def fingerprint_state(state: Mapping[str, torch.Tensor], scheme: str = SCHEME) -> str:
    """Fingerprint of a plain ``name -> tensor`` mapping under ``scheme`` (``"sampled1"`` or ``"full"``)."""
    if scheme == SCHEME:
        return f"{SCHEME}:{_digest(state, _sample)}"
    if scheme == "full":
        return _digest(state, _all_bytes)
    raise ValueError(f"fingerprint scheme={scheme!r}: expected {SCHEME!r} or 'full'")


def scheme_of(recorded: str) -> str:
    """``"sampled1"`` or ``"full"`` (a bare 64-digit hex digest, the pre-``sampled1`` scheme).

    Raises:
        ValueError: ``recorded`` follows neither scheme (names the value).
    """
    if recorded.startswith(f"{SCHEME}:"):
        return SCHEME
    if _LEGACY.fullmatch(recorded):
        return "full"
    raise ValueError(f"base_fingerprint={recorded!r}: expected '{SCHEME}:<sha256 hex>' or a 64-digit hex digest")


def fingerprint_matches(weights: torch.nn.Module | Mapping[str, torch.Tensor], recorded: str) -> bool:
    """Whether ``weights`` (a module or a state mapping) have the fingerprint ``recorded``, under its own scheme."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    try:
        scheme = scheme_of(recorded)
    except ValueError:
        return False
    return fingerprint_state(state, scheme) == recorded


def _digest(state: Mapping[str, torch.Tensor], values) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(str(tensor.dtype).encode())
        digest.update(b"\0")
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(b"\0")
        digest.update(values(tensor))
    return digest.hexdigest()


def _all_bytes(tensor: torch.Tensor) -> memoryview:
    return tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data


def _sample(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of the sampled entries (all of them for a tensor of at most ``2·EDGE + STRIDED`` entries)."""
    flat = tensor.reshape(-1)  # a view when contiguous; a copy only for a non-contiguous tensor
    n = flat.numel()
    if n <= 2 * EDGE + STRIDED:
        picked = flat
    else:
        strided = torch.arange(STRIDED, dtype=torch.int64, device=flat.device) * (n - 1) // (STRIDED - 1)
        ends = torch.cat([torch.arange(EDGE, device=flat.device), torch.arange(n - EDGE, n, device=flat.device)])
        picked = flat.index_select(0, torch.cat([ends, strided]))  # not flat[idx]: 100x slower on CPU
    return picked.to("cpu").contiguous().view(torch.uint8).numpy().data


def short_fingerprint(recorded: str) -> str:
    """``"sampled1:0123456789ab..."``: a fingerprint shortened for messages, its scheme kept."""
    scheme, _, digest = recorded.rpartition(":")
    return f"{scheme + ':' if scheme else ''}{digest[:12]}..."


#: Bytes hashed of a task-vector file: all of a small one; of a large one, its first and last ``_FILE_EDGE`` bytes and
#: ``_FILE_BLOCKS`` blocks of ``_FILE_BLOCK`` bytes evenly spaced in between (with its size and name).
_FILE_EDGE = 1 << 20
_FILE_BLOCK = 4096
_FILE_BLOCKS = 256


def task_vector_fingerprint(folder: str | os.PathLike[str]) -> str:
    """``"files1:<sha256 hex>"`` of a task-vector folder: which task vector a merge holds (``merge.json`` records it).

    SHA-256 over every file of the folder (sorted by name; hidden temporaries left out): its name and size, and its
    bytes (a file over 2 MiB: its first and last MiB and 256 blocks of 4 KiB spread over the rest). A refit changes
    essentially every byte, so any of these; milliseconds for a task vector of any size.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 * _FILE_EDGE:
                digest.update(f.read())
                continue
            digest.update(f.read(_FILE_EDGE))
            step = (size - 2 * _FILE_EDGE) // _FILE_BLOCKS
            for i in range(_FILE_BLOCKS):
                f.seek(_FILE_EDGE + i * step)
                digest.update(f.read(min(_FILE_BLOCK, step)))
            f.seek(size - _FILE_EDGE)
            digest.update(f.read())
    return f"files1:{digest.hexdigest()}"
