"""Validate one backbone under every task's head, on every task's datamodule.

A merged model is one backbone shared by T tasks: for each task, the expert's head (from its task vector folder)
goes on top of that backbone and ``Trainer.validate`` (or ``Trainer.test``) runs on the task's datamodule. The
backbone is loaded once and shared by the T ``ExpertModule``s (only the heads differ), so evaluating T tasks costs
one model load, not T.

``with_task_vector=True`` evaluates the experts themselves (base + each task's own delta). The deltas are added
onto the one shared backbone in place and the touched weights are restored from a copy before the next task, so
the experts too cost one load (and a copy of the weights the task vectors touch: all of them for dense task
vectors, only the adapted matrices for LoRA ones).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from drm_lightning.evaluation.results import TaskMetrics
from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import (
    DELTAS_FILE,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    META_FILE,
    TaskVectorError,
    TaskVectorMeta,
    read_meta,
)

Split = Literal["validation", "test"]
#: split -> the stage prefix ``ExpertModule`` logs under (``val/<task>/<metric>``, ``test/<task>/<metric>``).
SPLIT_PREFIX: dict[str, str] = {"validation": "val", "test": "test"}


def default_trainer_kwargs() -> dict[str, Any]:
    """An evaluation-only ``Trainer``: one device, nothing written, no progress bars.

    ``use_distributed_sampler=False``: launched on several processes, every rank evaluates the whole split.
    Lightning's ``DistributedSampler`` would pad a split whose size the world size does not divide with repeated
    examples, and the metrics would count them (15 test examples on 2 ranks scored 50.00 % instead of 53.33 %).
    Every rank then holds the same metric states, so the metrics' cross-rank sum leaves each ratio unchanged.
    """
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "auto",
        "devices": 1,
        "use_distributed_sampler": False,
    }


class LocalMetrics(Callback):
    """Compute the model's torchmetrics on this process's own data, without syncing them across ranks.

    Why: every rank evaluates whole splits (``use_distributed_sampler=False``), so a cross-rank sync adds nothing;
    and when ranks share out the evaluations (``evaluate_merges(share_out=True)``) they evaluate different models at
    different times, where a sync would pair up unrelated collectives and hang.
    """

    def _unsync(self, pl_module: LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, Metric):
                module.sync_on_compute = False
                module._to_sync = False

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unsync(pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unsync(pl_module)


@contextmanager
def _without_prepare_data(datamodule: LightningDataModule) -> Iterator[None]:
    """Run a Trainer without the datamodule's ``prepare_data`` (its ``setup`` loads the data anyway).

    Why: while a process group exists, Lightning wraps ``prepare_data`` in a barrier of *all* ranks. Ranks that
    share out evaluations run different numbers of Trainers, so those barriers would pair up wrongly and hang.
    """
    own = vars(datamodule).get("prepare_data")
    datamodule.prepare_data = LightningDataModule.prepare_data.__get__(datamodule)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del datamodule.prepare_data
        else:
            datamodule.prepare_data = own  # type: ignore[method-assign]


def run_trainer(
    model: Any,
    datamodule: LightningDataModule,
    split: Split,
    task: str,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """``Trainer.validate`` or ``Trainer.test`` of one task; returns ``{metric: value}`` from ``<split>/<task>/*``."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_PREFIX)}")
    kwargs = {**default_trainer_kwargs(), **dict(trainer_kwargs or {})}
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), LocalMetrics()]
    trainer = Trainer(**kwargs)
    run = trainer.validate if split == "validation" else trainer.test
    with _without_prepare_data(datamodule):
        outputs = run(model, datamodule=datamodule, verbose=False)
    prefix = f"{SPLIT_PREFIX[split]}/{task}/"
    metrics: dict[str, float] = {}
    for logged in outputs:  # one dict per dataloader
        for key, value in logged.items():
            if key.startswith(prefix):
                name = key[len(prefix) :].split("/dataloader_idx_")[0]
                metrics[name] = float(value)
    if not metrics:
        keys = sorted(k for logged in outputs for k in logged)
        raise ValueError(f"task {task!r}: the {split} run logged no '{prefix}<metric>' key (logged: {keys})")
    return metrics


def _touched_names(folder: Path) -> set[str]:
    """Backbone parameter names a task vector changes (LoRA factor pairs under their weight's name)."""
    with open_safetensors(folder / DELTAS_FILE, error=TaskVectorError) as f:
        keys = list(f.keys())
    names = set()
    for key in keys:
        for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
            if key.endswith(suffix):
                key = key[: -len(suffix)]
        names.add(key)
    return names


def check_heads(folders: Sequence[str | os.PathLike[str]], metas: Sequence[TaskVectorMeta]) -> None:
    """Refuse, before any model is loaded, to evaluate a task whose expert has no head.

    Why: an expert imported from a checkpoint without a usable classification head (a ``*ForCausalLM``, an
    adapter without ``modules_to_save``) merges fine, backbone only, but cannot be scored; saying so now, with the
    reason the import recorded, beats an error from deep inside building its module.
    """
    from drm_lightning.models.backbone import LABEL_WORD_FAMILIES

    for folder, meta in zip(folders, metas, strict=True):
        if meta.family in LABEL_WORD_FAMILIES or meta.head:  # their LM head is the task head
            continue
        reason = (meta.source or {}).get("no_head_reason") or "meta.json records no head"
        origin = (meta.source or {}).get("path")
        where = f" (imported from {origin})" if origin else ""
        raise TaskVectorError(
            f"{Path(folder) / META_FILE}: task {meta.task!r} has no head{where}: {reason}; it can be merged, but not "
            "evaluated: leave it out of the tasks to evaluate"
        )


def _shared_backbone(backbone: nn.Module | str | os.PathLike[str] | None, metas: Sequence[TaskVectorMeta]) -> Any:
    """The one module every task's expert wraps, or ``None`` when the task vectors disagree on the base model."""
    from drm_lightning.models.backbone import load_backbone, load_recorded_base

    if isinstance(backbone, nn.Module):
        return backbone
    families = {m.family for m in metas}
    if len(families) != 1:
        if backbone is not None:
            raise ValueError(f"task vectors of several families {sorted(families)} cannot share backbone {backbone!r}")
        return None
    family = families.pop()
    if backbone is not None:
        return load_backbone(str(backbone), family)
    bases = {(m.base_model, m.base_fingerprint) for m in metas}
    if len(bases) != 1:
        return None  # experts of different bases: each loads its own
    return load_recorded_base(metas[0])  # as the experts loaded it: bf16 / GGUF bases keep their fingerprint


def evaluate_backbone(
    backbone: nn.Module | str | os.PathLike[str] | None,
    task_vectors: Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    split: Split = "validation",
    trainer_kwargs: Mapping[str, Any] | None = None,
    with_task_vector: bool = False,
) -> TaskMetrics:
    """Run every task's head on ``backbone`` over that task's ``split``; return ``{task: {metric: value}}``.

    Args:
        backbone: a module (e.g. a merged backbone in memory; shared, left as it was found), a model folder or
            name (loaded once), or ``None`` for the pretrained base recorded in the task vectors' ``meta.json``.
        task_vectors: task vector folders; each gives a task name, its head and label names.
        datamodules: task name -> the task's datamodule (every task of ``task_vectors`` needs one).
        split: ``validation`` (``Trainer.validate``) or ``test`` (``Trainer.test``).
        trainer_kwargs: ``Trainer`` arguments over ``default_trainer_kwargs()`` (e.g. ``precision``, ``devices``).
        with_task_vector: add each task's own delta to the backbone first: the expert itself when ``backbone``
            is ``None``.

    Raises:
        ValueError: an unknown split, no task vectors, a task named twice, a task without a datamodule, a base
            model whose weights are not the ones the task vectors were taken against (``with_task_vector``).
    """
    from drm_lightning.models.expert import ExpertModule
    from drm_lightning.task_vectors.fingerprint import fingerprint, fingerprint_matches, short_fingerprint

    if split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_PREFIX)}")
    folders = [Path(f) for f in task_vectors]
    if not folders:
        raise ValueError("task_vectors: empty; give at least one task vector folder")
    metas = [read_meta(f) for f in folders]
    check_heads(folders, metas)
    tasks = [m.task for m in metas]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ValueError(f"task_vectors: task(s) {repeated} appear more than once in {[str(f) for f in folders]}")
    missing = [t for t in tasks if t not in datamodules]
    if missing:
        raise ValueError(f"datamodules: no datamodule for task(s) {missing} (have {sorted(datamodules)})")

    module = _shared_backbone(backbone, metas)
    snapshot: dict[str, torch.Tensor] = {}
    if with_task_vector and module is not None:
        if backbone is None:  # the experts must sit on the very weights they were trained from
            for folder, meta in zip(folders, metas, strict=True):
                if not fingerprint_matches(module, meta.base_fingerprint):
                    actual = fingerprint(module)
                    raise TaskVectorError(
                        f"{folder / 'meta.json'}: base model {meta.base_model!r} loads with fingerprint "
                        f"{short_fingerprint(actual)}, the task vector was taken against "
                        f"{short_fingerprint(meta.base_fingerprint)}"
                    )
        state = module.state_dict()
        touched = set().union(*(_touched_names(f) for f in folders))
        snapshot = {name: state[name].detach().clone() for name in sorted(touched) if name in state}

    results: TaskMetrics = {}
    try:
        for folder, meta in zip(folders, metas, strict=True):
            _restore(module, snapshot)
            expert = ExpertModule.from_task_vector(
                folder, backbone=module if module is not None else backbone, with_task_vector=with_task_vector
            )
            results[meta.task] = run_trainer(expert, datamodules[meta.task], split, meta.task, trainer_kwargs)
    finally:
        _restore(module, snapshot)  # a caller's module comes back unchanged
    return results


@torch.no_grad()
def _restore(module: nn.Module | None, snapshot: Mapping[str, torch.Tensor]) -> None:
    if module is None or not snapshot:
        return
    state = module.state_dict()
    for name, value in snapshot.items():
        state[name].copy_(value.to(state[name].device))
