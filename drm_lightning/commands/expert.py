"""``drm-lightning fit | validate | test``: one expert through ``LightningCLI``.

::

    drm-lightning fit --config configs/model/minilm.yaml --config configs/task/rotten_tomatoes.yaml \\
        --config configs/trainer/cpu.yaml
    drm-lightning test ... --task_vector_dir task_vectors/rotten_tomatoes
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from drm_lightning.commands.tasks import TOKENIZER_PARAMS

PROG = "drm-lightning"
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _data_attribute(name: str) -> Callable[[LightningDataModule], Any]:
    """A link function reading ``name`` from an instantiated datamodule (attribute first, then its hparams)."""

    def read(datamodule: LightningDataModule) -> Any:
        if hasattr(datamodule, name):
            return getattr(datamodule, name)
        hparams = getattr(datamodule, "hparams", {})
        if name in hparams:
            return hparams[name]
        raise ValueError(f"data: {type(datamodule).__name__} has no attribute {name!r} to pass on to the model")

    read.__name__ = f"data_{name}"
    return read


def _task_type(datamodule: LightningDataModule) -> str:
    """The datamodule's ``task_type`` (``multiple_choice`` for ``MultipleChoiceDataModule``); others classify."""
    return getattr(datamodule, "task_type", "classification")


def _templates(datamodule: LightningDataModule) -> list[str] | None:
    """The datamodule's zero-shot prompt templates (image tasks); None where it has none."""
    templates = getattr(datamodule, "templates", None)
    return list(templates) if templates else None


class ExpertCLI(LightningCLI):
    """``fit`` / ``validate`` / ``test`` of one expert: ``ExpertModule`` + any ``LightningDataModule`` + ``Trainer``.

    Wiring (``link_arguments``, so each value is given once): ``model.backbone`` is the datamodule's tokenizer (or
    image processor); the datamodule's ``task``, ``label_names``, ``metrics``, ``task_type`` and ``templates``
    become the model's. ``fit`` adds a ``TaskVectorCallback`` that writes ``--task_vector_dir`` (default
    ``<default_root_dir>/task_vectors/<task>``); ``validate``/``test`` with ``--task_vector_dir`` evaluate the
    expert stored there instead of a fresh model.
    """

    def __init__(self, args: Sequence[str], *, parse_only: bool = False) -> None:
        from drm_lightning.models.expert import ExpertModule

        self._parse_only = parse_only
        super().__init__(
            ExpertModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=list(args),
            parser_kwargs={"prog": PROG, "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,  # ExpertModule builds its own AdamW + warmup from its arguments
        )

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        keep = LightningCLI.subcommands()
        return {name: keep[name] for name in LIGHTNING_COMMANDS}

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # main() hands the command line over itself, so LightningCLI's warning about ``args`` given while
        # ``sys.argv`` is set would fire on every console run; parse without it.
        self.config = parser.parse_args(args)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--task_vector_dir",
            type=str | None,
            default=None,
            help=(
                "The expert's task vector folder. fit writes it when training ends (default: "
                "<trainer.default_root_dir>/task_vectors/<task>); validate/test load the expert from it when given."
            ),
        )
        parser.add_argument(
            "--statistics_examples",
            type=int,
            default=256,
            help=(
                "fit: training examples whose linear-layer input Grams are recorded beside the task vector, what "
                "the RegMean merge needs (docs/methods.md, Input statistics); 0 records none."
            ),
        )
        parser.add_argument(
            "--statistics_layers",
            type=list[str] | None,
            default=None,
            help="fit: regexes of weight names (re.search) whose input Grams are recorded (default: every trained "
            "linear layer); the others are merged by RegMean's plain mean.",
        )
        # A link into a subclass's init_args applies only when the chosen datamodule has that parameter.
        for key in TOKENIZER_PARAMS:
            parser.link_arguments("model.backbone", f"data.init_args.{key}", apply_on="parse")
        for name in ("task", "label_names", "metrics"):
            parser.link_arguments("data", f"model.{name}", compute_fn=_data_attribute(name), apply_on="instantiate")
        parser.link_arguments("data", "model.task_type", compute_fn=_task_type, apply_on="instantiate")
        parser.link_arguments("data", "model.templates", compute_fn=_templates, apply_on="instantiate")

    @override
    def before_instantiate_classes(self) -> None:
        if self._parse_only:
            raise _ParsedOnly(self.config)
        if self.subcommand != "fit":
            # Only a fit has a run worth recording; validate/test would drop config.yaml into the working folder.
            self.save_config_callback = None

    @override
    def after_instantiate_classes(self) -> None:
        folder = self._get(self.config, "task_vector_dir")
        if self.subcommand == "fit":
            from drm_lightning.callbacks.task_vector import TaskVectorCallback

            if folder is None:
                folder = str(Path(self.trainer.default_root_dir) / "task_vectors" / self.model.hparams["task"])
            examples = self._get(self.config, "statistics_examples")
            layers = self._get(self.config, "statistics_layers")
            self.trainer.callbacks.append(
                TaskVectorCallback(folder, statistics_examples=examples, statistics_layers=layers)
            )
            self._task_vector_dir = folder
        elif folder is not None:
            from drm_lightning.models.expert import ExpertModule

            self.model = ExpertModule.from_task_vector(folder, with_task_vector=True)

    def after_fit(self) -> None:
        """Say where the task vector went: the next command (merge) needs that path."""
        if self.trainer.is_global_zero:
            print(f"task vector: {self._task_vector_dir}", file=sys.stderr)


class _ParsedOnly(Exception):  # noqa: N818 - control flow, not an error
    """Carries the parsed config out of ``LightningCLI.__init__`` before anything is instantiated."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


def parse_expert_args(args: Sequence[str]) -> Namespace:
    """Parse ``fit``/``validate``/``test`` arguments exactly as ``drm-lightning`` does, links applied, building
    nothing (no model or data is loaded): what ``tests/project/test_configs.py`` checks every shipped YAML with."""
    try:
        ExpertCLI(args, parse_only=True)
    except _ParsedOnly as parsed:
        return parsed.config
    raise RuntimeError("ExpertCLI returned without parsing")  # pragma: no cover - before_instantiate_classes raises
