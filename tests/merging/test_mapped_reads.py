"""How the merge reads each delta: ``io.safetensors.map_tensor`` gives the same values as a positioned read for every
dtype and layout, a private mapping (writing to the tensor never touches the file), released with the tensor, and a
file truncated after its header was read is one error line, never a crash on first touch; each delta is checked for
NaN/Inf once, in the merging thread (``TaskVectorReader.check``, the methods' own pass skipped under
``inputs_checked``).
"""

from __future__ import annotations

import gc
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.io.safetensors import SafetensorsError, map_tensor, read_header, read_tensor

#: name -> tensor: every float dtype, a 0-d and an empty tensor, one large enough to span many pages.
TENSORS = {
    "f32": torch.randn(37, 5),
    "bf16": torch.randn(11, 3).bfloat16(),
    "f16": torch.randn(7).half(),
    "f64": torch.randn(2, 2, 3, dtype=torch.float64),
    "scalar": torch.tensor(1.5),
    "empty": torch.zeros(0, 4),
    "pages": torch.randn(300, 1000),
}


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path))
    return path


def _unaligned(tmp_path: Path) -> Path:
    """A file whose float32 tensor starts at an odd byte (a 1-byte header pad; safetensors itself never writes one)."""
    data = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    header = json.dumps(data).encode() + b" "
    header += b" " * ((-len(header) - 8 - 1) % 8)  # so that 8 + len(header) is odd
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + torch.arange(3, dtype=torch.float32).numpy().tobytes())
    return path


@pytest.mark.parametrize("name", list(TENSORS))
def test_a_mapped_tensor_equals_the_read_one(stored: Path, name: str) -> None:
    info = read_header(stored)[name]
    with open(stored, "rb") as f:
        mapped, read = map_tensor(f, info, name), read_tensor(f, info, name)
    assert mapped.dtype == read.dtype == TENSORS[name].dtype and mapped.shape == read.shape
    assert torch.equal(mapped, read) and torch.equal(mapped, TENSORS[name])


def test_an_unaligned_tensor_is_read_instead(tmp_path: Path) -> None:
    path = _unaligned(tmp_path)
    info = read_header(path)["x"]
    assert info.start % 4
    with open(path, "rb") as f:
        assert torch.equal(map_tensor(f, info, "x"), torch.arange(3, dtype=torch.float32))


def test_writing_to_a_mapped_tensor_leaves_the_file_as_it_was(stored: Path) -> None:
    before = stored.read_bytes()
    info = read_header(stored)["pages"]
    with open(stored, "rb") as f:
        mapped = map_tensor(f, info, "pages")
    mapped.mul_(2.0)
    assert torch.equal(mapped, TENSORS["pages"] * 2)
    assert stored.read_bytes() == before


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_the_mapping_lives_exactly_as_long_as_the_tensor(stored: Path) -> None:
    info = read_header(stored)["pages"]
    with open(stored, "rb") as f:
        mapped = map_tensor(f, info, "pages")
    assert _mapped(stored)  # the file is closed, the tensor still reads its pages
    view = mapped[10:20]
    del mapped
    gc.collect()
    assert _mapped(stored) and torch.equal(view, TENSORS["pages"][10:20])  # a view keeps it
    del view
    gc.collect()
    assert not _mapped(stored)


def test_a_file_truncated_after_its_header_was_read_is_one_error(stored: Path) -> None:
    info = read_header(stored)["pages"]
    with open(stored, "r+b") as f:
        f.truncate(info.end - 1)
        with pytest.raises(SafetensorsError, match=r"t\.safetensors: tensor 'pages': file ends before byte"):
            map_tensor(f, info, "pages")


# ------------------------------------------------------------------------------------------ checked once, where used


@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_a_delta_read_unchecked_is_checked_by_check_naming_its_file_and_key(tmp_path: Path, kind: str) -> None:
    """The merge's read-ahead thread maps deltas with ``check=False``; ``check`` (in the merging thread) then names the
    file and the key holding NaN, as ``get`` itself does."""
    from drm_lightning.io.task_vector import DELTAS_FILE, LORA_A_SUFFIX, LORA_B_SUFFIX, TaskVectorError
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors

    (tv,) = write_task_vectors(build_tiny_model(tmp_path / "base"), tmp_path / "tv", 1, kind=kind)
    path = tv / DELTAS_FILE
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    key = next(k for k in sorted(tensors) if k.endswith(LORA_A_SUFFIX if kind == "lora" else ".weight"))
    tensors[key].view(-1)[3] = math.nan
    save_file(tensors, str(path))
    name = key.removesuffix(LORA_A_SUFFIX)
    if kind == "lora":
        shape = (tensors[name + LORA_B_SUFFIX].shape[0], tensors[key].shape[1])
    else:
        shape = tuple(tensors[name].shape)
    reader = TaskVectorReader(tv)
    delta = reader.get(name, shape, check=False)  # no error yet
    with pytest.raises(
        TaskVectorError, match=rf"task_vector\.safetensors: key {re.escape(repr(key))} has 1 non-finite"
    ):
        reader.check(name, delta)
    with pytest.raises(TaskVectorError, match=re.escape(repr(key))):
        reader.get(name, shape)


def test_inside_inputs_checked_the_methods_skip_only_their_nan_pass() -> None:
    """``inputs_checked`` is the engine's promise that every delta was checked; the methods then skip their own pass
    (and nothing else: a shape mismatch is still refused)."""
    from drm_lightning.merging import functional as F
    from drm_lightning.merging.methods.inputs import inputs_checked

    bad = [torch.ones(3), torch.tensor([1.0, math.nan, 0.0])]
    with pytest.raises(ValueError, match=r"deltas\[1\] contains NaN or Inf"):
        F.task_arithmetic(bad)
    with inputs_checked():
        assert torch.isnan(F.task_arithmetic(bad)[1])
        with pytest.raises(ValueError, match=r"deltas\[1\] has shape"):
            F.task_arithmetic([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="NaN or Inf"):  # and only inside it
        F.task_arithmetic(bad)
