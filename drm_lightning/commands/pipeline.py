"""``drm-lightning pipeline --config recipes/<recipe>.yaml``: experts → task vectors → merges → λ → test → report.

A recipe names the tasks (datamodule configs), the shared model settings (``ExpertModule``'s arguments but the
task-specific ones), the ``Trainer`` settings, and the merge methods. The run folder then holds::

    <run_dir>/task_vectors/<task>/        one expert per task (TaskVectorCallback)
    <run_dir>/experts/<task>/             its Lightning logs and fit.json (the settings it was fitted with)
    <run_dir>/merged/<label>/             Δ_merged of each method (merge_task_vectors) + merge.json
    <run_dir>/models/<label>/             the best method on validation (or each) at its λ, loadable without us
    <run_dir>/report.{md,json} *.png      the report (drm_lightning.evaluation.report)

``experts_dir`` moves the first two elsewhere: a recipe that only merges differently (a parameter search, an
ablation) names the run folder of the recipe that fitted the experts and reuses them (fitting them there when they
are missing or were fitted with other settings).

Stages: (1) fit every expert whose task vector is missing or was fitted with other settings (so a second run
reuses them: resume friendly); (2) merge with each method; (3) choose λ per method on the validation splits;
(4) evaluate the pretrained backbone, the experts and each merged model on the final split (test) of every task;
(5) write the best merged model (``export``/``save_as``, see ``pipeline_export``); (6) write and print the report,
which ends with the Python that loads that model.

Multi-GPU / multi-node: launch the pipeline on every rank (torchrun, srun). By default every expert is fitted by
all ranks together with the recipe's Trainer (DDP/FSDP), one task after another; with ``procs_per_expert=K`` the
ranks split into groups of K (``drm_lightning.commands.expert_groups``) that fit different tasks' experts at the
same time, each group data-parallel. Merges are shared out between all ranks (``merge_task_vectors_distributed``),
and so are the evaluations (``evaluate_merges(share_out=True)``: each rank evaluates its share of the models on its
own device); files are written by rank 0 (of the group, for an expert; of the world otherwise).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from jsonargparse import ActionConfigFile, Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from drm_lightning.commands.tasks import (
    TaskEntry,
    check_task_spec,
    instantiate_datamodule,
    load_task_spec,
    task_name,
    unused_defaults,
    with_defaults,
)

if TYPE_CHECKING:
    from drm_lightning.world import WorldInfo

PROG = "drm-lightning pipeline"
#: ExpertModule arguments that come from each task's datamodule, not from the recipe's shared model settings.
TASK_MODEL_ARGS = ("task", "label_names", "metrics", "task_type", "templates")
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
#: Trainer settings passed on to the evaluation runs (validation / test of every model).
_EVAL_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision")


@dataclass
class DataDefaults:
    """Datamodule arguments applied to every task of the recipe; unset ones keep each task's own value.

    Args:
        max_train_samples: Cap on training examples per task (a smaller, faster run).
        max_eval_samples: Cap on validation and test examples per task.
        max_length: Token length cap of text tasks.
        batch_size: Training batch size.
        eval_batch_size: Validation / test batch size.
        num_workers: DataLoader worker processes.
        seed: Seed of subsampling and of validation splits carved out of train.
        choice_format: How multiple-choice tasks encode their options for the model family: ``pairs``
            (encoder), ``targets`` (seq2seq) or ``continuations`` (decoder_lm); classification tasks ignore it.
    """

    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    num_workers: int | None = None
    seed: int | None = None
    choice_format: Literal["pairs", "targets", "continuations"] | None = None


@dataclass
class MethodSpec:
    """One merged model of the recipe (an item of ``methods``).

    Args:
        method: Registry name: task_arithmetic, ties, dare, drm_v, drm_h, iso_c, iso_cts, tsv_m.
        params: The method's parameters; unset ones take its defaults. A list searches that parameter
            (``{drop_rate: [0.5, 0.7, 0.9]}``): every combination of the lists is merged (in one pass) under
            merged/<label>/<values>/, each gets its λ search, and the best (parameters, λ) on validation is the
            method's.
        label: Name in the report and of merged/<label> (default: the method name); lets one method run twice.
        lam: A fixed λ; None searches ``lambdas`` on the validation splits.
        lambdas: The λ grid to search (default: the method's default grid).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    lam: float | None = None
    lambdas: list[float] | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


def method_spec(entry: Mapping[str, Any] | MethodSpec, index: int = 0) -> MethodSpec:
    """A recipe's ``methods[index]`` entry as a checked ``MethodSpec`` (unknown keys and bad types named)."""
    if isinstance(entry, MethodSpec):
        return entry
    known = set(MethodSpec.__dataclass_fields__)
    unknown = sorted(set(entry) - known)
    if unknown or "method" not in entry:
        raise ValueError(f"methods[{index}]={dict(entry)!r}: needs 'method'; known keys {sorted(known)}")
    spec = MethodSpec(**entry)
    if not isinstance(spec.method, str) or not isinstance(spec.params or {}, Mapping):
        raise ValueError(f"methods[{index}]: method must be a name and params a mapping, got {dict(entry)!r}")
    if spec.label is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(spec.label)):
        raise ValueError(f"methods[{index}].label={spec.label!r}: use letters, digits and _ . + - (it names a folder)")
    if spec.lam is not None and (isinstance(spec.lam, bool) or not isinstance(spec.lam, int | float)):
        raise ValueError(f"methods[{index}].lam={spec.lam!r}: expected a number or null (search)")
    if spec.lambdas is not None:
        if not spec.lambdas or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in spec.lambdas):
            raise ValueError(f"methods[{index}].lambdas={spec.lambdas!r}: expected a non-empty list of numbers")
        spec.lambdas = [float(x) for x in spec.lambdas]
    spec.params = dict(spec.params or {})
    return spec


