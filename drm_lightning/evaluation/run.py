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
from drm_lightning.evaluation.param_search import ParamSearch, Variant, best_variant
from drm_lightning.evaluation.results import (
    EvaluationResults,
    LambdaPoint,
    MethodResult,
    TaskMetrics,
    VariantResult,
    average_normalised,
)
from drm_lightning.io.task_vector import read_meta


def merged_labels(
    merged: Mapping[str, str | os.PathLike[str] | ParamSearch] | Sequence[str | os.PathLike[str]],
) -> dict[str, Path | ParamSearch]:
    """Label -> merged folder (or parameter search); a plain list of folders is labelled from each ``merge.json``."""
    if isinstance(merged, Mapping):
        return {str(label): value if isinstance(value, ParamSearch) else Path(value) for label, value in merged.items()}
    from drm_lightning.merging.engine.record import read_merge_record

    out: dict[str, Path | ParamSearch] = {}
    for folder in merged:
        label = merge_label(read_merge_record(folder))
        if label in out:
            raise ValueError(f"merged: label {label!r} of {folder} is also the label of {out[label]}; pass a mapping")
        out[label] = Path(folder)
    return out


def evaluate_merges(
    task_vectors: Sequence[str | os.PathLike[str]],
    merged: Mapping[str, str | os.PathLike[str] | ParamSearch] | Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    split: Split = "test",
    lambdas: Mapping[str, float] | None = None,
    strategy: Strategy = "grid",
    grids: Mapping[str, Sequence[float]] | None = None,
    metric: str = "accuracy",
    pretrained: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
    share_out: bool = False,
    extend: int = 0,
    learn: Mapping[str, Mapping[str, Any]] | None = None,
    plots: bool = True,
) -> EvaluationResults:
    """Evaluate experts, pretrained backbone and merged models on every task; the input of ``build_report``.

    Args:
        task_vectors: the experts' task vector folders (one per task).
        merged: merged folders (``merge_task_vectors`` output), as label -> folder or a list (labels from
            ``merge.json``). A label may map to a ``ParamSearch``: a search over that method's own parameters,
            each set merged in its own folder; each gets its own λ search and the best (parameter set, λ) on
            validation is the method's.
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
        extend: rounds of edge extension, for λ (``search_lambda``) and for a searched method's parameters
            (``ParamSearch.extend``: the sets it adds, merged there, are evaluated too).
        learn: label -> ``LearnSettings`` mapping: learn merging coefficients on top of that model's chosen λ
            (``learn.learn_coefficients``, into ``<merged folder>/learned``); its numbers on ``split`` are then the
            learned model's, and the result's ``learned`` says what was learned on which data.
        plots: draw each learned model's coefficient heatmap.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_PREFIX)}")
    labelled = merged_labels(merged)
    searches = {label: value for label, value in labelled.items() if isinstance(value, ParamSearch)}
    empty = sorted(label for label, search in searches.items() if not search.variants)
    if empty:
        raise ValueError(f"merged: label(s) {empty} have an empty list of parameter sets")
    folders = _check_labels(
        {k: v.variants if isinstance(v, ParamSearch) else [Variant("", {}, v)] for k, v in labelled.items()},
        lambdas,
        grids,
    )
    unknown = sorted(set(learn or {}) - set(folders))
    if unknown:
        raise ValueError(f"learn: label(s) {unknown} are not among the merged models {sorted(folders)}")
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
            kwargs, extend=extend, search=searches.get(label), learn=(learn or {}).get(label), plots=plots,
        ).to_dict()  # fmt: skip

    results = _shared(list(folders), one_method, rank, world)
    methods = [MethodResult.from_dict(results[label]) for label in folders]
    return EvaluationResults(tasks=tasks, expert=expert, methods=methods, pretrained=base, metric=metric, split=split)


def _evaluate_method(
    label: str,
    variants: Sequence[Variant],
    task_vectors: Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    expert_val: Mapping[str, Mapping[str, float]],
    split: Split,
    lambdas: Mapping[str, float],
    strategy: Strategy,
    grids: Mapping[str, Sequence[float]],
    metric: str,
    kwargs: dict[str, Any],
    *,
    extend: int = 0,
    search: ParamSearch | None = None,
    learn: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> MethodResult:
    """One merged model: its λ (given, or searched on validation) and its numbers on ``split``.

    With several parameter sets (``variants`` named, i.e. a search over the method's own parameters) each gets its
    λ on validation, the best (set, λ) wins (ties to the earlier set), and only the winner is run on ``split``.
    Each set's base is loaded in turn and dropped after its search, so at most one model is held.
    """
    from drm_lightning.merging.engine.record import read_merge_record

    searched = bool(variants[0].name)
    results: list[VariantResult] = []
    records: dict[str, dict[str, Any]] = {}
    folders: dict[str, Path] = {}
    metrics_at: dict[str, Any] = {}
    backbone: MergedBackbone | None = None
    notes: list[str] = []

    def evaluate(variant: Variant) -> None:
        nonlocal backbone
        info = read_merge_record(variant.folder)
        records[variant.name], folders[variant.name] = info, variant.folder
        backbone = MergedBackbone(variant.folder)
        where = f"{label} [{variant.name}]" if searched else label
        if label in lambdas:
            lam = float(lambdas[label])
            if searched or split == "validation":
                found = evaluate_backbone(backbone.at(lam), task_vectors, datamodules, "validation", kwargs)
                score = average_normalised(found, expert_val, metric, list(expert_val))
                curve, run_notes, metrics = [LambdaPoint(lam, score, found)], [], found
            else:
                score, curve, run_notes, metrics = None, [], [], None
        else:
            grid = grids.get(label) or default_grid(info["method"])
            rank_zero_info(f"{where}: λ search ({strategy}) over {len(grid)} value(s)")
            found = search_merged_lambda(
                backbone, task_vectors, datamodules, expert_val, grid, strategy, metric, trainer_kwargs=kwargs,
                extend=extend,
            )  # fmt: skip
            lam, score, curve, run_notes, metrics = (
                found.best_lambda, found.best_score, found.curve, found.notes, found.best_metrics,
            )  # fmt: skip
        metrics_at[variant.name] = metrics
        results.append(VariantResult(variant.name, dict(variant.values), lam, score, curve, run_notes,
                                     merge_seconds(info)))  # fmt: skip
        if searched:
            backbone = None  # the winner is reloaded for the final split: never two bases at once

    for variant in variants:
        evaluate(variant)
    for _ in range(extend if search is not None else 0):
        new = [v for v in search.extend(results) if v.name not in folders]
        if not new:
            break
        notes.append("best parameters at the edge of their grid: added " + ", ".join(f"{v.name}" for v in new))
        for variant in new:
            evaluate(variant)
    best = best_variant(results)
    info = records[best.name]
    metrics = metrics_at[best.name]
    learned: dict[str, Any] = {}
    at = best.lam
    if learn is not None:  # the learned model (W_0 + 1·Δ_learned) replaces the merge at its λ
        backbone = None  # never two bases at once
        backbone, metrics, learned = _learned_model(
            label, folders[best.name], best, task_vectors, datamodules, expert_val, split, metric, kwargs, learn, plots
        )
        at = 1.0
    if metrics is None or split != "validation":  # the winner's validation numbers are the ones asked for: reused
        if backbone is None:
            backbone = MergedBackbone(folders[best.name])
        metrics = evaluate_backbone(backbone.at(at), task_vectors, datamodules, split, kwargs)
    return MethodResult(
        label=label,
        method=str(info["method"]),
        params=dict(info.get("params") or {}),
        metrics=metrics,
        lam=best.lam,
        merge_seconds=merge_seconds(info),
        curve=best.curve if (searched or label not in lambdas) else [],
        variants=results if searched else [],
        notes=notes + [f"[{v.name}] {n}" if searched else n for v in results for n in v.notes],
        learned=learned,
    )


def _learned_model(
    label: str,
    folder: Path,
    best: VariantResult,
    task_vectors: Sequence[str | os.PathLike[str]],
    datamodules: Mapping[str, LightningDataModule],
    expert_val: Mapping[str, Mapping[str, float]],
    split: Split,
    metric: str,
    kwargs: dict[str, Any],
    learn: Mapping[str, Any],
    plots: bool,
) -> tuple[MergedBackbone, TaskMetrics, dict[str, Any]]:
    """Coefficients learned on top of the chosen ``(folder, λ)`` (reused when current): the learned model at λ = 1,
    its validation metrics and the result's ``learned`` block (validation score before and after)."""
    from drm_lightning.evaluation.learn import LEARNED_DIR, learn_coefficients, learned_is_current
    from drm_lightning.merging.engine.record import read_merge_record

    output = folder / LEARNED_DIR
    if learned_is_current(output, folder, learn, best.lam):
        rank_zero_info(f"{label}: reusing the learned coefficients in {output}")
        info = dict(read_merge_record(output)["learned"])
    else:
        rank_zero_info(f"{label}: learning coefficients ({dict(learn)}) from λ={best.lam:g}")
        info = learn_coefficients(folder, best.lam, task_vectors, datamodules, learn, output, kwargs, plots=plots)
    backbone = MergedBackbone(output)
    val = evaluate_backbone(backbone.at(1.0), task_vectors, datamodules, "validation", kwargs)
    score = average_normalised(val, expert_val, metric, list(expert_val))
    learned = {**info, "folder": str(output), "validation_score_before": best.score, "validation_score": score}
    return backbone, val, learned


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
    from drm_lightning.world import gather_results

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
    folders: dict[str, Any],
    lambdas: Mapping[str, float] | None,
    grids: Mapping[str, Sequence[float]] | None,
) -> dict[str, Any]:
    for name, given in (("lambdas", lambdas), ("grids", grids)):
        unknown = sorted(set(given or {}) - set(folders))
        if unknown:
            raise ValueError(f"{name}: label(s) {unknown} are not among the merged models {sorted(folders)}")
    return folders
