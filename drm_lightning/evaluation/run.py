"""The whole evaluation of a merge run: experts, pretrained backbone, each merged model (λ searched), the report.

Order of work, and why:

1. the experts (base + own task vector) on the **validation** splits: the λ search normalises by them;
2. each merged model's λ, chosen on the validation splits only (``search_merged_lambda``), unless given;
3. the numbers the report shows, on ``split`` (``test`` by default): the experts, the pretrained backbone under
   each expert's head, and each merged model at its chosen λ. With ``split="validation"`` the numbers of steps
   1–2 are reused rather than recomputed.

Every merged backbone is loaded once (``MergedBackbone``) and every evaluation shares one backbone across tasks.

With ``share_out=True`` (a pipeline launched on several processes) the ranks of ``torch.distributed`` divide the
work: the expert and pretrained evaluations of steps 1 and 3, then the merged models (each with its whole λ search
and final numbers), dealt out in order; every rank evaluates its share on its own device and all ranks receive every
result (``gather_results``), so the numbers are those of one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
    share_out: bool = False,
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
        trainer_kwargs: ``Trainer`` arguments for every run (with ``share_out``: one device per rank).
        share_out: divide the evaluations between the ranks of the existing process group (see the module
            docstring); without a group of several ranks, everything runs here.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_PREFIX)}")
    folders = _check_labels(merged_labels(merged), lambdas, grids)
    lambdas, grids = dict(lambdas or {}), dict(grids or {})
    tasks = [read_meta(f).task for f in task_vectors]
    kwargs = dict(trainer_kwargs or {})

    rank, world = _place(share_out)

    def experts_and_base(unit: str) -> dict[str, Any]:
        if unit == "pretrained":
            return evaluate_backbone(None, task_vectors, datamodules, split, kwargs)
        unit_split = "validation" if unit == "expert_val" else split
        rank_zero_info(f"evaluating {len(tasks)} expert(s) on {unit_split}")
        return evaluate_backbone(None, task_vectors, datamodules, unit_split, kwargs, with_task_vector=True)

    units = ["expert_val"] + (["expert"] if split != "validation" else []) + (["pretrained"] if pretrained else [])
    done = _shared(units, experts_and_base, rank, world)
    expert_val = done["expert_val"]
    expert = done.get("expert", expert_val)
    base = done.get("pretrained", {})

    def one_method(label: str) -> dict[str, Any]:
        return _evaluate_method(
            label, folders[label], task_vectors, datamodules, expert_val, split, lambdas, strategy, grids, metric,
            kwargs,
        ).to_dict()  # fmt: skip

    results = _shared(list(folders), one_method, rank, world)
    methods = [MethodResult.from_dict(results[label]) for label in folders]
    return EvaluationResults(tasks=tasks, expert=expert, methods=methods, pretrained=base, metric=metric, split=split)


def _evaluate_method(
    label: str,
    folder: Path,
    task_vectors: Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    expert_val: Mapping[str, Mapping[str, float]],
    split: Split,
    lambdas: Mapping[str, float],
    strategy: Strategy,
    grids: Mapping[str, Sequence[float]],
    metric: str,
    kwargs: dict[str, Any],
) -> MethodResult:
    """One merged model: its λ (given, or searched on validation) and its numbers on ``split``."""
    from drm_lightning.merging.merger import read_merge_record

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
    return MethodResult(
        label=label,
        method=str(info["method"]),
        params=dict(info.get("params") or {}),
        metrics=metrics,
        lam=lam,
        merge_seconds=merge_seconds(info),
        curve=curve,
    )


def _place(share_out: bool) -> tuple[int, int]:
    """This process's rank and the number of ranks sharing the work (``(0, 1)``: all of it here)."""
    import torch.distributed as dist

    if share_out and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared(units: Sequence[str], work: Callable[[str], Any], rank: int, world: int) -> dict[str, Any]:
    """``{unit: work(unit)}`` for every unit; unit ``i`` is done by rank ``i mod world`` and every rank gets all.

    A failure on any rank is raised on every rank (``gather_results``), so none is left waiting.
    """
    if world == 1:
        return {unit: work(unit) for unit in units}
    from drm_lightning.merging.distributed import gather_results

    mine: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        for unit in units[rank::world]:
            mine[unit] = work(unit)
    except Exception as err:  # noqa: BLE001 - every rank must hear of it; re-raised by gather_results
        error = err
    merged: dict[str, Any] = {}
    for share in gather_results(error, mine):
        merged.update(share)
    return {unit: merged[unit] for unit in units}


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