def build_pipeline_parser() -> LightningArgumentParser:
    """The recipe parser: every key of a recipe is checked against ExpertModule, Trainer and the dataclasses here."""
    import inspect

    from drm_lightning.models.expert import ExpertModule

    parser = LightningArgumentParser(
        prog=PROG,
        exit_on_error=False,
        description="Run a recipe: fit missing experts, merge with each method, choose λ, test, report.",
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="The recipe YAML (recipes/*.yaml).")
    parser.add_argument("--run_dir", type=str, default="runs/pipeline", help="Folder of every output of the run.")
    parser.add_argument(
        "--experts_dir",
        type=str | None,
        default=None,
        help="Folder whose task_vectors/ and experts/ hold this recipe's experts (default: run_dir): another "
        "recipe's run folder reuses its experts when they were fitted with the same settings.",
    )
    parser.add_argument(
        "--experts",
        type=dict[str, str],
        default={},
        help="task -> an expert made elsewhere, imported instead of fitted: a fine-tuned save_pretrained folder of "
        "model.backbone, a PEFT LoRA adapter or a task vector folder (drm_lightning.interop.recipe_experts).",
    )
    parser.add_argument(
        "--tasks",
        type=list[TaskEntry],
        required=True,
        help="Task datamodules: configs/task/*.yaml paths, {config: path, init_args: {...}} or class_path mappings.",
    )
    parser.add_class_arguments(DataDefaults, "data", help="Datamodule arguments applied to every task.")
    params = set(inspect.signature(ExpertModule.__init__).parameters)
    parser.add_class_arguments(
        ExpertModule,
        "model",
        skip={p for p in TASK_MODEL_ARGS if p in params},
        instantiate=False,
        sub_configs=True,
        help="ExpertModule arguments shared by every expert (task, label_names and metrics come from each task).",
    )
    parser.add_class_arguments(
        Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True, help="Trainer of every fit."
    )
    # A list of plain mappings, not list[MethodSpec]: jsonargparse would merge a command-line --methods item by item
    # into the recipe's (a new first method inheriting the old first one's params); a list must replace a list.
    parser.add_argument(
        "--methods",
        type=list[dict[str, Any]],
        required=True,
        help="Merge methods, each a merged model: {method, params, label, lam, lambdas} (see MethodSpec).",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed_everything before each expert's fit.")
    parser.add_argument(
        "--procs_per_expert",
        type=int | None,
        default=None,
        help="Processes that fit one expert together (a divisor of the processes per node); the launched processes "
        "then fit W/K tasks' experts at the same time. Default: all processes fit each expert, one task at a time.",
    )
    parser.add_argument(
        "--strategy",
        type=Literal["grid", "refine"],
        default="grid",
        help="λ search: grid (every λ) or refine (coarse grid, then golden-section).",
    )
    parser.add_argument(
        "--extend_edges",
        type=int,
        default=1,
        help="Rounds of grid extension when a search's best value is the first or last of its grid, for λ and for "
        "searched method parameters (bounded, said in the report); 0: off.",
    )
    parser.add_argument("--metric", type=str, default="accuracy", help="The metric of the λ search and the report.")
    parser.add_argument("--split", type=str, default="test", help="The split of the final numbers.")
    parser.add_argument(
        "--merge_device", type=str | None, default=None, help="Where merges run (default: cuda when available)."
    )
    parser.add_argument("--plots", type=bool, default=True, help="Draw the report's PNG plots.")
    parser.add_argument(
        "--export",
        type=Literal["best", "all", "none"],
        default="best",
        help="Merged models written to <run_dir>/models/<label> at their chosen λ: the best method on validation "
        "(best), every method (all) or none; the report ends with the Python that loads the best one.",
    )
    parser.add_argument(
        "--save_as",
        type=Literal["model", "adapter"],
        default="model",
        help="Form of the exported models: model (the base's own architecture) or adapter (a PEFT LoRA adapter, "
        "where every expert is LoRA and the method is exact; others are written as models).",
    )
    parser.add_argument(
        "--eval_trainer",
        type=dict[str, Any],
        default={},
        help="Trainer arguments of the evaluation runs (default: accelerator/devices/num_nodes/precision of trainer).",
    )
    return parser


@dataclass
class Recipe:
    """A parsed recipe, tasks resolved to checked datamodule specs."""

    run_dir: Path
    specs: list[dict[str, Any]]
    model: dict[str, Any]
    trainer: dict[str, Any]
    methods: list[MethodSpec]
    seed: int = 0
    procs_per_expert: int | None = None
    strategy: str = "grid"
    metric: str = "accuracy"
    split: str = "test"
    merge_device: str | None = None
    plots: bool = True
    eval_trainer: dict[str, Any] = field(default_factory=dict)
    extend_edges: int = 1
    experts_dir: Path | None = None
    experts: dict[str, str] = field(default_factory=dict)
    export: str = "best"
    save_as: str = "model"


def _config_dirs(config: Namespace) -> list[Path]:
    """Folders a relative task path may be relative to: each recipe file's folder and that folder's parent."""
    dirs: list[Path] = []
    for path in config.get("config") or []:
        folder = Path(str(getattr(path, "absolute", path))).parent
        dirs += [folder, folder.parent]
    return dirs


def load_recipe(config: Namespace) -> Recipe:
    """Resolve and check everything in a parsed recipe that can be checked without loading models or data."""
    from drm_lightning.merging.registry import get_method
    from drm_lightning.merging.sweep import ParamGrid

    defaults = {k: v for k, v in config.data.as_dict().items() if v is not None}
    backbone = config.model.backbone
    search_dirs = _config_dirs(config)
    raw = [load_task_spec(entry, search_dirs) for entry in config.tasks]
    if not raw:
        raise ValueError("tasks=[]: a recipe needs at least one task")
    unused = unused_defaults(raw, defaults)
    if unused:
        raise ValueError(f"data: {unused} is not an argument of any task's datamodule")
    specs = [with_defaults(spec, defaults, tokenizer=backbone) for spec in raw]
    for i, spec in enumerate(specs):
        check_task_spec(spec, where=f"tasks[{i}]")
    model = _plain(config.model)
    check_model_settings(model)
    if config.procs_per_expert is not None and config.procs_per_expert < 1:
        raise ValueError(f"procs_per_expert={config.procs_per_expert!r}: expected a positive integer or null")
    methods = [method_spec(m, i) for i, m in enumerate(config.methods)]
    if not methods:
        raise ValueError("methods=[]: a recipe needs at least one merge method")
    labels = [m.name for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods: labels {labels} repeat; give each run of a method its own label")
    if isinstance(config.extend_edges, bool) or config.extend_edges < 0:
        raise ValueError(f"extend_edges={config.extend_edges!r}: expected a number of rounds >= 0")
    for i, m in enumerate(methods):
        grid = ParamGrid.parse(m.method, m.params, where=f"methods[{i}].params")
        m.params = dict(m.params) if grid.searched else dict(get_method(m.method).check(dict(m.params or {})))
    return Recipe(
        run_dir=Path(config.run_dir),
        specs=specs,
        model=model,
        trainer=_plain(config.trainer),
        methods=methods,
        seed=config.seed,
        procs_per_expert=config.procs_per_expert,
        strategy=config.strategy,
        metric=config.metric,
        split=config.split,
        merge_device=config.merge_device,
        plots=config.plots,
        eval_trainer=dict(config.eval_trainer or {}),
        extend_edges=config.extend_edges,
        experts_dir=Path(config.experts_dir) if config.experts_dir else None,
        experts=dict(config.experts or {}),
        export=config.export,
        save_as=config.save_as,
    )


def check_model_settings(model: Mapping[str, Any]) -> None:
    """The cheap checks ``ExpertModule`` makes, up front: a typo must not surface only after the first expert trained.

    Loading the backbone is what makes ``ExpertModule(...)`` expensive, so its checks are repeated here with the same
    public validators (family, LoRA settings, dtype, pooling, learning rate).
    """
    from drm_lightning.models.backbone import check_family
    from drm_lightning.models.expert import parse_dtype
    from drm_lightning.models.heads import POOLINGS
    from drm_lightning.models.lora import LoraSettings

    check_family(model.get("family", "encoder"))
    lora = model.get("lora")
    if isinstance(lora, Mapping):
        LoraSettings(**lora)  # validates in __post_init__
    parse_dtype(model.get("torch_dtype"))
    if model.get("pooling", "cls") not in POOLINGS:
        raise ValueError(f"model.pooling={model.get('pooling')!r}: expected one of {POOLINGS}")
    if not model.get("learning_rate", 1.0) > 0:
        raise ValueError(f"model.learning_rate={model['learning_rate']!r}: expected a positive number")


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or dataclass) as plain dicts/lists, for kwargs and JSON records."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in value.as_dict().items()}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    return value


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


T = TypeVar("T")


def _rank_zero_then_wait(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on global rank 0 while the other ranks wait (a barrier when a process group exists)."""
    import torch.distributed as dist

    result = fn() if rank_zero_only.rank == 0 else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result


def _log(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"[pipeline] {message}", file=sys.stderr, flush=True)


class Pipeline:
    """The stages of one recipe run; each stage reads what the previous one wrote under ``run_dir``."""

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
        self.fitted: list[str] = []
        self.reused: list[str] = []
        self.imported = None
        if recipe.experts:  # checked now, before anything is fitted: a bad folder fails in a second
            from drm_lightning.interop.recipe_experts import RecipeExperts

            self.imported = RecipeExperts(recipe.experts, self.tasks, recipe.model)
            self.imported.check_labels(self.datamodules)
        self._grids: dict[str, Any] = {}

    # -- stage 1: experts ---------------------------------------------------------------------------------------
    def task_vector_dir(self, task: str) -> Path:
        return (self.recipe.experts_dir or self.run_dir) / "task_vectors" / task

    def expert_dir(self, task: str) -> Path:
        return (self.recipe.experts_dir or self.run_dir) / "experts" / task

    def fit_settings(self, task: str) -> dict[str, Any]:
        """What determines an expert: model settings, its datamodule, the trainer's learning settings, the seed."""
        trainer = {k: v for k, v in self.recipe.trainer.items() if k not in _COSMETIC_TRAINER_KEYS}
        return {"model": self.recipe.model, "data": self.specs[task], "trainer": trainer, "seed": self.recipe.seed}

    def expert_is_current(self, task: str) -> bool:
        """Whether the task vector exists and was fitted with the same settings (so it can be reused)."""
        from drm_lightning.task_vectors.format import META_FILE

        record = self.expert_dir(task) / "fit.json"
        if not (self.task_vector_dir(task) / META_FILE).is_file() or not record.is_file():
            return False
        try:
            saved = json.loads(record.read_text())
        except json.JSONDecodeError:
            return False
        return saved.get("digest") == _digest(self.fit_settings(task))

    def fit_experts(self) -> None:
        """Fit every expert that is not current: all ranks together, task by task, or in expert groups."""
        from drm_lightning.world import detect_world

        todo = []
        if self.imported is not None:
            self.import_experts()
        for task in self.tasks:
            if self.imported is not None and task in self.imported.experts:
                self.reused.append(task)
            elif self.expert_is_current(task):
                _log(f"{task}: reusing the task vector in {self.task_vector_dir(task)}")
                self.reused.append(task)
            else:
                todo.append(task)
        world = detect_world()
        k = self.recipe.procs_per_expert
        if todo and k is not None and world.world_size > 1 and world.source != "initialized" and k < world.world_size:
            self.fit_in_groups(todo, world, k)
        else:
            for task in todo:
                self.fit_expert(task)
        self.fitted.extend(todo)

    def import_experts(self) -> None:
        """Convert the recipe's ``experts`` into task vectors (one process: under a multi-process launch they must
        be current already, since the ranks do not share a process group yet)."""
        from drm_lightning.world import detect_world

        assert self.imported is not None
        world = detect_world()
        if world.world_size > 1:
            stale = [t for t in self.imported.experts if not self.imported.is_current(
                t, self.task_vector_dir(t), self.expert_dir(t))]  # fmt: skip
            if stale:
                raise ValueError(
                    f"experts: {stale} are not imported yet; run the recipe once as one process (or stop it after "
                    f"the import), then under {world.source}"
                )
            return
        self.imported.run(self.task_vector_dir, self.expert_dir, _log)

    def fit_in_groups(self, tasks: Sequence[str], world: WorldInfo, procs_per_expert: int) -> None:
        """Each group of ``procs_per_expert`` ranks fits its share of ``tasks``; then all ranks meet, and a failure in
        any group is raised on every rank (nothing waits for a group that died)."""
        import os

        from drm_lightning.commands.expert_groups import assign_tasks, expert_group, local_world_size, plan_group
        from drm_lightning.world import all_ranks_ok, join_world

        port = world.main_port if world.main_port is not None else os.environ.get("MASTER_PORT")
        if port is None:
            raise ValueError("procs_per_expert: MASTER_PORT is not set (launch with torchrun or srun)")
        group = plan_group(world, procs_per_expert, local_world_size(), int(port))
        mine = assign_tasks(tasks, group.count)[group.index]
        _log(f"{group.count} expert groups of {group.size} process(es) fit {len(tasks)} expert(s)")
        error: BaseException | None = None
        try:
            with expert_group(group, self.recipe.trainer.get("accelerator")) as overrides:
                for task in mine:  # inside the group, _log speaks on the group's rank 0
                    _log(f"{task}: expert group {group.index} (global ranks {world.rank - group.rank}.."
                         f"{world.rank - group.rank + group.size - 1}) fits it")  # fmt: skip
                    self.fit_expert(task, overrides)
            missing = [t for t in mine if not self.expert_is_current(t)]
            if missing:  # said here, by the group that fitted them, not later as a missing file in a merge
                raise RuntimeError(f"expert group {group.index}: no current task vector after fitting {missing}")
        except Exception as err:  # noqa: BLE001 - every rank must hear of it; re-raised below
            error = err
        join_world(self.recipe.merge_device, world=world)
        all_ranks_ok(error)

    def fit_expert(self, task: str, overrides: Mapping[str, Any] | None = None) -> None:
        from lightning.pytorch import seed_everything

        from drm_lightning.callbacks.task_vector import TaskVectorCallback
        from drm_lightning.models.expert import ExpertModule

        dm = self.datamodules[task]
        _log(f"{task}: fitting the expert")
        t0 = time.perf_counter()
        seed_everything(self.recipe.seed, workers=True)
        model = ExpertModule(
            **self.recipe.model,
            task=task,
            label_names=_attribute(dm, "label_names"),
            metrics=_attribute(dm, "metrics"),
            task_type=_attribute(dm, "task_type") or "classification",
            templates=_attribute(dm, "templates"),
        )
        trainer_kwargs = dict(self.recipe.trainer)
        callbacks = list(_instantiate_callbacks(trainer_kwargs.pop("callbacks", None)))
        callbacks.append(TaskVectorCallback(str(self.task_vector_dir(task))))
        trainer_kwargs = _instantiate_trainer_objects(trainer_kwargs)
        if overrides:
            plugins = list(trainer_kwargs.get("plugins") or [])
            trainer_kwargs.update({**overrides, "plugins": plugins + list(overrides.get("plugins", []))})
        trainer_kwargs["default_root_dir"] = str(self.expert_dir(task))
        trainer = Trainer(**trainer_kwargs, callbacks=callbacks)
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - t0
        record = {"digest": _digest(self.fit_settings(task)), "settings": self.fit_settings(task), "seconds": seconds}

        def write() -> None:
            self.expert_dir(task).mkdir(parents=True, exist_ok=True)
            text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
            (self.expert_dir(task) / "fit.json").write_text(text)

        _rank_zero_then_wait(write)
        _log(f"{task}: expert fitted in {seconds:.0f}s -> {self.task_vector_dir(task)}")

    # -- stage 2: merges ----------------------------------------------------------------------------------------
    def merged_dir(self, spec: MethodSpec) -> Path:
        return self.run_dir / "merged" / spec.name

    def param_grid(self, spec: MethodSpec) -> Any:
        """The method's ``ParamGrid`` (with the values edge extension added since)."""
        from drm_lightning.merging.sweep import ParamGrid

        if spec.name not in self._grids:
            self._grids[spec.name] = ParamGrid.parse(spec.method, spec.params)
        return self._grids[spec.name]

    def variants(self, spec: MethodSpec) -> list[Any]:
        """A searched method's parameter sets as ``Variant`` (folder merged/<label>/<values>); ``[]`` otherwise."""
        from drm_lightning.evaluation.run import Variant
        from drm_lightning.merging.sweep import variant_name

        grid = self.param_grid(spec)
        if not grid.searched:
            return []
        return [Variant(variant_name(v), v, self.merged_dir(spec) / variant_name(v)) for v in grid.combinations()]

    def merge_is_current(self, spec: MethodSpec, folder: Path | None = None, params: Mapping | None = None) -> bool:
        """A previous merge of the same method, parameters and inputs, newer than every task vector."""
        from drm_lightning.merging.record import MERGE_FILE
        from drm_lightning.task_vectors.format import META_FILE

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
        from drm_lightning.merging.distributed import merge_task_vectors_distributed
        from drm_lightning.world import broadcast_json, join_world

        join_world(self.recipe.merge_device)
        folders = [str(self.task_vector_dir(t)) for t in self.tasks]
        for spec in self.recipe.methods:
            variants = self.variants(spec)
            if variants:
                grid = self.param_grid(spec)
                current = broadcast_json(
                    [self.merge_is_current(spec, v.folder, grid.params(v.values)) for v in variants]
                )
                todo = [v for v, ok in zip(variants, current, strict=True) if not ok]
                reused = len(variants) - len(todo)
                _log(f"{spec.name}: {len(variants)} parameter sets ({reused} reused)")
                self.merge_variants(spec, todo)
                continue
            out = self.merged_dir(spec)
            if broadcast_json(self.merge_is_current(spec)):
                _log(f"{spec.name}: reusing the merge in {out}")
            else:
                _log(f"{spec.name}: merging {len(folders)} task vectors")
                merge_task_vectors_distributed(
                    folders, spec.method, out, spec.params, device=self.recipe.merge_device, progress=False
                )

    def merge_variants(self, spec: MethodSpec, variants: Sequence[Any], *, alone: bool = False) -> None:
        """Merge these parameter sets of ``spec``: one pass on one process (or with ``alone``), else shared out."""
        from drm_lightning.merging.distributed import merge_task_vectors_distributed
        from drm_lightning.merging.sweep import merge_task_vectors_many
        from drm_lightning.world import detect_world

        if not variants:
            return
        folders = [str(self.task_vector_dir(t)) for t in self.tasks]
        grid = self.param_grid(spec)
        sets = [grid.params(v.values) for v in variants]
        names = ", ".join(v.name for v in variants)
        _log(f"{spec.name}: merging {len(folders)} task vectors at {len(variants)} parameter set(s): {names}")
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

    # -- stages 3-5: λ, evaluation, report ----------------------------------------------------------------------
    def eval_trainer_kwargs(self, local_rank: int | None = None) -> dict[str, Any]:
        """The evaluation Trainer's arguments; ``local_rank`` given: one device of this rank (evaluations shared out).

        Shared out, each rank evaluates its own models alone on ``cuda:LOCAL_RANK`` (or CPU), so devices, nodes and
        strategy of the recipe or ``eval_trainer`` are replaced.
        """
        kwargs = {k: self.recipe.trainer[k] for k in _EVAL_TRAINER_KEYS if self.recipe.trainer.get(k) is not None}
        kwargs = {**kwargs, **self.recipe.eval_trainer}
        if local_rank is not None:
            import torch

            from drm_lightning.commands.expert_groups import uses_cuda

            cuda = uses_cuda(kwargs.get("accelerator"))
            devices: int | list[int] = [local_rank % max(torch.cuda.device_count(), 1)] if cuda else 1
            kwargs.update(devices=devices, num_nodes=1, strategy="auto")
        return kwargs

    def evaluate(self) -> Any:
        """λ per method on validation, then every number on the final split (``evaluate_merges``); launched on
        several processes, the evaluations are shared out between them."""
        from drm_lightning.evaluation.run import evaluate_merges
        from drm_lightning.world import detect_world

        r = self.recipe
        world = detect_world()
        share_out = world.world_size > 1
        return evaluate_merges(
            [str(self.task_vector_dir(t)) for t in self.tasks],
            {spec.name: self.variants(spec) or str(self.merged_dir(spec)) for spec in r.methods},
            self.datamodules,
            split=r.split,
            lambdas={spec.name: spec.lam for spec in r.methods if spec.lam is not None},
            strategy=r.strategy,
            grids={spec.name: spec.lambdas for spec in r.methods if spec.lambdas},
            metric=r.metric,
            trainer_kwargs=self.eval_trainer_kwargs(world.local_rank if share_out else None),
            share_out=share_out,
            extend=r.extend_edges,
            more_variants=self.more_variants,
        )

    def export(self, results: Any) -> dict[str, Any] | None:
        """Stage 6: the loadable merged model(s) (``pipeline_export``), written by rank 0 while the others wait."""
        from drm_lightning.commands.pipeline_export import export_models

        def write() -> dict[str, Any] | None:
            return export_models(
                results,
                self.chosen_merged_dirs(results),
                {spec.name: spec.method for spec in self.recipe.methods},
                [self.task_vector_dir(t) for t in self.tasks],
                self.run_dir / "models",
                self.datamodules,
                export=self.recipe.export,
                save_as=self.recipe.save_as,
                log=_log,
            )

        return _rank_zero_then_wait(write)

    def chosen_merged_dirs(self, results: Any) -> dict[str, Path]:
        """Label -> the merged folder each method's result comes from (a searched method's chosen parameter set)."""
        merged = {}
        for spec in self.recipe.methods:
            chosen = results.method(spec.name).chosen()
            merged[spec.name] = self.merged_dir(spec) / chosen.name if chosen else self.merged_dir(spec)
        return merged

    def report(self, results: Any, usage: dict[str, Any] | None = None) -> str:
        from drm_lightning.evaluation.report import build_report

        merged = {label: str(folder) for label, folder in self.chosen_merged_dirs(results).items()}
        folders = [str(self.task_vector_dir(t)) for t in self.tasks]
        return build_report(
            results, self.run_dir, task_vectors=folders, merged=merged, plots=self.recipe.plots, usage=usage
        )

    def run(self) -> str:
        t0 = time.perf_counter()
        self.fit_experts()
        self.merge_all()
        results = self.evaluate()
        usage = self.export(results)
        markdown = self.report(results, usage)
        if rank_zero_only.rank == 0:
            print(markdown)
        _log(f"done in {time.perf_counter() - t0:.0f}s; report: {self.run_dir / 'report.md'}")
        return markdown


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


def run_pipeline(args: Sequence[str]) -> str:
    """Parse a recipe (``--config`` plus command-line overrides) and run it; return the report's markdown."""
    parser = build_pipeline_parser()
    config = parser.parse_args(list(args))
    recipe = load_recipe(config)
    return Pipeline(recipe).run()
