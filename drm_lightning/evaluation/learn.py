"""Learn merging coefficients for one merged folder and write the learned model's delta beside it.

``learn_coefficients(merged, lam, task_vectors, datamodules, settings, output)``:

1. checks, before anything is loaded, that every task has a head to score it with (one line naming the folder);
2. loads the base once (fingerprint checked against ``merge.json``) and puts every task's head on it;
3. reads the deltas of the chosen form (``coefficients.read_merged_stacks`` / ``read_task_stacks``), every
   coefficient starting at ``settings.init`` or the chosen ``lam``;
4. ``Trainer.fit`` of a ``CoefficientModule`` (CPU here; GPU or DDP through the Trainer arguments);
5. writes ``output`` atomically: ``merged_delta/`` holding ``Δ_learned = Σ_k λ_{g,k}·D_k`` per parameter, so that
   ``W_0 + 1·Δ_learned`` is the learned model and every reader of merged folders (``MergedBackbone``,
   ``apply_merged_delta``, the PEFT adapter export) takes it as it is at λ = 1; ``merge.json`` (the method's record
   plus a ``learned`` block); ``heads/``; ``coefficients.json`` (the matrix, its rows and columns, the settings and
   what data it was learned on); and ``coefficients.png``, the heatmap group × column.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule
from typing_extensions import override

from drm_lightning.evaluation.coefficients import (
    CoefficientLayout,
    LearnSettings,
    combine,
    read_merged_stacks,
    read_task_stacks,
)

COEFFICIENTS_JSON = "coefficients.json"
COEFFICIENTS_PNG = "coefficients.png"
LEARNED_DIR = "learned"
#: Trainer arguments a caller's evaluation settings may pass on to the coefficient fit.
TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision", "strategy")


def learn_coefficients(
    merged: str | os.PathLike[str],
    lam: float,
    task_vectors: Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    settings: LearnSettings | Mapping[str, Any],
    output: str | os.PathLike[str],
    trainer_kwargs: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Learn the coefficients of ``settings`` on top of ``merged`` at ``lam``; write the learned folder ``output``.

    Args:
        merged: a merged folder (``merge_task_vectors`` output).
        lam: the method's chosen λ: every coefficient starts there unless ``settings.init`` says otherwise.
        task_vectors: the merge's task vector folders (their heads score the merged model).
        datamodules: task -> datamodule.
        settings: a ``LearnSettings`` or its mapping (a recipe's ``learn`` block).
        output: the learned folder to write (replaced atomically).
        trainer_kwargs: ``Trainer`` arguments (``accelerator``, ``devices``, ``precision``, ``strategy``, ...).
        plots: draw ``coefficients.png`` (skipped without matplotlib).

    Returns:
        the ``learned`` block of ``merge.json``: settings, what data was used, steps, seconds, loss before/after,
        coefficient range.

    Raises:
        TaskVectorError: a task without a head (naming its folder); nothing is written.
        ValueError: bad settings, a form the method has no per-task terms for, a task without a datamodule.
    """
    from lightning.pytorch import Trainer, seed_everything

    from drm_lightning.evaluation.coefficient_module import CoefficientModule
    from drm_lightning.evaluation.multitask import check_heads
    from drm_lightning.io.merged_delta import MERGED_DIR, iter_merged_delta
    from drm_lightning.io.task_vector import read_meta
    from drm_lightning.merging.engine.apply import apply_merged_delta
    from drm_lightning.merging.engine.record import read_merge_record
    from drm_lightning.models.expert import ExpertModule

    settings = LearnSettings.parse(settings)
    merged, output = Path(merged), Path(output)
    folders = [Path(f) for f in task_vectors]
    metas = [read_meta(f) for f in folders]
    check_heads(folders, metas)  # a task without a head: one line naming its folder, before any work
    tasks = [m.task for m in metas]
    missing = [t for t in tasks if t not in datamodules]
    if missing:
        raise ValueError(f"datamodules: no datamodule for task(s) {missing} (have {sorted(datamodules)})")
    record = read_merge_record(merged)
    init = float(lam if settings.init is None else settings.init)
    if not math.isfinite(init):
        raise ValueError(f"lam={lam!r}: expected a finite initial coefficient")

    t0 = time.perf_counter()
    if settings.form == "task":
        stacks, columns = read_task_stacks(merged, record, folders, settings.include), tasks
    else:
        stacks, columns = read_merged_stacks(merged, settings.include), ["merged"]
    if not stacks:
        raise ValueError(f"learn.include={settings.include!r}: matches no parameter of {merged / MERGED_DIR}")
    layout = CoefficientLayout.build(list(stacks), settings.granularity, columns)
    # the base (fingerprint checked against merge.json), with the parameters not learned at the initial coefficient
    fixed = ((n, d) for n, d in iter_merged_delta(merged) if n not in stacks)
    backbone = apply_merged_delta(merged, init, deltas=fixed)
    experts = {
        meta.task: ExpertModule.from_task_vector(f, backbone=backbone) for f, meta in zip(folders, metas, strict=True)
    }
    seed_everything(settings.seed, verbose=False)
    module = CoefficientModule(experts, stacks, layout, settings, init, datamodules)
    kwargs = {k: v for k, v in dict(trainer_kwargs or {}).items() if k in TRAINER_KEYS}
    # deterministic=True switches torch's deterministic algorithms on for the whole process: restored after the fit
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    trainer = Trainer(
        **{"accelerator": "auto", "devices": 1, **kwargs},
        max_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        deterministic=True,
        callbacks=[losses := LossLog()],
    )
    try:
        with warnings.catch_warnings():
            # the experts stay in eval mode on purpose (no dropout while the coefficients are fitted)
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
            trainer.fit(module)
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    coefficients = module.learned()
    info = {
        **settings.to_dict(),
        "data": settings.data_used(),
        "init": init,
        "steps": int(trainer.global_step),
        "seconds": round(time.perf_counter() - t0, 3),
        "loss_first": losses.first,
        "loss_last": losses.last,
        "groups": len(layout.groups),
        "columns": list(layout.columns),
        "learned_parameters": len(layout.names),
        "min": float(coefficients.min()),
        "max": float(coefficients.max()),
        "mean": float(coefficients.mean()),
    }
    write_learned(output, merged, record, stacks, layout, coefficients, info, plots=plots)
    return info


