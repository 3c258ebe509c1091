"""Stage 2 of the pipeline: each method's merge (a searched method: every parameter set), reused when current.

A merge is current when ``merge.json`` names the same method, parameters and inputs and is newer than every task
vector. Launched on several processes, each merge is shared out between all of them
(``merge_task_vectors_distributed``); a searched method merges all its parameter sets in one pass
(``merge_task_vectors_many``) on one process, or one set after another, each shared out, on several.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drm_lightning.commands.pipeline_folder import RunFolder, log, rank_zero_then_wait
from drm_lightning.commands.pipeline_recipe import MethodSpec

if TYPE_CHECKING:
    from drm_lightning.evaluation.param_search import ParamSearch, Variant


def param_search(run: RunFolder, spec: MethodSpec) -> ParamSearch | None:
    """A searched method's parameter search (``evaluation.param_search``): every set in merged/<label>/<values>,
    the sets its edge extension adds merged on this rank alone unless current; ``None`` for a method not searched."""
    from drm_lightning.evaluation.param_search import ParamSearch
    from drm_lightning.merging.engine.sweep import ParamGrid

    grid = ParamGrid.parse(spec.method, spec.params)
    if not grid.searched:
        return None

    def merge_new(variants: Sequence[Variant], params: list[dict[str, Any]]) -> None:
        todo = [(v, p) for v, p in zip(variants, params, strict=True) if not merge_is_current(run, spec, v.folder, p)]
        # inside an evaluation unit: this rank alone
        merge_variants(run, spec, [v for v, _ in todo], [p for _, p in todo], alone=True)

    return ParamSearch(grid, run.merged_dir(spec), merge_new)


def merge_is_current(
    run: RunFolder, spec: MethodSpec, folder: Path | None = None, params: Mapping | None = None
) -> bool:
    """A previous merge of the same method, parameters and inputs, newer than every task vector."""
    from drm_lightning.io.task_vector import META_FILE
    from drm_lightning.merging.engine.record import MERGE_FILE

    record_path = (folder if folder is not None else run.merged_dir(spec)) / MERGE_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return False
    inputs = [str(run.task_vector_dir(t).resolve()) for t in run.tasks]
    wanted = json.loads(json.dumps(params if params is not None else spec.params))
    if record.get("method") != spec.method or record.get("params") != wanted:
        return False
    if [i.get("path") for i in record.get("inputs", [])] != inputs:
        return False
    newest = max((run.task_vector_dir(t) / META_FILE).stat().st_mtime for t in run.tasks)
    return record_path.stat().st_mtime >= newest


def merge_all(run: RunFolder) -> None:
    """Merge with every method, reusing merges that are current (rank 0 decides which, for every rank).

    Launched on several processes, each merge is shared out between all of them
    (``merge_task_vectors_distributed``: parameters balanced by merge cost, each rank on its own device). A
    searched method merges all its parameter sets in one pass (``merge_task_vectors_many``) on one process,
    or one set after another, each shared out, on several.
    """
    from drm_lightning.world import join_world, stage

    join_world(run.recipe.merge_device)
    for spec in run.recipe.methods:
        with stage(spec.name):
            merge_method(run, spec)


def merge_method(run: RunFolder, spec: MethodSpec) -> None:
    """Merge with one method (every parameter set of a searched one), unless its merge is current."""
    from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
    from drm_lightning.merging.methods.registry import get_method
    from drm_lightning.world import broadcast_json

    folders = run.task_vector_dirs()
    search = param_search(run, spec)
    if search is not None:
        sets = search.params(search.variants)
        pairs = list(zip(search.variants, sets, strict=True))
        current = broadcast_json([merge_is_current(run, spec, v.folder, p) for v, p in pairs])
        todo = [pair for pair, ok in zip(pairs, current, strict=True) if not ok]
        reused = len(search.variants) - len(todo)
        log(f"{spec.name}: {len(search.variants)} parameter sets ({reused} reused)")
        merge_variants(run, spec, [v for v, _ in todo], [p for _, p in todo])
        return
    out = run.merged_dir(spec)
    if broadcast_json(merge_is_current(run, spec)):
        log(f"{spec.name}: reusing the merge in {out}")
    elif get_method(spec.method).block_by_block:
        log(f"{spec.name}: merging {len(folders)} task vectors block by block, with each task's training examples")
        rank_zero_then_wait(lambda: merge_with_data(run, spec, out, spec.params))
    else:
        log(f"{spec.name}: merging {len(folders)} task vectors")
        merge_task_vectors_distributed(
            folders, spec.method, out, spec.params, device=run.recipe.merge_device, progress=False
        )


def merge_with_data(run: RunFolder, spec: MethodSpec, output: Path, params: Mapping[str, Any]) -> None:
    """A ``block_by_block`` method's merge (RegMean++: Grams on the merged model's inputs) with the recipe's
    datamodules, on this process (``evaluation.block_merge``)."""
    from drm_lightning.evaluation.block_merge import merge_block_by_block

    result = merge_block_by_block(
        run.task_vector_dirs(), spec.method, output, run.datamodules, params, device=run.recipe.merge_device,
        examples=run.recipe.statistics_examples or None,  # RegMean's count, so both see the same examples
    )  # fmt: skip
    log(f"{spec.name}: merged in {result.timings['total']:.1f}s ({result.timings['grams']:.1f}s of forward passes)")


def merge_variants(
    run: RunFolder,
    spec: MethodSpec,
    variants: Sequence[Variant],
    sets: Sequence[dict[str, Any]],
    *,
    alone: bool = False,
) -> None:
    """Merge these parameter sets of ``spec`` (``sets``: their full parameters): one pass on one process (or with
    ``alone``), else shared out."""
    from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
    from drm_lightning.merging.engine.sweep import merge_task_vectors_many
    from drm_lightning.merging.methods.registry import get_method
    from drm_lightning.world import detect_world

    if not variants:
        return
    folders = run.task_vector_dirs()
    names = ", ".join(v.name for v in variants)
    log(f"{spec.name}: merging {len(folders)} task vectors at {len(variants)} parameter set(s): {names}")
    if get_method(spec.method).block_by_block:  # one block-by-block merge per set, each with the data

        def each() -> None:
            for variant, params in zip(variants, sets, strict=True):
                merge_with_data(run, spec, variant.folder, params)

        each() if alone else rank_zero_then_wait(each)
        return
    if alone or detect_world().world_size == 1:
        merge_task_vectors_many(
            folders, spec.method, [v.folder for v in variants], list(sets), device=run.recipe.merge_device,
            progress=False,
        )  # fmt: skip
        return
    for variant, params in zip(variants, sets, strict=True):
        merge_task_vectors_distributed(
            folders, spec.method, variant.folder, params, device=run.recipe.merge_device, progress=False
        )
