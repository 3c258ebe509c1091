"""The pipeline's recipe: its parser, the dataclasses of its blocks, and every check that needs no model or data.

``build_pipeline_parser`` checks each key of a recipe against ``ExpertModule``, ``Trainer`` and the dataclasses here;
``load_recipe`` resolves the tasks and checks what can be checked before the first expert is fitted (methods and
their parameters, labels, model settings), so a typo fails in a second, not after an hour of training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from drm_lightning.commands.tasks import TaskEntry, check_task_spec, load_task_spec, unused_defaults, with_defaults

PROG = "drm-lightning pipeline"
#: ExpertModule arguments that come from each task's datamodule, not from the recipe's shared model settings.
TASK_MODEL_ARGS = ("task", "label_names", "metrics", "task_type", "templates")
_DESCRIPTION = "Run a recipe: fit missing experts, merge with each method, choose λ, test, report."
_MODEL_HELP = "ExpertModule arguments shared by every expert (task, label_names and metrics come from each task)."
_TRAINER_HELP = "Trainer of every fit."
#: What ``--help`` says of ``model`` and ``trainer`` (the light parser does not import the classes whose keys they are).
_LIGHT_HELP = {
    "model": (_MODEL_HELP, "e.g. --model.backbone (required), --model.lora, --model.learning_rate"),
    "trainer": (_TRAINER_HELP, "e.g. --trainer.max_epochs, --trainer.accelerator, --trainer.precision"),
}


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
        learn: Learn merging coefficients on top of the chosen λ (``LearnSettings``: objective entropy or
            cross_entropy, form layer or task, granularity tensor or block, epochs, lr, max_steps, split, init,
            seed); the model reported and exported is the learned one (docs/methods.md, "Learned coefficients").
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    lam: float | None = None
    lambdas: list[float] | None = None
    learn: dict[str, Any] | None = None

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
    if spec.learn is not None:
        from drm_lightning.evaluation.coefficients import LearnSettings, task_form_methods

        settings = LearnSettings.parse(spec.learn, where=f"methods[{index}].learn")
        if settings.form == "task" and spec.method not in task_form_methods():
            raise ValueError(
                f"methods[{index}].learn.form='task': method {spec.method!r} has no per-task terms; the task form "
                f"works over {list(task_form_methods())} (form: layer works over any method)"
            )
        spec.learn = settings.to_dict()
    return spec


def build_pipeline_parser(*, light: bool = False) -> ArgumentParser:
    """The recipe parser: every key of a recipe is checked against ExpertModule, Trainer and the dataclasses here.

    Args:
        light: ``model`` and ``trainer`` as plain mappings, their keys unchecked: a parser that imports no Lightning,
            torch or transformers, for ``--help`` and the first check of a command line (``parse_pipeline_args``).
    """
    if light:
        parser = ArgumentParser(prog=PROG, exit_on_error=False, description=_DESCRIPTION)
    else:
        from lightning.pytorch.cli import LightningArgumentParser

        parser = LightningArgumentParser(prog=PROG, exit_on_error=False, description=_DESCRIPTION)
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
    if light:
        for key, (text, keys) in _LIGHT_HELP.items():
            parser.add_argument(
                f"--{key}",
                type=dict[str, Any],
                default={},
                help=f"{text} Keys: {keys}; all of them with their help under --{key}.* of "
                "'drm-lightning fit --help' (checked against the class once the command line parsed).",
            )
    else:
        _add_model_and_trainer(parser)
    # A list of plain mappings, not list[MethodSpec]: jsonargparse would merge a command-line --methods item by item
    # into the recipe's (a new first method inheriting the old first one's params); a list must replace a list.
    parser.add_argument(
        "--methods",
        type=list[dict[str, Any]],
        required=True,
        help="Merge methods, each a merged model: {method, params, label, lam, lambdas, learn} (see MethodSpec).",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed_everything before each expert's fit.")
    examples = None  # the light parser imports nothing of torch (io.statistics does); only the full one fills it in
    if not light:
        from drm_lightning.io.statistics import DEFAULT_EXAMPLES

        examples = DEFAULT_EXAMPLES
    parser.add_argument(
        "--statistics_examples",
        type=int,
        default=examples,
        help="Training examples whose linear-layer input Grams each fitted expert records when its fit ends "
        "(RegMean's statistics, beside the task vector; default: the fit callback's, io.statistics.DEFAULT_EXAMPLES)"
        "; 0: none (a recipe with RegMean then refuses).",
    )
    parser.add_argument(
        "--statistics_layers",
        type=list[str] | None,
        default=None,
        help="Regexes of weight names (re.search) whose input Grams are recorded, by the fits and for experts "
        "that lack them; the others are merged by RegMean's plain mean. Default: every trained linear layer.",
    )
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


def _add_model_and_trainer(parser: ArgumentParser) -> None:
    """``model`` and ``trainer`` checked key by key against ``ExpertModule`` and ``Trainer`` (imports Lightning)."""
    import inspect

    from lightning.pytorch import Trainer

    from drm_lightning.models.expert import ExpertModule

    params = set(inspect.signature(ExpertModule.__init__).parameters)
    parser.add_class_arguments(
        ExpertModule,
        "model",
        skip={p for p in TASK_MODEL_ARGS if p in params},
        instantiate=False,
        sub_configs=True,
        help=_MODEL_HELP,
    )
    parser.add_class_arguments(
        Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True, help=_TRAINER_HELP
    )


def parse_pipeline_args(args: Sequence[str]) -> Namespace:
    """A pipeline command line (``--config`` recipes and overrides) parsed and checked.

    Why two parsers: the full one needs ``ExpertModule``'s and ``Trainer``'s signatures, so building it imports
    Lightning, torch and transformers (seconds). The light one answers ``--help`` and refuses a malformed command line
    (an unknown option, a missing ``tasks``, a value of the wrong type) before that; a line it accepts is parsed again
    by the full one, which checks the ``model`` and ``trainer`` keys and fills their defaults. ``--print_config``
    goes to the full parser alone (it prints the full recipe).
    """
    args = list(args)
    if not any(a.startswith("--print_config") for a in args):
        build_pipeline_parser(light=True).parse_args(args)
    return build_pipeline_parser().parse_args(args)


@dataclass
class Recipe:
    """A parsed recipe, tasks resolved to checked datamodule specs."""

    run_dir: Path
    specs: list[dict[str, Any]]
    model: dict[str, Any]
    trainer: dict[str, Any]
    methods: list[MethodSpec]
    seed: int = 0
    statistics_examples: int | None = None  # load_recipe fills it (the parser default: io.statistics.DEFAULT_EXAMPLES)
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
    statistics_layers: list[str] | None = None


def config_dirs(config: Namespace) -> list[Path]:
    """Folders a relative task path may be relative to: each recipe file's folder and that folder's parent."""
    dirs: list[Path] = []
    for path in config.get("config") or []:
        folder = Path(str(getattr(path, "absolute", path))).parent
        dirs += [folder, folder.parent]
    return dirs


def load_recipe(config: Namespace) -> Recipe:
    """Resolve and check everything in a parsed recipe that can be checked without loading models or data."""
    from drm_lightning.merging.engine.sweep import ParamGrid
    from drm_lightning.merging.methods.registry import get_method

    defaults = {k: v for k, v in config.data.as_dict().items() if v is not None}
    backbone = config.model.backbone
    search_dirs = config_dirs(config)
    raw = [load_task_spec(entry, search_dirs) for entry in config.tasks]
    if not raw:
        raise ValueError("tasks=[]: a recipe needs at least one task")
    unused = unused_defaults(raw, defaults)
    if unused:
        raise ValueError(f"data: {unused} is not an argument of any task's datamodule")
    specs = [with_defaults(spec, defaults, tokenizer=backbone) for spec in raw]
    for i, spec in enumerate(specs):
        check_task_spec(spec, where=f"tasks[{i}]")
    model = plain(config.model)
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
    examples = config.statistics_examples
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(f"statistics_examples={examples!r}: expected an integer >= 0")
    stored = [get_method(m.method) for m in methods]  # RegMean++ takes its own Grams while merging
    needing = [m.name for m, s in zip(methods, stored, strict=True) if s.needs_statistics and not s.block_by_block]
    if examples == 0 and needing:
        raise ValueError(f"statistics_examples=0: methods {needing} merge by the statistics the fits record")
    for i, m in enumerate(methods):
        grid = ParamGrid.parse(m.method, m.params, where=f"methods[{i}].params")
        m.params = dict(m.params) if grid.searched else dict(get_method(m.method).check(dict(m.params or {})))
    check_statistics_layers(config.statistics_layers)
    return Recipe(
        run_dir=Path(config.run_dir),
        specs=specs,
        model=model,
        trainer=plain(config.trainer),
        methods=methods,
        seed=config.seed,
        statistics_examples=examples,
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
        statistics_layers=list(config.statistics_layers) if config.statistics_layers is not None else None,
    )


def check_statistics_layers(layers: Any) -> None:
    """``statistics_layers``: valid regexes, or a bad one named in one line."""
    for pattern in layers or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"statistics_layers: invalid regex {pattern!r} ({err})") from None


def check_model_settings(model: Mapping[str, Any]) -> None:
    """The cheap checks ``ExpertModule`` makes, up front: a typo must not surface only after the first expert trained.

    Loading the backbone is what makes ``ExpertModule(...)`` expensive; ``check_expert_settings`` is the part of its
    constructor that needs no model (family, LoRA settings, dtype, pooling, learning rate, ...).
    """
    from drm_lightning.models.settings import check_expert_settings

    checked = ("family", "lora", "learning_rate", "weight_decay", "warmup_ratio", "pooling", "torch_dtype")
    check_expert_settings(**{k: model[k] for k in checked if model.get(k) is not None}, where="model.")


def plain(value: Any) -> Any:
    """A jsonargparse Namespace (or dataclass) as plain dicts/lists, for kwargs and JSON records."""
    if isinstance(value, Namespace):
        return {k: plain(v) for k, v in value.as_dict().items()}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return plain(asdict(value))
    return value
