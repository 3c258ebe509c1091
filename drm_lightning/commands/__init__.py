"""The ``merge``, ``evaluate``, ``extract`` and ``pipeline`` subcommands of ``drm-lightning``: typed functions and
their parsers.

Why typed functions: jsonargparse turns each signature into options and each Google-style docstring into
``--help`` (litgpt's pattern), and the same function is callable from Python. ``build_parser(name)`` gives the
parser alone, which is what ``tests/test_configs.py`` uses to check every shipped YAML against the real signatures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

PROG = "drm-lightning"


def _functions() -> dict[str, Callable[..., Any]]:
    from drm_lightning.commands.evaluate import evaluate
    from drm_lightning.commands.extract import extract
    from drm_lightning.commands.merge import merge

    return {"merge": merge, "evaluate": evaluate, "extract": extract}


def build_parser(name: str) -> ArgumentParser:
    """The parser of subcommand ``name`` (``merge``, ``evaluate`` or ``pipeline``)."""
    if name == "pipeline":
        from drm_lightning.commands.pipeline import build_pipeline_parser

        return build_pipeline_parser()
    functions = _functions()
    if name not in functions:
        raise ValueError(f"command {name!r}: expected one of {sorted([*functions, 'pipeline'])}")
    fn = functions[name]
    parser = ArgumentParser(prog=f"{PROG} {name}", exit_on_error=False, description=(fn.__doc__ or "").split("\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_function_arguments(fn, as_group=False)
    return parser


def parse(name: str, args: Sequence[str]) -> Namespace:
    """Parse a subcommand's command line (``--config`` files included) into a checked namespace."""
    return build_parser(name).parse_args(list(args))


def run(name: str, args: Sequence[str]) -> Any:
    """Parse ``args`` for subcommand ``name`` and run it."""
    if name == "pipeline":
        from drm_lightning.commands.pipeline import run_pipeline

        return run_pipeline(list(args))
    parser = build_parser(name)
    config = parser.parse_args(list(args))
    kwargs = parser.instantiate_classes(config).as_dict()
    kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    return _functions()[name](**kwargs)


COMMANDS: dict[str, Callable[[Sequence[str]], Any]] = {
    name: (lambda args, _name=name: run(_name, args)) for name in ("merge", "evaluate", "extract", "pipeline")
}
