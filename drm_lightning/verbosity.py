"""What the command line lets third-party libraries print: ``quiet_third_party(verbose)``.

Why: a small ``drm-lightning pipeline`` run printed ~80 lines from Lightning, ``datasets`` and ``transformers``
(device banners, "💡 Tip" adverts, per-load progress bars and load reports, deprecation warnings about the libraries'
own internals) around the dozen that matter: our ``[pipeline]`` progress, errors and the report. Each silence below is
aimed at one named logger, one progress-bar switch or one known warning (by message, category and emitting module),
so a new warning, any error and anything drm_lightning itself logs or warns still shows. ``drm-lightning --debug``
or ``DRM_LIGHTNING_VERBOSE=1`` calls ``quiet_third_party(verbose=True)``, which undoes all of it.

Lightning's training progress bar and model summary are left to the Trainer's ``enable_progress_bar`` /
``enable_model_summary`` (the recipes set them). Importing this module is light: datasets is imported only when
quieted, and transformers never for it (an import hook switches it the moment something else imports it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

VERBOSE_ENV = "DRM_LIGHTNING_VERBOSE"

#: Where ``rank_zero_info`` logs (the logger in use depends on which of Lightning's packages was imported last).
#: Lightning's own info lines there are banners: "GPU available: ...", "TPU available: ...", "HPU available: ...",
#: the "💡 Tip: ... litlogger / litmodels" adverts, "Loading `train_dataloader` to estimate number of stepping
#: batches.", "`Trainer.fit` stopped: `max_epochs=1` reached.". drm_lightning logs its own progress through the same
#: function ("evaluating 4 expert(s) on validation", λ search steps), so only records from outside our package go.
RANK_ZERO_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)

#: Loggers whose info lines are per-run banners, raised to WARNING: logger -> the line it prints.
BANNER_LOGGERS: dict[str, str] = {
    "lightning.fabric.utilities.seed": "Seed set to 0",
    "lightning.pytorch.accelerators.cuda": "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]",
    "lightning.fabric.utilities.distributed": "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2",
}


@dataclass(frozen=True)
class KnownWarning:
    """One third-party warning we hide: its message (regex, matched at the start), category and emitting module."""

    message: str
    category: type[Warning]
    module: str

    def entry(self) -> tuple:
        """The ``warnings.filters`` entry ``filterwarnings("ignore", ...)`` adds for this warning (to find it again)."""
        return ("ignore", re.compile(self.message, re.I), self.category, re.compile(self.module), 0)


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    # torch deprecated LeafSpec; Lightning's own _pytree still builds one in every fit/validate/test.
    KnownWarning(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree\Z"
    ),
    # peft reads transformers' deprecated alias whenever it wraps a model with LoRA.
    KnownWarning(r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils\Z"),
)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoOnly(logging.Filter):
    """Passes warnings and errors, and info lines logged from drm_lightning's own code; drops Lightning's banners."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


_RANK_ZERO_FILTER = _OwnInfoOnly()


@dataclass
class _Saved:
    """What quiet mode changed, so that ``verbose=True`` puts it back exactly."""

    levels: dict[str, int] = field(default_factory=dict)
    transformers: tuple[int, bool] | None = None  # (verbosity, progress bars enabled)
    datasets_bars: bool | None = None  # progress bars enabled


_saved: _Saved | None = None


#: The libraries ``quiet_third_party`` switches by default (importing them).
LIBRARIES: tuple[str, ...] = ("transformers", "datasets")


def quiet_third_party(verbose: bool, *, libraries: Collection[str] = LIBRARIES) -> None:
    """Quiet (``verbose=False``) or restore (``verbose=True``) third-party logging, warnings and progress bars.

    Idempotent both ways: quieting twice adds nothing twice, and restoring puts back the levels and switches seen
    before the first quieting (restoring when nothing was quieted changes nothing). Why restorable: ``cli.main`` runs
    in-process in tests and notebooks, where ``--debug`` after a quiet run must bring everything back.

    Args:
        verbose: ``True`` for everything the libraries print (``--debug``, ``DRM_LIGHTNING_VERBOSE=1``).
        libraries: which of ``LIBRARIES`` to switch (verbosity, progress bars); one already imported is switched
            either way. transformers is never imported for it: if it is not yet, it is switched the moment it is
            (``_AfterImport``); datasets is imported. Why: importing them costs seconds, so ``cli.main`` passes
            none before a command's arguments are parsed (``--help`` and a malformed command line answer without
            them), then those the command uses (a merge without ``--tasks`` never loads datasets).
    """
    if verbose:
        _restore()
    else:
        _quiet(libraries)


def _quiet(libraries: Collection[str]) -> None:
    global _saved
    saved = _saved if _saved is not None else _Saved()
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_RANK_ZERO_FILTER)  # addFilter skips a filter already there
    for name in BANNER_LOGGERS:
        logger = logging.getLogger(name)
        saved.levels.setdefault(name, logger.level)
        logger.setLevel(max(saved.levels[name], logging.WARNING))
    for known in KNOWN_WARNINGS:  # filterwarnings removes an equal entry before inserting, so no duplicates
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)

    _saved = saved
    if HF_LOGGING in sys.modules:
        _quiet_transformers()
    elif "transformers" in libraries and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(HF_LOGGING, _quiet_transformers))  # quieted when first imported
    if "datasets" in libraries or "datasets" in sys.modules:
        import datasets

        if saved.datasets_bars is None:
            saved.datasets_bars = datasets.is_progress_bar_enabled()
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()  # "Generating train split", "Map", "Filter"


def _restore() -> None:
    global _saved
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).removeFilter(_RANK_ZERO_FILTER)
    for known in KNOWN_WARNINGS:
        # Removing an "ignore" entry needs no cache reset: warnings only caches what it showed, never what it ignored.
        entry = known.entry()
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]
    saved, _saved = _saved, None
    if saved is None:
        return
    for name, level in saved.levels.items():
        logging.getLogger(name).setLevel(level)
    if saved.transformers is not None:
        from transformers.utils import logging as hf_logging

        verbosity, bars = saved.transformers
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if saved.datasets_bars:
        import datasets

        datasets.enable_progress_bars()


#: transformers' logging module: what quieting transformers switches (verbosity, progress bars).
HF_LOGGING = "transformers.utils.logging"


def _quiet_transformers() -> None:
    """transformers' per-load "LOAD REPORT" (e.g. the pooler dropped on purpose) and "Loading weights" bars off (which
    also switches off huggingface_hub's), the settings before saved once for ``_restore``."""
    from transformers.utils import logging as hf_logging

    if _saved is None:  # restored meanwhile
        return
    if _saved.transformers is None:
        _saved.transformers = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: ``then()`` runs right after module ``name`` first executes.

    Why: quieting transformers by importing it cost ~0.5 s of every command, though a merge of task vectors into
    a base stored as its backbone never builds a model; its switches are set the moment something imports it.
    """

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]  # one shot, and not found again below
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    """``loader`` that calls ``then()`` once the module executed (everything else passed through)."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[], None]) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._then()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)
