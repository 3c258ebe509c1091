"""The whole evaluation of a merge run: experts, pretrained backbone, each merged model (λ searched), the report.

Order of work, and why:

1. the experts (base + own task vector) on the **validation** splits: the λ search normalises by them;
2. each merged model's λ, chosen on the validation splits only (``search_merged_lambda``), unless given;
3. the numbers the report shows, on ``split`` (``test`` by default): the experts, the pretrained backbone under
   each expert's head, and each merged model at its chosen λ. With ``split="validation"`` the numbers of steps
   1–2 are reused rather than recomputed.

Every merged backbone is loaded once (``MergedBackbone``) and every evaluation shares one backbone across tasks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info

from drm_lightning.evaluation.lambda_search import Strategy, default_grid, search_merged_lambda
from drm_lightning.evaluation.merged import MergedBackbone, merge_label, merge_seconds
from drm_lightning.evaluation.multitask import SPLIT_PREFIX, Split, evaluate_backbone
from drm_lightning.evaluation.results import EvaluationResults, MethodResult
from drm_lightning.task_vectors.format import read_meta


def merged_labels(merged: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    """Label -> merged folder; a plain list of folders is labelled from each ``merge.json`` (``label`` or method)."""
    if isinstance(merged, Mapping):
        return {str(label): Path(folder) for label, folder in merged.items()}
    from drm_lightning.merging.merger import read_merge_record

    out: dict[str, Path] = {}
    for folder in merged:
        label = merge_label(read_merge_record(folder))
        if label in out:
            raise ValueError(f"merged: label {label!r} of {folder} is also the label of {out[label]}; pass a mapping")
        out[label] = Path(folder)
    return out


def evaluate_merges(
    task_vectors: Sequence[str | os.PathLike[str]],
    merged: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    split: Split = "test",
    lambdas: Mapping[str, float] | None = None,
    strategy: Strategy = "grid",
    grids: Mapping[str, Sequence[float]] | None = None,
    metric: str = "accuracy",
    pretrained: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> EvaluationResults:
    """Evaluate experts, pretrained backbone and merged models on every task; the input of ``build_report``.

    Args:
        task_vectors: the experts' task vector folders (one per task).
        merged: merged folders (``merge_task_vectors`` output), as label -> folder or a list (labels from
            ``merge.json``).
        datamodules: task name -> its datamodule.
        split: the split of the reported numbers (λ is always chosen on ``validation``).
        lambdas: label -> a fixed λ; those models skip the search.
        strategy: λ search strategy, ``grid`` or ``refine``.
        grids: label -> λ grid; default: the method's ``default_grid``.
        metric: the metric the λ search and the report's tables use.
        pretrained: also evaluate the pretrained backbone under each expert head.
        trainer_kwargs: ``Trainer`` arguments for every run.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_PREFIX)}")
    folders = _check_labels(merged_labels(merged), lambdas, grids)
    lambdas, grids = dict(lambdas or {}), dict(grids or {})
    tasks = [read_meta(f).task for f in task_vectors]
    kwargs = dict(trainer_kwargs or {})

    rank_zero_info(f"evaluating {len(tasks)} expert(s) on validation")
    expert_val = evaluate_backbone(None, task_vectors, datamodules, "validation", kwargs, with_task_vector=True)
    expert = expert_val
    if split != "validation":
        rank_zero_info(f"evaluating {len(tasks)} expert(s) on {split}")
        expert = evaluate_backbone(None, task_vectors, datamodules, split, kwargs, with_task_vector=True)
    base = evaluate_backbone(None, task_vectors, datamodules, split, kwargs) if pretrained else {}

    from drm_lightning.merging.merger import read_merge_record

    methods = []
    for label, folder in folders.items():
        info = read_merge_record(folder)
        backbone = MergedBackbone(folder)
        curve = []
        if label in lambdas:
            lam, metrics = float(lambdas[label]), None
        else:
            grid = grids.get(label) or default_grid(info["method"])
            rank_zero_info(f"{label}: λ search ({strategy}) over {len(grid)} value(s)")
            found = search_merged_lambda(
                backbone, task_vectors, datamodules, expert_val, grid, strategy, metric, trainer_kwargs=kwargs
            )
            lam, metrics, curve = found.best_lambda, found.best_metrics, found.curve
        if metrics is None or split != "validation":
            metrics = evaluate_backbone(backbone.at(lam), task_vectors, datamodules, split, kwargs)
        methods.append(
            MethodResult(
                label=label,
                method=str(info["method"]),
                params=dict(info.get("params") or {}),
                metrics=metrics,
                lam=lam,
                merge_seconds=merge_seconds(info),
                curve=curve,
            )
        )
        del backbone  # one merged model in memory at a time
    return EvaluationResults(tasks=tasks, expert=expert, methods=methods, pretrained=base, metric=metric, split=split)


def _check_labels(
    folders: dict[str, Path],
    lambdas: Mapping[str, float] | None,
    grids: Mapping[str, Sequence[float]] | None,
) -> dict[str, Path]:
    for name, given in (("lambdas", lambdas), ("grids", grids)):
        unknown = sorted(set(given or {}) - set(folders))
        if unknown:
            raise ValueError(f"{name}: label(s) {unknown} are not among the merged models {sorted(folders)}")
    return folders
