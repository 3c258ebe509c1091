"""``drm-lightning pipeline --config recipes/<recipe>.yaml``: experts → task vectors → merges → λ → test → report.

A recipe (``pipeline_recipe``) names the tasks (datamodule configs), the shared model settings (``ExpertModule``'s
arguments but the task-specific ones), the ``Trainer`` settings, and the merge methods. Everything goes under the
run folder (``pipeline_folder``, which gives its layout).

The stages are functions over the run folder (``RunFolder``: the recipe, its tasks and the folder layout, the only
state they share); each reads what the one before wrote there. (1) ``fit_experts``: fit every expert whose task
vector is missing or was fitted with other settings, so a second run reuses them: resume friendly (``pipeline_fit``);
(2) ``merge_all``: merge with each method (``pipeline_merge``); ``evaluate``: (3) choose λ per method on the
validation splits, (4) evaluate the pretrained backbone, the experts and each merged model on the final split (test)
of every task; (5) ``export``: write the best merged model (``export``/``save_as``, see ``pipeline_export``);
(6) ``report``: write and print the report, which ends with the Python that loads that model.

Multi-GPU / multi-node: launch the pipeline on every rank (torchrun, srun). By default every expert is fitted by
all ranks together with the recipe's Trainer (DDP/FSDP), one task after another; with ``procs_per_expert=K`` the
ranks split into groups of K (``drm_lightning.commands.expert_groups``) that fit different tasks' experts at the
same time, each group data-parallel. Merges are shared out between all ranks (``merge_task_vectors_distributed``),
and so are the evaluations (``evaluate_merges(share_out=True)``: each rank evaluates its share of the models on its
own device); files are written by rank 0 (of the group, for an expert; of the world otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from drm_lightning.commands.pipeline_fit import add_missing_statistics, fit_experts
from drm_lightning.commands.pipeline_folder import RunFolder, log, rank_zero_then_wait
from drm_lightning.commands.pipeline_merge import merge_all, param_search
from drm_lightning.commands.pipeline_recipe import Recipe, load_recipe, parse_pipeline_args

if TYPE_CHECKING:
    from drm_lightning.evaluation.results import EvaluationResults

#: Trainer settings passed on to the evaluation runs (validation / test of every model).
_EVAL_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision")


def eval_trainer_kwargs(recipe: Recipe, local_rank: int | None = None) -> dict[str, Any]:
    """The evaluation Trainer's arguments; ``local_rank`` given: one device of this rank (evaluations shared out).

    Shared out, each rank evaluates its own models alone on ``cuda:LOCAL_RANK`` (or CPU), so devices, nodes and
    strategy of the recipe or ``eval_trainer`` are replaced.
    """
    kwargs = {k: recipe.trainer[k] for k in _EVAL_TRAINER_KEYS if recipe.trainer.get(k) is not None}
    kwargs = {**kwargs, **recipe.eval_trainer}
    if local_rank is not None:
        import torch

        from drm_lightning.commands.expert_groups import uses_cuda

        cuda = uses_cuda(kwargs.get("accelerator"))
        devices: int | list[int] = [local_rank % max(torch.cuda.device_count(), 1)] if cuda else 1
        kwargs.update(devices=devices, num_nodes=1, strategy="auto")
    return kwargs


def evaluate(run: RunFolder) -> EvaluationResults:
    """Stages 3-4: λ per method on validation, then every number on the final split (``evaluate_merges``); launched
    on several processes, the evaluations are shared out between them."""
    from drm_lightning.evaluation.run import evaluate_merges
    from drm_lightning.world import detect_world

    r = run.recipe
    world = detect_world()
    share_out = world.world_size > 1
    return evaluate_merges(
        run.task_vector_dirs(),
        {spec.name: param_search(run, spec) or str(run.merged_dir(spec)) for spec in r.methods},
        run.datamodules,
        split=r.split,
        lambdas={spec.name: spec.lam for spec in r.methods if spec.lam is not None},
        strategy=r.strategy,
        grids={spec.name: spec.lambdas for spec in r.methods if spec.lambdas},
        metric=r.metric,
        trainer_kwargs=eval_trainer_kwargs(r, world.local_rank if share_out else None),
        share_out=share_out,
        extend=r.extend_edges,
        learn={spec.name: spec.learn for spec in r.methods if spec.learn is not None},
        plots=r.plots,
    )


def chosen_merged_dirs(run: RunFolder, results: EvaluationResults) -> dict[str, Path]:
    """Label -> the merged folder each method's result comes from (a searched method's chosen parameter set)."""
    merged = {}
    for spec in run.recipe.methods:
        result = results.method(spec.name)
        chosen = result.chosen()
        merged[spec.name] = run.merged_dir(spec) / chosen.name if chosen else run.merged_dir(spec)
        if result.learned:  # the learned coefficients' folder, beside the merge they were learned on
            merged[spec.name] = Path(result.learned["folder"])
    return merged


def export(run: RunFolder, results: EvaluationResults) -> dict[str, Any] | None:
    """Stage 5: the loadable merged model(s) (``pipeline_export``), written by rank 0 while the others wait."""
    from drm_lightning.commands.pipeline_export import export_models

    def write() -> dict[str, Any] | None:
        return export_models(
            results,
            chosen_merged_dirs(run, results),
            {spec.name: spec.method for spec in run.recipe.methods},
            [run.task_vector_dir(t) for t in run.tasks],
            run.run_dir / "models",
            run.datamodules,
            export=run.recipe.export,
            save_as=run.recipe.save_as,
            log=log,
        )

    return rank_zero_then_wait(write)


def report(run: RunFolder, results: EvaluationResults, usage: dict[str, Any] | None = None) -> str:
    """Stage 6: the report (``build_report``) under the run folder; its markdown."""
    from drm_lightning.evaluation.report import build_report

    chosen = chosen_merged_dirs(run, results)
    merges = merge_inputs(run.tasks, chosen)
    merged = {label: str(folder) for label, folder in chosen.items()}
    folders = run.task_vector_dirs()
    return build_report(
        results, run.run_dir, task_vectors=folders, merged=merged, plots=run.recipe.plots, usage=usage,
        merges=merges,
    )  # fmt: skip


def merge_inputs(tasks: Sequence[str], merged: Mapping[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Label -> the task vectors its merge holds (task, folder, fingerprint, from its ``merge.json``).

    Raises:
        ValueError: a merge that lacks one of ``tasks`` (the recipe's; naming the merge and the tasks): no report is
            written whose numbers would stand for tasks a merged model never saw.
    """
    from drm_lightning.merging.engine.record import MERGE_FILE, read_merge_record

    inputs = {}
    for label, folder in merged.items():
        held = [
            {"task": i.get("task"), "path": i.get("path"), "fingerprint": i.get("fingerprint")}
            for i in read_merge_record(folder).get("inputs", [])
        ]  # fmt: skip
        missing = [t for t in tasks if t not in {i["task"] for i in held}]
        if missing:
            raise ValueError(
                f"{Path(folder) / MERGE_FILE}: merge {label!r} holds the task vectors of "
                f"{[i['task'] for i in held]} but not of {missing}; no report is written for a merge that "
                "lacks a recipe task"
            )
        inputs[label] = held
    return inputs


def run_recipe(recipe: Recipe) -> str:
    """Every stage of ``recipe`` in order over its run folder; print and return the report's markdown."""
    from drm_lightning.world import stage

    run = RunFolder(recipe)
    t0 = time.perf_counter()
    with stage("fitting experts"):
        fit_experts(run)
        add_missing_statistics(run)
    with stage("merging"):
        merge_all(run)
    with stage("evaluating"):
        results = evaluate(run)
    with stage("exporting"):
        usage = export(run, results)
    with stage("writing the report"):
        markdown = report(run, results, usage)
    if rank_zero_only.rank == 0:
        print(markdown)
    log(f"done in {time.perf_counter() - t0:.0f}s; report: {run.run_dir / 'report.md'}")
    return markdown


def run_pipeline(args: Sequence[str]) -> str:
    """Parse a recipe (``--config`` plus command-line overrides) and run it; return the report's markdown."""
    return run_recipe(load_recipe(parse_pipeline_args(args)))
