"""Task datamodules named in configs: a ``class_path``/``init_args`` mapping or a ``configs/task/*.yaml`` file.

Why one place: ``evaluate``, ``merge --lam search`` and ``pipeline`` all take a list of tasks, and must read a task
exactly as ``drm-lightning fit --config configs/task/<task>.yaml`` does. A task file is a LightningCLI config whose
``data:`` section is the datamodule; the same section may also be written inline. Each spec is checked against the
datamodule class's real signature (jsonargparse) before anything is loaded.

Forms a task entry can take::

    configs/task/rotten_tomatoes.yaml                 # a file with a data: section (or a bare class_path mapping)
    {config: configs/task/rte.yaml, init_args: {max_train_samples: 2000}}   # a file plus overrides
    {class_path: drm_lightning.data.text.TextClassificationDataModule, init_args: {...}}
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from jsonargparse import ArgumentError, Namespace

if TYPE_CHECKING:  # Lightning is imported only where a datamodule is checked or built: `merge --help` stays light
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser

TaskEntry = str | dict[str, Any]
"""A task as a recipe or the command line gives it (see the module docstring)."""

#: Datamodule parameters that name the model's preprocessing; filled from the model's backbone when unset.
TOKENIZER_PARAMS: tuple[str, ...] = ("tokenizer", "image_processor", "processor")


def resolve_path(path: str, search_dirs: Sequence[Path] = ()) -> Path:
    """``path`` as given if it exists, else relative to each of ``search_dirs`` in turn (e.g. a recipe's folder)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    for folder in search_dirs:
        if (folder / candidate).exists():
            return folder / candidate
    return candidate


def load_yaml(path: str | Path) -> Any:
    """Parse one YAML file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such config file", str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None


def load_task_spec(entry: TaskEntry, search_dirs: Sequence[Path] = ()) -> dict[str, Any]:
    """Turn a task entry into ``{"class_path": ..., "init_args": {...}}`` (not yet checked against the class)."""
    overrides: Mapping[str, Any] = {}
    if isinstance(entry, Mapping) and "config" in entry:
        unknown = sorted(set(entry) - {"config", "init_args"})
        if unknown:
            raise ValueError(f"task {dict(entry)!r}: unknown key(s) {unknown}; a file entry takes config and init_args")
        overrides = entry.get("init_args") or {}
        entry = str(entry["config"])
    if isinstance(entry, str):
        path = resolve_path(entry, search_dirs)
        content = load_yaml(path)
        if isinstance(content, Mapping) and "data" in content:
            content = content["data"]
        if not isinstance(content, Mapping) or "class_path" not in content:
            raise ValueError(f"task file {path}: expected a 'data:' section with class_path and init_args")
        spec = {"class_path": content["class_path"], "init_args": dict(content.get("init_args") or {})}
    elif isinstance(entry, Mapping):
        if "class_path" not in entry:
            raise ValueError(f"task {dict(entry)!r}: needs class_path (and init_args), or config: <task yaml>")
        unknown = sorted(set(entry) - {"class_path", "init_args"})
        if unknown:
            raise ValueError(f"task {entry['class_path']}: unknown key(s) {unknown}; expected class_path, init_args")
        spec = {"class_path": entry["class_path"], "init_args": dict(entry.get("init_args") or {})}
    else:
        raise ValueError(f"task {entry!r}: expected a task YAML path or a class_path/init_args mapping")
    if not isinstance(overrides, Mapping):
        raise ValueError(f"task {entry}: init_args must be a mapping, got {overrides!r}")
    spec["init_args"].update(overrides)
    return spec


def _parser() -> LightningArgumentParser:
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    return parser


def check_task_spec(spec: Mapping[str, Any], where: str = "task") -> Namespace:
    """Validate a spec against its class's signature without instantiating it; return the parsed namespace."""
    try:
        return _parser().parse_object({"data": dict(spec)})
    except ArgumentError as err:
        raise ValueError(f"{where} ({spec.get('class_path')}): {' '.join(str(err).split())}") from None


def accepted_params(class_path: str) -> set[str]:
    """The ``__init__`` parameter names of a datamodule class (to apply shared overrides only where they fit)."""
    from jsonargparse._util import import_object

    cls = import_object(class_path)
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def with_defaults(spec: Mapping[str, Any], defaults: Mapping[str, Any], tokenizer: str | None = None) -> dict[str, Any]:
    """Apply shared settings to one task spec.

    Args:
        spec: ``{"class_path", "init_args"}``.
        defaults: values that replace the task's own (e.g. a recipe's ``max_train_samples``); only those the class
            accepts are applied.
        tokenizer: the model's backbone, given to the first of ``TOKENIZER_PARAMS`` the class accepts when the task
            does not name one itself.
    """
    params = accepted_params(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    init_args.update({k: v for k, v in defaults.items() if k in params})
    if tokenizer is not None:
        for name in TOKENIZER_PARAMS:
            if name in params:
                if init_args.get(name) is None:
                    init_args[name] = tokenizer
                break
    return {"class_path": spec["class_path"], "init_args": init_args}


def unused_defaults(specs: Iterable[Mapping[str, Any]], defaults: Mapping[str, Any]) -> list[str]:
    """Shared settings that no task's class accepts: almost certainly a typo, so callers refuse them."""
    accepted: set[str] = set()
    for spec in specs:
        accepted |= accepted_params(spec["class_path"])
    return sorted(k for k in defaults if k not in accepted)


def instantiate_datamodule(spec: Mapping[str, Any], where: str = "task") -> LightningDataModule:
    """Check and build one datamodule (its ``__init__`` only: data is loaded later, in ``setup``)."""
    parser = _parser()
    config = check_task_spec(spec, where)
    return parser.instantiate_classes(config).data


def task_name(datamodule: LightningDataModule) -> str:
    """The task name a datamodule carries (``task`` attribute or hyperparameter)."""
    name = getattr(datamodule, "task", None) or getattr(datamodule, "hparams", {}).get("task")
    if not name:
        raise ValueError(f"{type(datamodule).__name__}: has no task name (init argument 'task')")
    return str(name)


def task_datamodules(tasks: list[TaskEntry] | None, task_vectors: list[str]) -> dict[str, Any]:
    """Build the tasks' datamodules, keyed by task name, and check they match the task vectors' tasks."""
    from drm_lightning.io.task_vector import read_meta

    metas = {read_meta(folder).task: read_meta(folder) for folder in task_vectors}
    datamodules: dict[str, Any] = {}
    for i, entry in enumerate(tasks or []):
        spec = load_task_spec(entry)
        base = next(iter(metas.values())).base_model if metas else None
        dm = instantiate_datamodule(with_defaults(spec, {}, tokenizer=base), where=f"tasks[{i}]")
        datamodules[task_name(dm)] = dm
    missing = sorted(set(metas) - set(datamodules))
    if missing:
        raise ValueError(f"tasks: no datamodule for task(s) {missing} of the task vectors (have {sorted(datamodules)})")
    extra = sorted(set(datamodules) - set(metas))
    if extra:
        raise ValueError(f"tasks: task(s) {extra} have no task vector among {sorted(metas)}")
    from drm_lightning.interop.names import check_labels

    for task, meta in metas.items():  # an imported expert's labels come from its checkpoint, not from the task
        if meta.source is not None:
            where = f"task vector of task {task!r} (from {meta.source.get('path')})"
            check_labels(where, meta.label_names, getattr(datamodules[task], "label_names", None))
    return datamodules