def learned_is_current(
    output: str | os.PathLike[str],
    merged: str | os.PathLike[str],
    settings: LearnSettings | Mapping[str, Any],
    lam: float,
) -> bool:
    """A learned folder from the same merged folder, settings and initial λ, newer than the merge: reusable."""
    from drm_lightning.merging.engine.record import MERGE_FILE

    output, merged = Path(output), Path(merged)
    path = output / MERGE_FILE
    if not path.is_file() or not (output / COEFFICIENTS_JSON).is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    settings = LearnSettings.parse(settings)
    info = record.get("learned") or {}
    init = float(lam if settings.init is None else settings.init)
    if record.get("learned_from") != str(merged.resolve()) or info.get("init") != init:
        return False
    if any(info.get(k) != v for k, v in settings.to_dict().items()):
        return False
    return path.stat().st_mtime >= (merged / MERGE_FILE).stat().st_mtime


class LossLog(Callback):
    """The first and the last step's loss of the coefficient fit."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        value = float(loss.detach())
        if self.first is None:
            self.first = value
        self.last = value


def write_learned(
    output: Path,
    merged: Path,
    record: Mapping[str, Any],
    stacks: Mapping[str, torch.Tensor],
    layout: CoefficientLayout,
    coefficients: torch.Tensor,
    info: Mapping[str, Any],
    *,
    plots: bool = True,
) -> Path:
    """Write the learned folder atomically (see the module docstring); returns it."""
    from drm_lightning.evaluation.merged import merged_delta_bytes
    from drm_lightning.io.atomic import atomic_dir
    from drm_lightning.io.disk import check_free_space
    from drm_lightning.io.merged_delta import delta_writer, iter_merged_delta
    from drm_lightning.merging.engine.record import HEADS_DIR, MERGE_FILE

    check_free_space({output: merged_delta_bytes(merged)}, "learned merged delta")
    index = {name: i for i, name in enumerate(layout.names)}
    with atomic_dir(output) as tmp:
        writer = delta_writer(tmp)
        with torch.no_grad():
            for name, delta in iter_merged_delta(merged):  # the parameters not learned: at the initial coefficient
                i = index.get(name)
                value = (
                    float(info["init"]) * delta.float()
                    if i is None
                    else combine(coefficients[layout.rows[i]], stacks[name])
                )
                writer.add(name, value.contiguous())
        writer.close()
        if (merged / HEADS_DIR).is_dir():
            shutil.copytree(merged / HEADS_DIR, tmp / HEADS_DIR)
        out = {**record, "learned": dict(info), "learned_from": str(merged.resolve())}
        (tmp / MERGE_FILE).write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
        table = {
            **dict(info),
            "rows": list(layout.groups),
            "columns": list(layout.columns),
            "coefficients": [[float(x) for x in row] for row in coefficients.tolist()],
        }
        (tmp / COEFFICIENTS_JSON).write_text(json.dumps(table, indent=2) + "\n")
        if plots:
            plot_coefficients(table, tmp / COEFFICIENTS_PNG)
    return output


def read_coefficients(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``coefficients.json`` of a learned folder."""
    path = Path(folder) / COEFFICIENTS_JSON
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {folder} a learned folder?)")
    return json.loads(path.read_text())


def plot_coefficients(table: Mapping[str, Any], path: Path) -> Path | None:
    """The heatmap group × column of ``coefficients.json``'s matrix (``None`` without matplotlib)."""
    from drm_lightning.evaluation.plots import heatmap

    rows, columns = list(table["rows"]), list(table["columns"])
    title = f"learned coefficients ({table['form']}, {table['granularity']}, {table['objective']})"
    return heatmap(table["coefficients"], rows, columns, title, path)
