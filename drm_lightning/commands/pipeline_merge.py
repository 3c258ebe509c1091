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
from typing import Any

from drm_lightning.commands.pipeline_folder import RunFolder, log
from drm_lightning.commands.pipeline_recipe import MethodSpec, Recipe


class MergeStage(RunFolder):
    """Stage 2 on a ``RunFolder``: ``merge_all`` leaves a current merge of every method (and parameter set)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self._grids: dict[str, Any] = {}

    def param_grid(self, spec: MethodSpec) -> Any:
        """The method's ``ParamGrid`` (with the values edge extension added since)."""
        from drm_lightning.merging.engine.sweep import ParamGrid

        if spec.name not in self._grids:
            self._grids[spec.name] = ParamGrid.parse(spec.method, spec.params)
        return self._grids[spec.name]

    def variants(self, spec: MethodSpec) -> list[Any]:
        """A searched method's parameter sets as ``Variant`` (folder merged/<label>/<values>); ``[]`` otherwise."""
        from drm_lightning.evaluation.run import Variant
        from drm_lightning.merging.engine.sweep import variant_name

        grid = self.param_grid(spec)
        if not grid.searched:
            return []
        return [Variant(variant_name(v), v, self.merged_dir(spec) / variant_name(v)) for v in grid.combinations()]

    def merge_is_current(self, spec: MethodSpec, folder: Path | None = None, params: Mapping | None = None) -> bool:
        """A previous merge of the same method, parameters and inputs, newer than every task vector."""
        from drm_lightning.io.task_vector import META_FILE
        from drm_lightning.merging.engine.record import MERGE_FILE

        record_path = (folder if folder is not None else self.merged_dir(spec)) / MERGE_FILE
        if not record_path.is_file():
            return False
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            return False
        inputs = [str(self.task_vector_dir(t).resolve()) for t in self.tasks]
        wanted = json.loads(json.dumps(params if params is not None else spec.params))
        if record.get("method") != spec.method or record.get("params") != wanted:
            return False
        if [i.get("path") for i in record.get("inputs", [])] != inputs:
            return False
        newest = max((self.task_vector_dir(t) / META_FILE).stat().st_mtime for t in self.tasks)
        return record_path.stat().st_mtime >= newest

    def merge_all(self) -> None:
        """Merge with every method, reusing merges that are current (rank 0 decides which, for every rank).

        Launched on several processes, each merge is shared out between all of them
        (``merge_task_vectors_distributed``: parameters balanced by merge cost, each rank on its own device). A
        searched method merges all its parameter sets in one pass (``merge_task_vectors_many``) on one process,
        or one set after another, each shared out, on several.
        """
        from drm_lightning.world import join_world, stage

        join_world(self.recipe.merge_device)
        for spec in self.recipe.methods:
            with stage(spec.name):
                self.merge_method(spec)

    def merge_method(self, spec: MethodSpec) -> None:
        """Merge with one method (every parameter set of a searched one), unless its merge is current."""
        from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
        from drm_lightning.world import broadcast_json

        folders = self.task_vector_dirs()
        variants = self.variants(spec)
        if variants:
            grid = self.param_grid(spec)
            current = broadcast_json([self.merge_is_current(spec, v.folder, grid.params(v.values)) for v in variants])
            todo = [v for v, ok in zip(variants, current, strict=True) if not ok]
            reused = len(variants) - len(todo)
            log(f"{spec.name}: {len(variants)} parameter sets ({reused} reused)")
            self.merge_variants(spec, todo)
            return
        out = self.merged_dir(spec)
        if broadcast_json(self.merge_is_current(spec)):
            log(f"{spec.name}: reusing the merge in {out}")
        else:
            log(f"{spec.name}: merging {len(folders)} task vectors")
            merge_task_vectors_distributed(
                folders, spec.method, out, spec.params, device=self.recipe.merge_device, progress=False
            )

    def merge_variants(self, spec: MethodSpec, variants: Sequence[Any], *, alone: bool = False) -> None:
        """Merge these parameter sets of ``spec``: one pass on one process (or with ``alone``), else shared out."""
        from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
        from drm_lightning.merging.engine.sweep import merge_task_vectors_many
        from drm_lightning.world import detect_world

        if not variants:
            return
        folders = self.task_vector_dirs()
        grid = self.param_grid(spec)
        sets = [grid.params(v.values) for v in variants]
        names = ", ".join(v.name for v in variants)
        log(f"{spec.name}: merging {len(folders)} task vectors at {len(variants)} parameter set(s): {names}")
        if alone or detect_world().world_size == 1:
            merge_task_vectors_many(
                folders, spec.method, [v.folder for v in variants], sets, device=self.recipe.merge_device,
                progress=False,
            )  # fmt: skip
            return
        for variant, params in zip(variants, sets, strict=True):
            merge_task_vectors_distributed(
                folders, spec.method, variant.folder, params, device=self.recipe.merge_device, progress=False
            )

    def more_variants(self, label: str, tried: Sequence[Any]) -> list[Any]:
        """Edge extension of a searched method's parameters (``evaluation.run.edge_variants``), merged here."""
        from drm_lightning.evaluation.run import edge_variants

        spec = next(s for s in self.recipe.methods if s.name == label)
        self._grids[label], new = edge_variants(self.param_grid(spec), tried, self.merged_dir(spec))
        todo = [v for v in new if not self.merge_is_current(spec, v.folder, self.param_grid(spec).params(v.values))]
        self.merge_variants(spec, todo, alone=True)  # inside an evaluation unit: this rank alone
        return new
