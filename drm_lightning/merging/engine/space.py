"""Disk space a merge will take, told before anything is written: from safetensors headers, never the tensors.

Why: an 8B merge that fills the disk at 90 % costs an hour. ``prepare_merge`` checks that the output's filesystem
can hold the merged delta and the heads (``check_merge_space``; the estimate, ``estimate_merge_bytes``, is exact up
to the safetensors headers: float32 for every merged parameter, whatever the task vectors' dtype), and
``save_merged_model`` (``drm_lightning.export.model_folder``) that the model folder fits (``estimate_model_bytes``
from the base checkpoint's headers in the loading dtype, then the loaded model itself, ``model_bytes``). The probe is
``drm_lightning.io.disk.disk_free_bytes`` (tests replace it to simulate a small disk).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from drm_lightning.io.disk import check_free_space
from drm_lightning.io.safetensors import FLOAT_CODES, ITEMSIZE, read_header
from drm_lightning.io.shards import read_index
from drm_lightning.io.task_vector import HEAD_FILE, META_FILE
from drm_lightning.io.tokenizer_files import TOKENIZER_CORE_FILES, tokenizer_files
from drm_lightning.merging.engine.plan import MergePlan
from drm_lightning.merging.engine.reader import TaskVectorReader
from drm_lightning.models.backbone import parse_dtype
from drm_lightning.models.resolve import resolve_pretrained

#: Room for config.json, generation_config.json, special-token files and a shard index beside the weights.
CONFIG_ALLOWANCE = 16 * 1024


def _readers(task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]]) -> list[TaskVectorReader]:
    return [tv if isinstance(tv, TaskVectorReader) else TaskVectorReader(tv) for tv in task_vectors]


def heads_bytes(task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]]) -> int:
    """Bytes of the ``heads/<task>/`` copies a merged folder (and a merged model folder) holds."""
    return sum((r.folder / name).stat().st_size for r in _readers(task_vectors) for name in (HEAD_FILE, META_FILE))


def estimate_merge_bytes(
    task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]], plan: MergePlan | None = None
) -> int:
    """Bytes ``merge_task_vectors`` writes for these task vectors: Δ_merged, its index, the heads, merge.json.

    From the safetensors headers alone (no tensor, no base model is read): every parameter some task changes and
    the plan does not skip gets one float32 tensor of its full shape (LoRA pairs too: Δ_merged is dense), whatever
    dtype the task vectors store. Headers, the index and merge.json are bounded generously.
    """
    readers = _readers(task_vectors)
    plan = plan if plan is not None else MergePlan()
    shapes: dict[str, tuple[int, ...]] = {}
    for reader in readers:
        for name, shape in reader.delta_shapes().items():
            shapes.setdefault(name, shape)
    total = 0
    for name, shape in shapes.items():
        if plan.rule(name, shape, False) == "skip":
            continue
        total += math.prod(shape) * torch.float32.itemsize
        total += 2 * len(name) + 160  # its shard-header entry and its index line
    record = 16 * 1024 + sum(len(str(r.folder.resolve())) + 1024 for r in readers)
    return total + heads_bytes(readers) + record


def check_merge_space(
    task_vectors: Sequence[TaskVectorReader | str | os.PathLike[str]],
    output: str | os.PathLike[str],
    plan: MergePlan | None = None,
    *,
    copies: int = 1,
) -> int:
    """Refuse (``InsufficientSpaceError``) a merge whose output clearly will not fit; return the bytes estimated.

    Args:
        task_vectors: the inputs (folders or readers).
        output: the merged folder to be written.
        plan: the merge plan (skipped parameters take no space).
        copies: copies of Δ_merged on ``output``'s filesystem at the peak: 1 for ``merge_task_vectors`` (it writes
            once, into a temporary sibling renamed into place); 2 for a distributed merge that stages per-rank
            shards beside the output and rewrites them into it (``layout="canonical"``).
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies={copies!r}: expected a positive integer")
    readers = _readers(task_vectors)
    heads = heads_bytes(readers)
    delta = estimate_merge_bytes(readers, plan) - heads
    needed = copies * delta + heads
    check_free_space({output: needed}, "merged delta")
    return needed


def tree_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def estimate_model_bytes(
    base: str, torch_dtype: str | torch.dtype | None = None, gguf_file: str | None = None
) -> int | None:
    """Bytes ``save_pretrained`` writes for ``base`` loaded in ``torch_dtype`` (plus its tokenizer files), from the
    checkpoint's safetensors headers alone; ``None`` when that cannot be told without loading it (a hub id, a GGUF
    file, ``.bin`` weights).

    Why from headers: the merge command checks for room for the model folder before it merges, and loading an 8B
    base only to count its bytes would cost what the check is meant to save. Floating tensors take ``torch_dtype``'s
    size (the checkpoint's own when ``None``, as ``from_pretrained`` keeps it); tensors the backbone drops (a
    pooler) are counted too, so the estimate errs high by little.
    """
    dtype = parse_dtype(torch_dtype)
    path = Path(resolve_pretrained(base))
    if gguf_file is not None or not path.is_dir():
        return None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / name for name in sorted(set(read_index(index, f"{path} a model folder").values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        return None
    total = 0
    for file in files:
        for key, info in read_header(file).items():
            size = dtype.itemsize if dtype is not None and info.dtype in FLOAT_CODES else ITEMSIZE.get(info.dtype, 8)
            total += math.prod(info.shape) * size + len(key) + 96
    return total + tokenizer_bytes(base) + CONFIG_ALLOWANCE


def tokenizer_bytes(base: str) -> int:
    """Room for the tokenizer ``save_tokenizer`` writes, from the files of a local base folder (0 for a hub id)."""
    path = Path(resolve_pretrained(base))
    size = sum(file.stat().st_size for file in tokenizer_files(path, TOKENIZER_CORE_FILES))
    # Without a tokenizer.json, save_pretrained converts one (from vocab.txt or a sentencepiece model): room for it.
    return size if (path / "tokenizer.json").is_file() else 3 * size


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's ``state_dict()`` as ``save_pretrained`` writes it (a tied tensor once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size() + len(name) + 96
    return total
