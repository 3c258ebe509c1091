"""``drm-lightning``: the project's one command line.

::

    drm-lightning fit --config configs/model/minilm.yaml --config configs/task/rotten_tomatoes.yaml \\
        --config configs/trainer/cpu.yaml                        # one expert; writes its task vector at the end
    drm-lightning test ... --task_vector_dir task_vectors/rotten_tomatoes     # that expert on its test split
    drm-lightning merge --config configs/merge/drm_v.yaml --task_vectors [tv/a,tv/b] --output merged/drm_v
    drm-lightning evaluate --model merged/drm_v --task_vectors [tv/a,tv/b] --tasks [configs/task/a.yaml,...]
    drm-lightning pipeline --config recipes/quickstart.yaml      # fit every expert, merge, search λ, report

Why a small dispatcher in front: ``fit``/``validate``/``test`` are Lightning's own subcommands and belong to a
``LightningCLI`` (model, datamodule and trainer from repeated ``--config``), while ``merge``/``evaluate``/``pipeline``
are plain typed functions (``drm_lightning.commands``) whose docstrings become ``--help``. Both are parsed by
jsonargparse, so every YAML key is checked against a real signature.

Errors: bad input (a ``ValueError`` such as ``TaskVectorError``, a missing file, a malformed command line) prints
one line ``drm-lightning: error: <message>`` on stderr and exits with status 1; ``--debug`` (anywhere on the line)
or ``DRM_LIGHTNING_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from drm_lightning.commands.tasks import TOKENIZER_PARAMS

PROG = "drm-lightning"
LIGHTNING_COMMANDS = ("fit", "validate", "test")
FUNCTION_COMMANDS = ("merge", "evaluate", "pipeline")
DEBUG_ENV = "DRM_LIGHTNING_DEBUG"

#: Exceptions that mean "the input was wrong", reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    ArgumentError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

_SUMMARY = {
    "fit": "fine-tune one expert (LightningCLI); its task vector is written when fitting ends",
    "validate": "validate one expert (--task_vector_dir loads a fitted one)",
    "test": "test one expert (--task_vector_dir loads a fitted one)",
    "merge": "merge task vectors into one model (drm_v, drm_h, iso_c, iso_cts, tsv_m, ties, dare, ...)",
    "evaluate": "metrics of a model (merged or pretrained) under every task's head",
    "pipeline": "run a recipe: fit missing experts, merge with each method, choose λ, test, report",
}


def _top_help() -> str:
    width = max(map(len, _SUMMARY))
    lines = [
        f"usage: {PROG} [--debug] {{{','.join(_SUMMARY)}}} ...",
        "",
        "Fine-tune experts with Lightning, merge their task vectors, validate the merged models.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in _SUMMARY.items()),
        "",
        "options:",
        "  -h, --help  show this message",
        "  --version   print the version",
        f"  --debug     show tracebacks for errors (or set {DEBUG_ENV}=1)",
        "",
        f"Run '{PROG} <command> --help' for a command's options.",
    ]
    return "\n".join(lines)


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


class ExpertCLI(LightningCLI):
    """``fit`` / ``validate`` / ``test`` of one expert: ``ExpertModule`` + any ``LightningDataModule`` + ``Trainer``.

    Wiring (``link_arguments``, so each value is given once): ``model.backbone`` is the datamodule's tokenizer (or
    image processor); the datamodule's ``task``, ``label_names`` and ``metrics`` become the model's. ``fit`` adds a
    ``TaskVectorCallback`` that writes ``--task_vector_dir`` (default ``<default_root_dir>/task_vectors/<task>``);
    ``validate``/``test`` with ``--task_vector_dir`` evaluate the expert stored there instead of a fresh model.
    """

    def __init__(self, args: Sequence[str]) -> None:
        from drm_lightning.models.expert import ExpertModule

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
        # A link into a subclass's init_args applies only when the chosen datamodule has that parameter.
        for key in TOKENIZER_PARAMS:
            parser.link_arguments("model.backbone", f"data.init_args.{key}", apply_on="parse")
        for name in ("task", "label_names", "metrics"):
            parser.link_arguments("data", f"model.{name}", compute_fn=_data_attribute(name), apply_on="instantiate")

    @override
    def after_instantiate_classes(self) -> None:
        folder = self._get(self.config, "task_vector_dir")
        if self.subcommand == "fit":
            from drm_lightning.task_vectors.callback import TaskVectorCallback

            if folder is None:
                folder = str(Path(self.trainer.default_root_dir) / "task_vectors" / self.model.hparams["task"])
            self.trainer.callbacks.append(TaskVectorCallback(folder))
            self._task_vector_dir = folder
        elif folder is not None:
            from drm_lightning.models.expert import ExpertModule

            self.model = ExpertModule.from_task_vector(folder, with_task_vector=True)

    def after_fit(self) -> None:
        """Say where the task vector went: the next command (merge) needs that path."""
        if self.trainer.is_global_zero:
            print(f"task vector: {self._task_vector_dir}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    """An exception as one line: nested jsonargparse messages are joined, whitespace collapsed."""
    text = " ".join(str(err).split())
    if isinstance(err, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        if err.filename is not None and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
    return text or type(err).__name__


def _run_function_command(name: str, args: list[str]) -> None:
    from drm_lightning.commands import COMMANDS

    COMMANDS[name](args)


def main(args: Sequence[str] | None = None) -> int:
    """Run ``drm-lightning`` with ``args`` (default ``sys.argv[1:]``); return the exit status.

    Why return instead of exit: tests call ``main([...])`` in-process and check the status; the console script
    wrapper passes the return value to ``sys.exit``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    if "--debug" in argv:
        debug = True
        argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 1
    if argv[0] == "--version":
        from drm_lightning import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_COMMANDS:
            ExpertCLI([command, *rest])
        elif command in FUNCTION_COMMANDS:
            _run_function_command(command, rest)
        else:
            raise ValueError(f"unknown command {command!r}; expected one of {', '.join(_SUMMARY)}")
    except SystemExit as exc:  # --help / --print_config exit 0 from inside the parser
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m drm_lightning.cli (what torchrun launches)
    sys.exit(main())
