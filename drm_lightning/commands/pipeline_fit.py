"""Stage 1 of the pipeline: an expert per task, fitted (all ranks together, or in expert groups), reused or imported.

An expert is reused when its task vector exists and ``experts/<task>/fit.json`` records the same settings
(``fit_settings``: model, datamodule, the trainer's learning settings, seed), so a second run of a recipe, or another
recipe on the same ``experts_dir``, refits nothing. Multi-process: by default every expert is fitted by all ranks
together with the recipe's Trainer (DDP/FSDP), one task after another; with ``procs_per_expert=K`` the ranks split
into groups of K (``drm_lightning.commands.expert_groups``) that fit different tasks' experts at the same time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Trainer

from drm_lightning.commands.pipeline_folder import RunFolder, log, rank_zero_then_wait

if TYPE_CHECKING:
    from drm_lightning.interop.recipe_experts import RecipeExperts
    from drm_lightning.world import WorldInfo

#: Trainer settings that do not change what an expert learns: changing them does not force a refit.
_COSMETIC_TRAINER_KEYS = frozenset(
    {
        "callbacks",
        "logger",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "log_every_n_steps",
        "default_root_dir",
        "num_sanity_val_steps",
        "profiler",
        "barebones",
        "enable_autolog_hparams",
        "model_registry",
    }
)


def digest(data: Any) -> str:
    """A short hash of JSON-able ``data`` (key order ignored): what ``fit.json`` compares settings by."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit_settings(run: RunFolder, task: str) -> dict[str, Any]:
    """What determines an expert: model settings, its datamodule, the trainer's learning settings, the seed."""
    trainer = {k: v for k, v in run.recipe.trainer.items() if k not in _COSMETIC_TRAINER_KEYS}
    return {"model": run.recipe.model, "data": run.specs[task], "trainer": trainer, "seed": run.recipe.seed}


def expert_is_current(run: RunFolder, task: str) -> bool:
    """Whether the task vector exists and was fitted with the same settings (so it can be reused)."""
    from drm_lightning.io.task_vector import META_FILE

    record = run.expert_dir(task) / "fit.json"
    if not (run.task_vector_dir(task) / META_FILE).is_file() or not record.is_file():
        return False
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    return saved.get("digest") == digest(fit_settings(run, task))


def imported_experts(run: RunFolder) -> RecipeExperts | None:
    """The recipe's ``experts`` (checked before anything is fitted: a bad folder fails in a second); ``None``
    without any."""
    if not run.recipe.experts:
        return None
    from drm_lightning.interop.recipe_experts import RecipeExperts

    imported = RecipeExperts(run.recipe.experts, run.tasks, run.recipe.model)
    imported.check_labels(run.datamodules)
    return imported


def add_missing_statistics(run: RunFolder) -> None:
    """Experts that lack the input statistics a recipe's method needs (RegMean) get them, on rank 0.

    Experts fitted here record them when fitting ends (``TaskVectorCallback``); this covers the ones reused
    from a run before that, and imported ones: the recipe's own data, its ``statistics_examples`` and
    ``statistics_layers`` (``commands/statistics.py``). A task vector's meta.json changes, so merges of it are
    redone. Experts that have statistics keep them, whichever layers they hold.
    """
    from drm_lightning.io.task_vector import read_meta
    from drm_lightning.merging.methods.registry import get_method

    stored = [get_method(spec.method) for spec in run.recipe.methods]  # RegMean++ computes its own Grams
    if not any(m.needs_statistics and not m.block_by_block for m in stored):
        return
    missing = [t for t in run.tasks if read_meta(run.task_vector_dir(t)).statistics is None]
    if not missing:
        return

    def add() -> None:
        from drm_lightning.commands.statistics import add_expert_statistics

        for task in missing:
            log(f"{task}: recording the input statistics RegMean needs (the expert has none)")
            add_expert_statistics(
                run.task_vector_dir(task),
                run.datamodules[task],
                run.recipe.statistics_examples,
                layers=run.recipe.statistics_layers,
            )

    rank_zero_then_wait(add)


