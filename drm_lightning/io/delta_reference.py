"""A dense task vector held by reference: ``W_ft − W_0`` taken from the two checkpoints when each parameter is read.

A task-vector folder (``io/task_vector.py``) whose ``task_vector.safetensors`` is replaced by ``reference.json``::

    {"format": 1, "delta_dtype": "float32", "tuned_fingerprint": "sampled1:...",
     "tensors": {"<backbone name>": {"tuned": ["/abs/expert/model.safetensors", "<key>"],
                                     "base": ["/abs/base/model.safetensors", "<key>"]}, ...}}

The delta of a name is ``tuned.to(delta_dtype) − base.to(delta_dtype)``, the arithmetic ``interop/write.py`` uses
when it writes a delta out, so both give the same bytes; an all-zero difference is a parameter the fine-tune left
unchanged, read as absent (``TaskVectorReader.get`` returns ``None``), as a written task vector leaves it out.

Why: merging fine-tuned model folders at a fixed λ (``merge`` given ``save_pretrained`` folders) wrote each expert's
float32 delta to a temporary folder and read it back once: the model's size in float32 per expert, written for
nothing (at 135 M parameters, 4 × 540 MB and most of the time the conversion took). Only the merger
(``merging/engine/reader.py``) reads this form, and only ``interop.inputs.import_inputs(by_reference=True)`` writes
it, into a temporary folder that lives as long as that merge: the files it names must not change meanwhile.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from drm_lightning.io.safetensors import DTYPES, FLOAT_CODES, TensorInfo, map_tensor, read_header
from drm_lightning.io.task_vector import TaskVectorError

REFERENCE_FILE = "reference.json"
REFERENCE_FORMAT = 1
#: The dtypes a delta may be taken in (``interop.write``: float32, float64 for a float64 base).
DELTA_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class DeltaReference:
    """Where one parameter's delta comes from: the fine-tuned and the base tensor."""

    tuned: TensorInfo
    tuned_key: str
    base: TensorInfo
    base_key: str


def write_reference(
    folder: str | os.PathLike[str],
    tensors: dict[str, tuple[Path, str, Path, str]],
    delta_dtype: torch.dtype,
    tuned_fingerprint: str,
) -> None:
    """Write ``reference.json`` into ``folder``: name -> (tuned file, key, base file, key), files made absolute, and
    the fine-tuned tensors' fingerprint (so the folder's own fingerprint, which ``merge.json`` records, says which
    weights it stands for, not only where they were)."""
    dtype = next(name for name, value in DELTA_DTYPES.items() if value == delta_dtype)
    entries = {
        name: {"tuned": [str(Path(tf).resolve()), tk], "base": [str(Path(bf).resolve()), bk]}
        for name, (tf, tk, bf, bk) in tensors.items()
    }
    data = {
        "format": REFERENCE_FORMAT,
        "delta_dtype": dtype,
        "tuned_fingerprint": tuned_fingerprint,
        "tensors": entries,
    }
    text = json.dumps(data, indent=1)
    (Path(folder) / REFERENCE_FILE).write_text(text + "\n")


def read_reference(folder: str | os.PathLike[str]) -> tuple[dict[str, DeltaReference], torch.dtype]:
    """The references of ``folder/reference.json`` and the delta dtype, every named tensor found in its file's header
    with a float dtype and the same shape in both files.

    Raises:
        TaskVectorError: a malformed file, a file or key that is not there, a non-float tensor, or two shapes that
            differ (naming ``reference.json`` and the parameter).
    """
    path = Path(folder) / REFERENCE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TaskVectorError(f"{path}: not readable as JSON ({err})") from None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(tensors, dict) or data.get("format") != REFERENCE_FORMAT:
        raise TaskVectorError(f"{path}: expected format {REFERENCE_FORMAT} with a 'tensors' object")
    if data.get("delta_dtype") not in DELTA_DTYPES:
        raise TaskVectorError(f"{path}: delta_dtype={data.get('delta_dtype')!r}, expected one of {list(DELTA_DTYPES)}")
    headers: dict[str, dict[str, TensorInfo]] = {}

    def find(name: str, side: str, entry: object) -> tuple[TensorInfo, str]:
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
            raise TaskVectorError(f"{path}: {name!r}: {side}={entry!r}, expected [file, key]")
        file, key = entry
        if file not in headers:
            headers[file] = read_header(file, error=TaskVectorError)
        info = headers[file].get(key)
        if info is None:
            raise TaskVectorError(f"{file}: no tensor {key!r} (the {side} weight of {name!r} in {path})")
        if info.dtype not in FLOAT_CODES or info.dtype not in DTYPES:
            raise TaskVectorError(f"{file}: tensor {key!r} has dtype {info.dtype}, expected a float dtype")
        return info, key

    out = {}
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise TaskVectorError(f"{path}: {name!r}: expected {{'tuned': [file, key], 'base': [file, key]}}")
        tuned, tuned_key = find(name, "tuned", entry.get("tuned"))
        base, base_key = find(name, "base", entry.get("base"))
        if tuned.shape != base.shape:
            raise TaskVectorError(
                f"{path}: {name!r}: the fine-tuned tensor has shape {list(tuned.shape)}, the base's {list(base.shape)}"
            )
        out[name] = DeltaReference(tuned, tuned_key, base, base_key)
    return out, DELTA_DTYPES[data["delta_dtype"]]


def take_delta(ref: DeltaReference, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """``(tuned − base in dtype, finite)`` of one reference, both tensors mapped from their files
    (``map_tensor``); the delta is ``None`` where it is zero everywhere (and finite).

    Raises:
        TaskVectorError: a file shorter than its header says (changed since the reference was written).
    """
    return subtract(*map_pair(ref), dtype)


def map_pair(ref: DeltaReference) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-tuned and the base tensor of ``ref``, mapped from their files (``map_tensor``; the kernel starts
    reading them), no arithmetic: a read-ahead thread maps, the merging thread subtracts (``subtract``).

    Raises:
        TaskVectorError: a file shorter than its header says (changed since the reference was written).
    """
    with open(ref.tuned.file, "rb") as f:
        tuned = map_tensor(f, ref.tuned, ref.tuned_key, error=TaskVectorError)
    with open(ref.base.file, "rb") as f:
        base = map_tensor(f, ref.base, ref.base_key, error=TaskVectorError)
    return tuned, base


def subtract(tuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """``(tuned − base in dtype, finite)``; the delta is ``None`` where it is zero everywhere (and finite)."""
    delta = tuned.to(dtype) - base.to(dtype)
    del tuned, base
    finite, nonzero = finite_nonzero(delta)
    return (delta if nonzero or not finite else None), finite


def finite_nonzero(delta: torch.Tensor) -> tuple[bool, bool]:
    """Whether every entry of ``delta`` is finite, and whether one is not zero, from one ``aminmax`` pass.

    Why: ``isfinite(delta).all()`` and ``delta.any()`` made a boolean copy and read the tensor twice, about half of
    a conversion's arithmetic; the minimum and maximum say both (NaN propagates into them, ±Inf is one of them).
    """
    if delta.numel() == 0:
        return True, False
    low, high = (float(v) for v in torch.aminmax(delta))
    return math.isfinite(low) and math.isfinite(high), low != 0.0 or high != 0.0
