"""The input statistics of a task vector: each linear layer's input Gram, what RegMean weighs the deltas by.

Written beside the deltas, in the task vector's folder (``format.py``)::

    <folder>/
      statistics.safetensors   <weight name> -> float32 [in, in]: Σ_x x xᵀ over the layer's input rows x
      meta.json                "statistics": {"file", "kind", "examples", "rows": {<weight name>: count}}

The key is the linear layer's *weight* name in the backbone's ``state_dict()`` (the name its delta has), e.g.
``encoder.layer.0.attention.self.query.weight``; the Gram is of that layer's input, recorded with the fine-tuned
expert running (LoRA experts: the input of the base layer, which is the adapted layer's input too). ``rows`` counts
the input rows summed into each Gram (every non-padding token of every example, or one row per example for a
pooler), ``examples`` the training examples. The safetensors header's ``__metadata__`` repeats the task and the base
fingerprint (``RECORDED_FOR``), so a statistics file copied in from another expert's folder is caught
(``read_statistics_meta``).

Why the raw sum and its row count rather than the mean: the sum is what a recorder can add up over batches and
ranks (one all-reduce), and the count lets the merge take the per-row mean ``G = Σ x xᵀ / rows`` that RegMean's
authors (and FusionBench) weigh the tasks by. Size: ``in² · 4`` bytes per layer, e.g. 0.82 GB for one
Llama-3.1-8B ``down_proj`` (14336²) per task (docs/methods.md, RegMean).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from drm_lightning.io.disk import check_free_space
from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import META_FILE, TaskVectorError, TaskVectorMeta, read_meta, write_task_vector

STATISTICS_FILE = "statistics.safetensors"
STATISTICS_KIND = "input_gram"
#: Training examples per task that the recorder runs by default: FusionBench's ``num_regmean_examples``.
DEFAULT_EXAMPLES = 256
#: The command that adds statistics to a task vector made elsewhere, for error messages.
STATISTICS_COMMAND = "drm-lightning statistics --task_vector {folder} --task configs/task/<task>.yaml"


@dataclass(frozen=True)
class StatisticsMeta:
    """``meta.json["statistics"]``: which file, how many examples, and the row count of each layer's Gram."""

    file: str
    kind: str
    examples: int
    rows: dict[str, int]

    @classmethod
    def from_dict(cls, data: Any, source: str) -> StatisticsMeta:
        if not isinstance(data, Mapping):
            raise TaskVectorError(f"{source}: statistics={data!r}, expected an object")
        missing = [k for k in ("file", "kind", "examples", "rows") if k not in data]
        if missing:
            raise TaskVectorError(f"{source}: statistics lacks key(s) {missing}")
        unknown = sorted(set(data) - {"file", "kind", "examples", "rows"})
        if unknown:
            raise TaskVectorError(f"{source}: statistics has unknown key(s) {unknown}")
        if data["file"] != STATISTICS_FILE:
            raise TaskVectorError(f"{source}: statistics.file={data['file']!r}, expected {STATISTICS_FILE!r}")
        if data["kind"] != STATISTICS_KIND:
            raise TaskVectorError(f"{source}: statistics.kind={data['kind']!r}, expected {STATISTICS_KIND!r}")
        examples, rows = data["examples"], data["rows"]
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise TaskVectorError(f"{source}: statistics.examples={examples!r}, expected a positive integer")
        if not isinstance(rows, Mapping) or not rows:
            raise TaskVectorError(f"{source}: statistics.rows={rows!r}, expected a non-empty {{layer: count}} object")
        for name, count in rows.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise TaskVectorError(f"{source}: statistics.rows[{name!r}]={count!r}, expected a positive integer")
        return cls(str(data["file"]), str(data["kind"]), int(examples), {str(k): int(v) for k, v in rows.items()})


def statistics_meta(meta: TaskVectorMeta, folder: str | os.PathLike[str]) -> StatisticsMeta | None:
    """The statistics section of a task vector's meta.json, validated, or ``None`` when it has none."""
    if meta.statistics is None:
        return None
    return StatisticsMeta.from_dict(meta.statistics, str(Path(folder) / META_FILE))


def missing_statistics_message(folder: str | os.PathLike[str], method: str) -> str:
    """The one line for a task vector without statistics merged by a method that needs them."""
    return (
        f"{Path(folder) / META_FILE}: no input statistics, which {method} needs; add them with "
        f"`{STATISTICS_COMMAND.format(folder=folder)}` (experts fitted here record them when fitting ends)"
    )


RECORDED_FOR = "recorded_for"
"""The one ``__metadata__`` key of a statistics file: JSON of the task and base fingerprint it was recorded for.
One key, not two: safetensors keeps ``__metadata__`` in a hash map, so two keys come out in an order that changes
from process to process, and the same Grams would not be the same bytes."""


