"""``drm-lightning``: the project's one command line.

::

    drm-lightning fit --config configs/model/minilm.yaml --config configs/task/rotten_tomatoes.yaml \\
        --config configs/trainer/cpu.yaml                        # one expert; writes its task vector at the end
    drm-lightning test ... --task_vector_dir task_vectors/rotten_tomatoes     # that expert on its test split
    drm-lightning merge --config configs/merge/drm_v.yaml --task_vectors [tv/a,tv/b] --output merged/drm_v
    drm-lightning evaluate --model merged/drm_v --task_vectors [tv/a,tv/b] --tasks [configs/task/a.yaml,...]
    drm-lightning pipeline --config recipes/quickstart.yaml      # fit every expert, merge, search λ, report

Why a small dispatcher in front: ``fit``/``validate``/``test`` are Lightning's own subcommands and belong to a
``LightningCLI`` (``drm_lightning.commands.expert.ExpertCLI``: model, datamodule and trainer from repeated
``--config``), while ``merge``/``evaluate``/``pipeline`` are plain typed functions (``drm_lightning.commands``) whose
docstrings become ``--help``. Both are parsed by jsonargparse, so every YAML key is checked against a real
signature. This module imports nothing heavy, so ``drm-lightning --help`` answers at once.

Errors: bad input (a ``ValueError`` such as ``TaskVectorError``, a malformed command line, an ``OSError`` such as a
missing file or a full disk, a pickle that ``torch.load(weights_only=True)`` refuses) prints one line
``drm-lightning: error: <message>`` on stderr, naming the file where known, and exits with status 1; ``--debug``
(anywhere on the line) or ``DRM_LIGHTNING_DEBUG=1`` shows the traceback instead. Programming errors (``TypeError``,
``AttributeError``, ...) always keep their traceback.

Output: our own progress lines, warnings, errors and results only; the libraries' banners, tips, progress bars and
known deprecation warnings are quieted (``drm_lightning.verbosity``). ``--debug`` or ``DRM_LIGHTNING_VERBOSE=1``
shows all of it again.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Callable, Sequence
from pickle import UnpicklingError  # the exception only: nothing here unpickles

from drm_lightning.exit_cleanup import has_process_group, leave_process_group, leave_rank_watch
from drm_lightning.verbosity import LIBRARIES, VERBOSE_ENV, quiet_third_party

PROG = "drm-lightning"
LIGHTNING_COMMANDS = ("fit", "validate", "test")
FUNCTION_COMMANDS = ("merge", "evaluate", "extract", "statistics", "pipeline")
DEBUG_ENV = "DRM_LIGHTNING_DEBUG"

#: Exceptions that mean "the input was wrong", reported as one line; anything else is a bug and keeps its traceback.
#: (jsonargparse's ``ArgumentError``, a malformed command line or config, is added where it is imported.)
#: ``OSError`` covers missing files, permissions and a full disk (ENOSPC): the environment, not the code, is at fault.
#: ``UnpicklingError`` is what ``torch.load(weights_only=True)`` raises for an unsafe checkpoint.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, UnpicklingError)

#: Local names under which the frames between us and ``torch.load`` hold the path being loaded (torch's ``f``,
#: Lightning's ``path_or_url`` / ``checkpoint_path``), innermost first: the file a refused pickle came from.
_LOAD_PATH_NAMES = ("f", "path_or_url", "checkpoint_path", "ckpt_path")

_SUMMARY = {
    "fit": "fine-tune one expert (LightningCLI); its task vector is written when fitting ends",
    "validate": "validate one expert (--task_vector_dir loads a fitted one)",
    "test": "test one expert (--task_vector_dir loads a fitted one)",
    "merge": "merge task vectors into one model (drm_v, drm_h, iso_c, iso_cts, tsv_m, ties, dare, ...)",
    "evaluate": "metrics of a model (merged or pretrained) under every task's head",
    "extract": "a fine-tuned transformers model or a PEFT LoRA adapter -> a task vector folder",
    "statistics": "add the input statistics RegMean merges by to a task vector made elsewhere",
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
        f"  --debug     show tracebacks for errors and the libraries' own output (or set {DEBUG_ENV}=1)",
        "",
        f"{VERBOSE_ENV}=1 shows the libraries' own output (Lightning, transformers, datasets) without --debug.",
        "",
        f"Run '{PROG} <command> --help' for a command's options.",
    ]
    return "\n".join(lines)


def _loaded_path(err: BaseException) -> str | None:
    """The path a failed ``torch.load`` was reading, found in the traceback's frames (innermost first).

    Why: torch's "Weights only load failed" message does not name the file, and the loader (Lightning's checkpoint
    connector) is not ours to wrap; the frames still hold the path.
    """
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _LOAD_PATH_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, str | os.PathLike):
                return os.fspath(value)
    return None


def _one_line(err: BaseException) -> str:
    """An exception as one line: nested jsonargparse messages are joined, whitespace collapsed.

    An ``OSError`` keeps its errno text and file name (``str`` drops them when built from a message alone); a refused
    pickle names the file it came from.
    """
    text = " ".join(str(err).split())
    if isinstance(err, OSError):
        if err.strerror and err.strerror not in text:
            text = f"{err.strerror}: {text}" if text else err.strerror
        if err.filename is not None and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
    elif isinstance(err, UnpicklingError):
        path = _loaded_path(err)
        head = f"refused to load {path} (not a weights-only checkpoint)" if path else "refused to unpickle"
        text = f"{head}: {text}"
    return text or type(err).__name__


#: A key of a YAML flow mapping written without the space YAML needs after its colon (``{density:0.2}``).
_TIGHT_KEY = re.compile(r"([{,]\s*)([A-Za-z_][\w.]*):(?=[^\s/])")


def spaced_flow_mappings(args: Sequence[str]) -> list[str]:
    """``args`` with every flow-mapping value (``{...}``, alone or after ``--key=``) given a space after each key's
    colon: ``--params {density:0.2}`` as ``{density: 0.2}``.

    Why: one types JSON-like ``{key:value}``, but YAML reads ``density:0.2`` as one plain string (a key without a
    value), and the parser then refused ``params`` with a Union error about ``str``. A colon followed by ``/`` (a
    URL, ``C:/``) or already by a space is left alone.
    """
    out = []
    for arg in args:
        head, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if value.startswith("{") and value.endswith("}"):
            value = _TIGHT_KEY.sub(r"\1\2: ", value)
        out.append(f"{head}{sep}{value}")
    return out


def _run(command: str, args: list[str], quiet: Callable[..., None]) -> None:
    """Run one subcommand; ``quiet(libraries)`` (the libraries' verbosity) is called once its arguments parsed, with
    the libraries it uses, or at once for Lightning's commands, which import every library anyway."""
    args = spaced_flow_mappings(args)
    if command in LIGHTNING_COMMANDS:
        from drm_lightning.commands.expert import ExpertCLI

        quiet()
        ExpertCLI([command, *args])
    elif command in FUNCTION_COMMANDS:
        from drm_lightning.commands import run

        run(command, args, prepare=quiet)
    else:
        raise ValueError(f"unknown command {command!r}; expected one of {', '.join(_SUMMARY)}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from jsonargparse import ArgumentError

    return (*USER_ERRORS, ArgumentError)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def main(args: Sequence[str] | None = None) -> int:
    """Run ``drm-lightning`` with ``args`` (default ``sys.argv[1:]``); return the exit status.

    Why return instead of exit: tests call ``main([...])`` in-process and check the status; the console script
    wrapper passes the return value to ``sys.exit``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = _env_flag(DEBUG_ENV)
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
    had_group = has_process_group()
    verbose = debug or _env_flag(VERBOSE_ENV)
    ended: str | None = "an exception"  # what the other ranks hear of a traceback (a bug, --debug)
    line: str | None = None
    try:
        if command in _SUMMARY:  # loggers and warnings now; transformers and datasets once the arguments parsed
            quiet_third_party(verbose=verbose, libraries=())
        _run(command, rest, lambda libraries=LIBRARIES: quiet_third_party(verbose=verbose, libraries=libraries))
        ended = None
    except SystemExit as exc:  # --help / --print_config exit 0 from inside the parser
        code = exc.code
        ended = None
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as err:
        if debug or not isinstance(err, _user_errors()):
            raise
        ended = line = _one_line(err)
        return 1
    finally:
        _tell_other_ranks(ended)
        if line is not None:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        if not had_group:  # the command's own group: gone before the interpreter exits
            leave_process_group()
        if args is None:
            # The console script (or python -m): the process ends with the command, so every object left is moved
            # out of the collector's sight. Why: the interpreter's teardown otherwise traverses the hundreds of
            # thousands of objects torch and transformers' model classes made, about 1 s of a tiny merge's wall
            # (benchmarks/README.md). Not for main([...]) in-process (tests, notebooks): a frozen object that later
            # becomes cyclic garbage is never freed.
            gc.freeze()
    return 0


def _tell_other_ranks(ended: str | None) -> None:
    """The other launched ranks (``drm_lightning.world``'s watch) hear how this one ended; a rank that fails before
    it met them reaches their rendezvous store to say so (torch is imported for it only then)."""
    launched = any(os.environ.get(k, "1").isdigit() and int(os.environ.get(k, "1")) > 1
                   for k in ("WORLD_SIZE", "SLURM_NTASKS"))  # fmt: skip
    if ended is not None and launched:
        from drm_lightning.world import leave_watch

        leave_watch(ended)
    leave_rank_watch(ended)


if __name__ == "__main__":  # python -m drm_lightning.cli (what torchrun launches)
    sys.exit(main())
