"""One recipe run's state and its folder: the tasks' datamodules, where each stage writes, and how ranks speak.

The run folder holds::

    <run_dir>/task_vectors/<task>/        one expert per task (TaskVectorCallback)
    <run_dir>/experts/<task>/             its Lightning logs and fit.json (the settings it was fitted with)
    <run_dir>/merged/<label>/             Δ_merged of each method (merge_task_vectors) + merge.json
    <run_dir>/models/<label>/             the best method on validation (or each) at its λ, loadable without us
    <run_dir>/report.{md,json} *.png      the report (drm_lightning.evaluation.report)

``experts_dir`` moves the first two elsewhere: a recipe that only merges differently (a parameter search, an
ablation) names the run folder of the recipe that fitted the experts and reuses them (fitting them there when they
are missing or were fitted with other settings).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning.fabric.utilities.rank_zero import rank_zero_only

from drm_lightning.commands.pipeline_recipe import MethodSpec, Recipe
from drm_lightning.commands.tasks import instantiate_datamodule, task_name

T = TypeVar("T")


def rank_zero_then_wait(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on global rank 0 while the other ranks wait (a barrier when a process group exists)."""
    import torch.distributed as dist

    result = fn() if rank_zero_only.rank == 0 else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result


def log(message: str) -> None:
    """A progress line of the pipeline on stderr, from global rank 0 (inside an expert group: the group's)."""
    if rank_zero_only.rank == 0:
        print(f"[pipeline] {message}", file=sys.stderr, flush=True)


class RunFolder:
    """The tasks of a recipe (one datamodule each, names checked unique) and the folders of its run."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        self.datamodules: dict[str, Any] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        for i, spec in enumerate(recipe.specs):
            dm = instantiate_datamodule(spec, where=f"tasks[{i}]")
            name = task_name(dm)
            if name in self.datamodules:
                raise ValueError(f"tasks[{i}]: task {name!r} appears twice")
            self.datamodules[name] = dm
            self.specs[name] = spec
        self.tasks = list(self.datamodules)

    def task_vector_dir(self, task: str) -> Path:
        return (self.recipe.experts_dir or self.run_dir) / "task_vectors" / task

    def expert_dir(self, task: str) -> Path:
        return (self.recipe.experts_dir or self.run_dir) / "experts" / task

    def merged_dir(self, spec: MethodSpec) -> Path:
        return self.run_dir / "merged" / spec.name

    def task_vector_dirs(self) -> list[str]:
        """Every task's task vector folder, in task order: the inputs of every merge and evaluation."""
        return [str(self.task_vector_dir(t)) for t in self.tasks]