def fit_experts(run: RunFolder) -> None:
    """Fit every expert that is not current: all ranks together, task by task, or in expert groups."""
    from drm_lightning.world import detect_world

    imported = imported_experts(run)
    todo = []
    if imported is not None:
        _import_experts(run, imported)
    for task in run.tasks:
        if imported is not None and task in imported.experts:
            continue
        if expert_is_current(run, task):
            log(f"{task}: reusing the task vector in {run.task_vector_dir(task)}")
        else:
            todo.append(task)
    world = detect_world()
    k = run.recipe.procs_per_expert
    if k is not None and world.world_size > 1 and world.source != "initialized" and k < world.world_size:
        todo = _agreed_todo(todo, world)
        if todo:
            _fit_in_groups(run, todo, world, k)
    else:
        for task in todo:
            fit_expert(run, task)


def _agreed_todo(todo: Sequence[str], world: WorldInfo) -> list[str]:
    """Global rank 0's list of experts to fit, on every rank, before any group fits one.

    Why: each rank reads from the file system which experts are current. A rank that started late (a slow
    import, a loaded node) read it after the first group had written its first expert, dealt the rest out over
    the groups differently and was left nothing to fit: its own task was never fitted, and no rank failed for
    it (seen under ``torchrun --standalone``, 1 run in 20). The ranks meet in a short-lived gloo group here
    (its own store prefix: ``world.init_default_group``) and leave it before the expert groups form.
    """
    from drm_lightning.exit_cleanup import leave_process_group
    from drm_lightning.world import broadcast_json, join_world, trace

    join_world("cpu", world=world)
    try:
        agreed = [str(t) for t in broadcast_json(list(todo))]
    finally:
        leave_process_group()
    trace(f"rank {world.rank}: experts to fit, own view {list(todo)}, rank 0's {agreed}")
    return agreed


def _import_experts(run: RunFolder, imported: RecipeExperts) -> None:
    """Convert the recipe's ``experts`` into task vectors (one process: under a multi-process launch they must
    be current already, since the ranks do not share a process group yet)."""
    from drm_lightning.world import detect_world

    world = detect_world()
    if world.world_size > 1:
        stale = [t for t in imported.experts if not imported.is_current(
            t, run.task_vector_dir(t), run.expert_dir(t))]  # fmt: skip
        if stale:
            raise ValueError(
                f"experts: {stale} are not imported yet; run the recipe once as one process (or stop it after "
                f"the import), then under {world.source}"
            )
        return
    imported.run(run.task_vector_dir, run.expert_dir, log)


def _fit_in_groups(run: RunFolder, tasks: Sequence[str], world: WorldInfo, procs_per_expert: int) -> None:
    """Each group of ``procs_per_expert`` ranks fits its share of ``tasks``; then all ranks meet, and a failure in
    any group is raised on every rank (nothing waits for a group that died)."""
    import os

    from drm_lightning.commands.expert_groups import assign_tasks, expert_group, local_world_size, plan_group
    from drm_lightning.world import all_ranks_ok, join_world, stage, trace

    port = world.main_port if world.main_port is not None else os.environ.get("MASTER_PORT")
    if port is None:
        raise ValueError("procs_per_expert: MASTER_PORT is not set (launch with torchrun or srun)")
    group = plan_group(world, procs_per_expert, local_world_size(), int(port))
    mine = assign_tasks(tasks, group.count)[group.index]
    trace(f"rank {world.rank}: to fit {list(tasks)}, group {group.index} of {group.count}, mine {mine}")
    log(f"{group.count} expert groups of {group.size} process(es) fit {len(tasks)} expert(s)")
    error: BaseException | None = None
    try:
        with expert_group(group, run.recipe.trainer.get("accelerator")) as overrides:
            for task in mine:  # inside the group, log speaks on the group's rank 0
                log(f"{task}: expert group {group.index} (global ranks {world.rank - group.rank}.."
                     f"{world.rank - group.rank + group.size - 1}) fits it")  # fmt: skip
                with stage(f"expert group {group.index} fits {task!r}"):
                    fit_expert(run, task, overrides)
        missing = [t for t in mine if not expert_is_current(run, t)]
        if missing:  # said here, by the group that fitted them, not later as a missing file in a merge
            raise RuntimeError(f"expert group {group.index}: no current task vector after fitting {missing}")
    except Exception as err:  # noqa: BLE001 - every rank must hear of it; re-raised below
        error = err
    trace(f"rank {world.rank}: expert groups done, error {error!r}")
    join_world(run.recipe.merge_device, world=world)
    all_ranks_ok(error)


