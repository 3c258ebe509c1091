"""The ``merge``, ``evaluate``, ``extract`` and ``pipeline`` subcommands of ``drm-lightning``: typed functions and
their parsers.

Why typed functions: jsonargparse turns each signature into options and each Google-style docstring into
``--help`` (litgpt's pattern), and the same function is callable from Python. ``build_parser(name)`` gives the
parser alone, which is what ``tests/project/test_configs.py`` uses to check every shipped YAML against the real
signatures.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

PROG = "drm-lightning"


#: The typed-function subcommands: name -> (module, function). Each is imported only when its command runs, so one
#: command's parser never pays for another's imports.
_FUNCTIONS: dict[str, tuple[str, str]] = {
    "merge": ("drm_lightning.commands.merge", "merge"),
    "evaluate": ("drm_lightning.commands.evaluate", "evaluate"),
    "extract": ("drm_lightning.commands.extract", "extract"),
    "statistics": ("drm_lightning.commands.statistics", "statistics"),
}


def _function(name: str) -> Callable[..., Any]:
    if name not in _FUNCTIONS:
        raise ValueError(f"command {name!r}: expected one of {sorted([*_FUNCTIONS, 'pipeline'])}")
    module, attr = _FUNCTIONS[name]
    return getattr(importlib.import_module(module), attr)


def build_parser(name: str) -> ArgumentParser:
    """The parser of subcommand ``name`` (``merge``, ``evaluate`` or ``pipeline``)."""
    if name == "pipeline":
        from drm_lightning.commands.pipeline_recipe import build_pipeline_parser

        return build_pipeline_parser()
    fn = _function(name)
    parser = ArgumentParser(prog=f"{PROG} {name}", exit_on_error=False, description=(fn.__doc__ or "").split("\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_function_arguments(fn, as_group=False)
    return parser


def parse(name: str, args: Sequence[str]) -> Namespace:
    """Parse a subcommand's command line (``--config`` files included) into a checked namespace."""
    return build_parser(name).parse_args(list(args))


def libraries_used(name: str, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The third-party libraries whose output command ``name`` may show: transformers always, datasets where it loads
    task data (every command but a merge without ``--tasks``)."""
    return ("transformers",) if name == "merge" and not kwargs.get("tasks") else ("transformers", "datasets")


def run(name: str, args: Sequence[str], prepare: Callable[[tuple[str, ...]], None] | None = None) -> Any:
    """Parse ``args`` for subcommand ``name`` and run it; ``prepare(libraries_used(...))`` is called once they parsed,
    before the command runs (``cli.main`` quiets the libraries there, so a malformed command line never imports
    them, and a merge never imports datasets)."""
    if name == "pipeline":  # parsed before the pipeline's modules (Lightning) load: --help answers at once
        from drm_lightning.commands.pipeline_recipe import load_recipe, parse_pipeline_args

        config = parse_pipeline_args(args)
        if prepare is not None:
            prepare(libraries_used(name, {}))
        from drm_lightning.commands.pipeline import run_recipe

        return run_recipe(load_recipe(config))
    parser = build_parser(name)
    config = parser.parse_args(list(args))
    kwargs = parser.instantiate_classes(config).as_dict()
    kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    if prepare is not None:
        prepare(libraries_used(name, kwargs))
    return _function(name)(**kwargs)
