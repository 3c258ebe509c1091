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

from drm_lightning.commands.pipeline_folder import RunFolder, log
from drm_lightning.commands.pipeline_recipe import MethodSpec

if TYPE_CHECKING:
    from drm_lightning.evaluation.run import MoreVariants, Variant
    from drm_lightning.merging.engine.sweep import ParamGrid


def param_grid(spec: MethodSpec) -> ParamGrid:
    """The method's ``ParamGrid``: its parameters, a searched one's values as axes."""
    from drm_lightning.merging.engine.sweep import ParamGrid

    return ParamGrid.parse(spec.method, spec.params)


def variants(run: RunFolder, spec: MethodSpec) -> list[Variant]:
    """A searched method's parameter sets as ``Variant`` (folder merged/<label>/<values>); ``[]`` otherwise."""
    from drm_lightning.evaluation.run import Variant
    from drm_lightning.merging.engine.sweep import variant_name

    grid = param_grid(spec)
    if not grid.searched:
        return []
    return [Variant(variant_name(v), v, run.merged_dir(spec) / variant_name(v)) for v in grid.combinations()]


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
    from drm_lightning.world import broadcast_json

    folders = run.task_vector_dirs()
    sets = variants(run, spec)
    if sets:
        grid = param_grid(spec)
        current = broadcast_json([merge_is_current(run, spec, v.folder, grid.params(v.values)) for v in sets])
        todo = [v for v, ok in zip(sets, current, strict=True) if not ok]
        reused = len(sets) - len(todo)
        log(f"{spec.name}: {len(sets)} parameter sets ({reused} reused)")
        merge_variants(run, spec, grid, todo)
        return
    out = run.merged_dir(spec)
    if broadcast_json(merge_is_current(run, spec)):
        log(f"{spec.name}: reusing the merge in {out}")
    else:
        log(f"{spec.name}: merging {len(folders)} task vectors")
        merge_task_vectors_distributed(
            folders, spec.method, out, spec.params, device=run.recipe.merge_device, progress=False
        )


def merge_variants(
    run: RunFolder, spec: MethodSpec, grid: ParamGrid, variants: Sequence[Variant], *, alone: bool = False
) -> None:
    """Merge these parameter sets of ``spec`` (values in ``grid``): one pass on one process (or with ``alone``),
    else shared out."""
    from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
    from drm_lightning.merging.engine.sweep import merge_task_vectors_many
    from drm_lightning.world import detect_world

    if not variants:
        return
    folders = run.task_vector_dirs()
    sets = [grid.params(v.values) for v in variants]
    names = ", ".join(v.name for v in variants)
    log(f"{spec.name}: merging {len(folders)} task vectors at {len(variants)} parameter set(s): {names}")
    if alone or detect_world().world_size == 1:
        merge_task_vectors_many(
            folders, spec.method, [v.folder for v in variants], sets, device=run.recipe.merge_device,
            progress=False,
        )  # fmt: skip
        return
    for variant, params in zip(variants, sets, strict=True):
        merge_task_vectors_distributed(
            folders, spec.method, variant.folder, params, device=run.recipe.merge_device, progress=False
        )


def edge_merges(run: RunFolder) -> MoreVariants:
    """``evaluate_merges``' ``more_variants`` for the recipe's searched methods: edge extension of their
    parameters (``evaluation.run.edge_variants``), the new sets merged here unless current."""
    from drm_lightning.evaluation.run import edge_variants

    grids: dict[str, ParamGrid] = {}

    def more_variants(label: str, tried: Sequence[Any]) -> list[Variant]:
        spec = next(s for s in run.recipe.methods if s.name == label)
        if label not in grids:
            grids[label] = param_grid(spec)
        grids[label], new = edge_variants(grids[label], tried, run.merged_dir(spec))
        grid = grids[label]
        todo = [v for v in new if not merge_is_current(run, spec, v.folder, grid.params(v.values))]
        merge_variants(run, spec, grid, todo, alone=True)  # inside an evaluation unit: this rank alone
        return new

    return more_variants