def fit_expert(run: RunFolder, task: str, overrides: Mapping[str, Any] | None = None) -> None:
    """Fit ``task``'s expert with the recipe's model and Trainer settings; its task vector and ``fit.json``."""
    from lightning.pytorch import seed_everything

    from drm_lightning.callbacks.task_vector import TaskVectorCallback
    from drm_lightning.models.expert import ExpertModule

    recipe = run.recipe
    dm = run.datamodules[task]
    log(f"{task}: fitting the expert")
    t0 = time.perf_counter()
    seed_everything(recipe.seed, workers=True)
    model = ExpertModule(
        **recipe.model,
        task=task,
        label_names=_attribute(dm, "label_names"),
        metrics=_attribute(dm, "metrics"),
        task_type=_attribute(dm, "task_type") or "classification",
        templates=_attribute(dm, "templates"),
    )
    trainer_kwargs = dict(recipe.trainer)
    callbacks = list(_instantiate_callbacks(trainer_kwargs.pop("callbacks", None)))
    callbacks.append(
        TaskVectorCallback(
            str(run.task_vector_dir(task)),
            statistics_examples=recipe.statistics_examples,
            statistics_layers=recipe.statistics_layers,
        )
    )
    trainer_kwargs = _instantiate_trainer_objects(trainer_kwargs)
    if overrides:
        plugins = list(trainer_kwargs.get("plugins") or [])
        trainer_kwargs.update({**overrides, "plugins": plugins + list(overrides.get("plugins", []))})
    trainer_kwargs["default_root_dir"] = str(run.expert_dir(task))
    trainer = Trainer(**trainer_kwargs, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    record = {"digest": digest(fit_settings(run, task)), "settings": fit_settings(run, task), "seconds": seconds}

    def write() -> None:
        run.expert_dir(task).mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
        (run.expert_dir(task) / "fit.json").write_text(text)

    rank_zero_then_wait(write)
    log(f"{task}: expert fitted in {seconds:.0f}s -> {run.task_vector_dir(task)}")


def _attribute(datamodule: Any, name: str) -> Any:
    if hasattr(datamodule, name):
        return getattr(datamodule, name)
    return getattr(datamodule, "hparams", {}).get(name)


def _instantiate_callbacks(value: Any) -> list[Any]:
    """Recipe callbacks (class_path mappings) as objects."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_instantiate_object(item) for item in items]


def _instantiate_object(value: Any) -> Any:
    """A ``class_path``/``init_args`` mapping as an object; anything else unchanged."""
    if isinstance(value, Mapping) and "class_path" in value:
        from jsonargparse._util import import_object

        cls = import_object(value["class_path"])
        init_args = {k: _instantiate_object(v) for k, v in (value.get("init_args") or {}).items()}
        return cls(**init_args)
    return value


def _instantiate_trainer_objects(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments given as class_path mappings (strategy, logger, plugins) as objects."""
    return {k: _instantiate_object(v) if k != "plugins" else _instantiate_callbacks(v) for k, v in kwargs.items()}