def read_statistics_meta(folder: str | os.PathLike[str], meta: TaskVectorMeta) -> StatisticsMeta:
    """Check a task vector's statistics file against its meta.json without reading a Gram.

    Raises:
        TaskVectorError: no statistics section; the file is missing or not safetensors; its keys differ from
            ``rows``; a Gram that is not a square float32 matrix; or its ``__metadata__`` names another task or base
            (a file copied in from another expert).
    """
    folder = Path(folder)
    stats = statistics_meta(meta, folder)
    if stats is None:
        raise TaskVectorError(f"{folder / META_FILE}: no statistics section")
    path = folder / stats.file
    with open_safetensors(path) as f:
        keys = set(f.keys())
        header = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    if keys != set(stats.rows):
        extra, lacking = sorted(keys - set(stats.rows)), sorted(set(stats.rows) - keys)
        raise TaskVectorError(
            f"{path}: layers differ from meta.json's statistics.rows (only in the file: {extra[:3]}, only in "
            f"meta.json: {lacking[:3]})"
        )
    for key in sorted(keys):
        shape = shapes[key]
        if len(shape) != 2 or shape[0] != shape[1] or dtypes[key] != "F32":
            raise TaskVectorError(f"{path}: key {key!r} has shape {list(shape)} {dtypes[key]}, expected [in, in] F32")
    try:
        recorded = json.loads(header.get(RECORDED_FOR, "{}"))
    except json.JSONDecodeError:
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}
    for field, expected in (("task", meta.task), ("base_fingerprint", meta.base_fingerprint)):
        if recorded.get(field) != expected:
            raise TaskVectorError(
                f"{path}: recorded for {field}={recorded.get(field)!r}, but this task vector's meta.json has "
                f"{expected!r}: statistics from another expert or base; record them again with "
                f"`{STATISTICS_COMMAND.format(folder=folder)}`"
            )
    return stats


def gram_bytes(widths: Mapping[str, int]) -> int:
    """Bytes of one task's float32 Grams for layers of these input widths (weight name -> ``in``): ``Σ in² · 4``,
    what a recording will weigh before it runs (the file adds a small header, ``statistics_bytes``)."""
    for name, width in widths.items():
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{name}: input width {width!r}, expected a positive integer")
    return sum(4 * width * width for width in widths.values())


def statistics_bytes(grams: Mapping[str, torch.Tensor]) -> int:
    """Bytes ``statistics.safetensors`` will take: float32 Grams plus a header allowance."""
    if not grams:
        return 0
    return sum(g.numel() * 4 for g in grams.values()) + sum(len(k) + 96 for k in grams) + 256


def save_statistics(path: str | os.PathLike[str], grams: Mapping[str, torch.Tensor], meta: TaskVectorMeta) -> None:
    """Write the float32 Grams to ``path`` (a statistics file), with the task and base fingerprint in its header."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in grams.items()}
    recorded = json.dumps({"base_fingerprint": meta.base_fingerprint, "task": meta.task}, sort_keys=True)
    save_file(tensors, str(path), metadata={RECORDED_FOR: recorded})


def write_task_vector_with_statistics(
    folder: str | os.PathLike[str],
    deltas: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    meta: TaskVectorMeta,
    grams: Mapping[str, torch.Tensor],
) -> Path:
    """``write_task_vector`` with the input Grams beside the deltas, in the same atomic folder; ``meta.statistics``
    (``statistics_section``) must describe them."""
    stats = statistics_meta(meta, folder)
    if stats is None:
        raise ValueError(f"task {meta.task!r}: statistics and meta.statistics must be given together")
    if set(stats.rows) != set(grams):
        raise ValueError(f"task {meta.task!r}: meta.statistics.rows name other layers than the Grams given")
    return write_task_vector(
        folder, deltas, head, meta, extra=lambda tmp: save_statistics(tmp / stats.file, grams, meta),
        extra_bytes=statistics_bytes(grams),
    )  # fmt: skip


def statistics_section(grams: Mapping[str, torch.Tensor], rows: Mapping[str, int], examples: int) -> dict[str, Any]:
    """The ``meta.json["statistics"]`` section for these Grams (validated like one read back)."""
    if set(grams) != set(rows):
        raise ValueError(f"statistics: Gram layers {sorted(grams)[:3]} differ from the row counts {sorted(rows)[:3]}")
    section = {"file": STATISTICS_FILE, "kind": STATISTICS_KIND, "examples": int(examples), "rows": dict(rows)}
    return asdict(StatisticsMeta.from_dict(section, "statistics"))


def add_statistics(
    folder: str | os.PathLike[str], grams: Mapping[str, torch.Tensor], rows: Mapping[str, int], examples: int
) -> Path:
    """Add (or replace) the statistics of an existing task vector folder.

    Both files are written under temporary names first, then renamed into place, the statistics file before
    meta.json: a file is never seen half-written, and a crash between the two renames leaves meta.json's old
    section, which ``read_statistics_meta`` checks against the file. Refused up front when the folder's filesystem
    lacks the room.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    section = statistics_section(grams, rows, examples)
    check_free_space({folder: statistics_bytes(grams)}, f"statistics of task {meta.task!r}")
    updated = TaskVectorMeta.from_dict({**json.loads(meta.to_json()), "statistics": section}, str(folder / META_FILE))
    fd, tmp_stats = tempfile.mkstemp(prefix=f".{STATISTICS_FILE}.", dir=folder)
    os.close(fd)
    fd, tmp_meta = tempfile.mkstemp(prefix=f".{META_FILE}.", dir=folder)
    os.close(fd)
    try:
        save_statistics(tmp_stats, grams, meta)
        Path(tmp_meta).write_text(updated.to_json())
        os.replace(tmp_stats, folder / STATISTICS_FILE)
        os.replace(tmp_meta, folder / META_FILE)
    finally:
        for tmp in (tmp_stats, tmp_meta):
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder
