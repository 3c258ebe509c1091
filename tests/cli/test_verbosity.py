"""What ``drm-lightning`` lets the libraries print: quiet by default, everything with ``--debug`` or
``DRM_LIGHTNING_VERBOSE=1`` (``drm_lightning.verbosity``).

One end-to-end table: a tiny LoRA ``fit`` (the command whose run shows every known kind of noise) runs once per mode
in a subprocess, the two side by side to keep the suite fast (each costs ~5 s of imports); by default its stderr must
be our one line and nothing else. ``--debug`` reaches the same ``quiet_third_party(verbose=True)`` as
``DRM_LIGHTNING_VERBOSE=1``, which the table of how ``main()`` picks the mode checks without a third process. Then
in-process tables of ``quiet_third_party``: logger levels and library switches set and restored, Lightning's
banners dropped while drm_lightning's own log lines and warnings pass, known warnings hidden only where they come from.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import drm_lightning
from drm_lightning import cli
from drm_lightning.verbosity import (
    BANNER_LOGGERS,
    KNOWN_WARNINGS,
    LIBRARIES,
    RANK_ZERO_LOGGERS,
    VERBOSE_ENV,
    quiet_third_party,
)
from tests.helpers.recipes import QUIET_TRAINER
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import write_tiny_tasks

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(drm_lightning.__file__).resolve().parent

#: (what prints it, a piece of the line): every line a quiet ``fit`` must not print and a verbose one does.
NOISE = [
    ("lightning seed", "Seed set to 0"),
    ("lightning device banner", "GPU available:"),
    ("lightning device banner", "TPU available:"),
    ("lightning tip", "💡 Tip: For seamless cloud logging"),
    ("lightning tip", "💡 Tip: For seamless cloud uploads"),
    ("lightning info", "Loading `train_dataloader` to estimate number of stepping batches"),
    ("lightning info", "`Trainer.fit` stopped: `max_epochs=1` reached"),
    ("torch/lightning deprecation", "`isinstance(treespec, LeafSpec)` is deprecated"),
    ("transformers/peft deprecation", "`is_gradient_checkpointing` is deprecated"),
    ("transformers progress bar", "Loading weights"),
    ("transformers load report", "LOAD REPORT"),
    ("datasets progress bar", "Generating train split"),
]

#: mode -> (extra environment, whether the libraries' output shows).
MODES: dict[str, tuple[dict[str, str], bool]] = {
    "default": ({}, False),
    "verbose env": ({VERBOSE_ENV: "1"}, True),
}


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """One tiny LoRA ``fit`` per mode, run side by side: mode -> (finished process, its task vector folder)."""
    tmp = tmp_path_factory.mktemp("verbosity")
    backbone = make_tiny_model("encoder", tmp / "bert")  # saved with a pooler that the encoder family drops
    task = write_tiny_tasks(tmp / "data", sizes=(16, 8, 8))["sentiment"]
    model = tmp / "lora.yaml"
    lora = {"r": 4, "target_modules": ["query", "value"]}
    model.write_text(json.dumps({"model": {"backbone": backbone, "pooling": "mean", "lora": lora}}))
    base_env = {k: v for k, v in os.environ.items() if k not in ("DRM_LIGHTNING_DEBUG", VERBOSE_ENV)}
    base_env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {}
    for i, (mode, (env, _)) in enumerate(MODES.items()):
        out = tmp / f"run{i}"
        args = [sys.executable, "-m", "drm_lightning.cli", "fit", "--config", str(model), "--config"]
        args += [str(task), *QUIET_TRAINER, "--trainer.enable_checkpointing=true", "--trainer.max_epochs=1"]
        args += [f"--trainer.default_root_dir={out}", f"--task_vector_dir={out / 'tv'}"]
        env = base_env | env | {"HF_DATASETS_CACHE": str(out / "hf_datasets")}  # a fresh cache: splits get built
        proc = subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[mode] = (proc, args, out / "tv")
    runs = {}
    for mode, (proc, args, tv) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[mode] = (subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), tv)
    return runs


@pytest.mark.parametrize("mode", MODES)
def test_fit_prints_our_line_in_every_mode(fit_runs: dict, mode: str) -> None:
    done, tv = fit_runs[mode]
    assert done.returncode == 0, done.stderr
    assert (tv / "meta.json").is_file()
    assert f"task vector: {tv}" in done.stderr.splitlines()


def test_quiet_fit_prints_only_our_line(fit_runs: dict) -> None:
    done, tv = fit_runs["default"]
    assert [line for line in done.stderr.splitlines() if line.strip()] == [f"task vector: {tv}"], done.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("source", "text"), NOISE)
def test_library_output_follows_the_mode(fit_runs: dict, mode: str, source: str, text: str) -> None:
    done, _ = fit_runs[mode]
    shows = MODES[mode][1]
    assert (text in done.stderr) == shows, f"{source} line {text!r} {'missing' if shows else 'shown'} ({mode})"


# --- in-process: quiet_third_party itself ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    """Every test starts and ends with the libraries' own settings, whatever an earlier ``main()`` call left."""
    quiet_third_party(verbose=True)
    yield
    quiet_third_party(verbose=True)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def capture() -> Iterator[_Capture]:
    """Records what reaches the handlers of the banner loggers and the logger ``rank_zero_info`` uses."""
    import lightning.pytorch  # noqa: F401  (points rank_zero_info at Lightning's logger, as in any real run)
    import lightning_utilities.core.rank_zero as rank_zero_module

    handler = _Capture()
    loggers = {rank_zero_module.log, *map(logging.getLogger, BANNER_LOGGERS)}
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.parametrize("name", list(BANNER_LOGGERS))
@pytest.mark.parametrize(
    ("before", "quiet"),
    [
        (logging.NOTSET, logging.WARNING),
        (logging.INFO, logging.WARNING),
        (7, logging.WARNING),
        (logging.ERROR, logging.ERROR),
    ],
)
def test_banner_logger_levels_are_set_and_restored(name: str, before: int, quiet: int) -> None:
    logger = logging.getLogger(name)
    original = logger.level
    try:
        logger.setLevel(before)
        quiet_third_party(verbose=False)
        quiet_third_party(verbose=False)  # idempotent: the level seen first is the one restored
        assert logger.level == quiet
        quiet_third_party(verbose=True)
        assert logger.level == before
        quiet_third_party(verbose=True)
        assert logger.level == before
    finally:
        logger.setLevel(original)


def test_restoring_without_quieting_changes_nothing() -> None:
    levels = {name: logging.getLogger(name).level for name in BANNER_LOGGERS}
    filters = list(warnings.filters)
    quiet_third_party(verbose=True)
    assert {name: logging.getLogger(name).level for name in BANNER_LOGGERS} == levels
    assert warnings.filters == filters


def test_quieting_twice_adds_each_filter_once() -> None:
    filters = {name: list(logging.getLogger(name).filters) for name in RANK_ZERO_LOGGERS}
    for _ in range(2):
        quiet_third_party(verbose=False)
    for known in KNOWN_WARNINGS:
        assert warnings.filters.count(known.entry()) == 1
    for name in RANK_ZERO_LOGGERS:
        assert len(logging.getLogger(name).filters) == len(filters[name]) + 1
    quiet_third_party(verbose=True)
    assert not any(known.entry() in warnings.filters for known in KNOWN_WARNINGS)
    assert {name: logging.getLogger(name).filters for name in RANK_ZERO_LOGGERS} == filters


def _transformers_verbosity() -> int:
    from transformers.utils import logging as hf_logging

    return hf_logging.get_verbosity()


def _transformers_bars() -> bool:
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


def _hub_bars() -> bool:
    from huggingface_hub.utils import are_progress_bars_disabled

    return not are_progress_bars_disabled()


def _datasets_bars() -> bool:
    import datasets

    return datasets.is_progress_bar_enabled()


@pytest.mark.parametrize(
    ("read", "quiet"),
    [
        (_transformers_verbosity, logging.ERROR),
        (_transformers_bars, False),
        (_hub_bars, False),
        (_datasets_bars, False),
    ],
)
def test_library_switches_are_set_and_restored(read, quiet) -> None:
    from transformers.utils import logging as hf_logging

    original = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()  # not the default, so restoring the default would not pass by chance
    try:
        before = read()
        quiet_third_party(verbose=False)
        assert read() == quiet
        quiet_third_party(verbose=True)
        assert read() == before
    finally:
        hf_logging.set_verbosity(original)


def test_real_trainer_banners_follow_the_mode(capture: _Capture) -> None:
    from lightning.fabric.utilities.seed import seed_everything
    from lightning.pytorch import Trainer

    def banners() -> list[str]:
        capture.messages.clear()
        seed_everything(0)
        Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        return list(capture.messages)

    shown = banners()
    for text in ("Seed set to 0", "GPU available:", "TPU available:", "💡 Tip"):
        assert any(text in m for m in shown), (text, shown)
    quiet_third_party(verbose=False)
    assert banners() == []
    quiet_third_party(verbose=True)
    assert banners() == shown


#: (file the call is made from, how it logs, message, whether a quiet run passes it on).
RANK_ZERO_ROWS = [
    (PACKAGE / "evaluation" / "run.py", "info", "evaluating 4 expert(s) on validation", True),
    (PACKAGE / "commands" / "pipeline_folder.py", "info", "our own progress line", True),
    ("lightning/pytorch/trainer/setup.py", "info", "GPU available: False, used: False", False),
    ("lightning/pytorch/trainer/setup.py", "warning", "a real problem", True),
    ("lightning/pytorch/trainer/setup.py", "error", "a real error", True),
    (Path(__file__), "info", "a caller outside drm_lightning", False),
]


@pytest.mark.parametrize(("origin", "how", "message", "passes"), RANK_ZERO_ROWS)
def test_rank_zero_lines_pass_when_ours_or_serious(
    capture: _Capture, origin: Path | str, how: str, message: str, passes: bool
) -> None:
    import lightning.pytorch
    import lightning_utilities.core.rank_zero as rank_zero_module
    from lightning.pytorch.utilities import rank_zero_info

    if isinstance(origin, str):
        origin = Path(lightning.pytorch.__file__).parents[2] / origin
    # The call, compiled as if written in ``origin``: rank_zero_info's stacklevel makes that the record's pathname.
    code = "rank_zero_info(message)" if how == "info" else f"log.{how}(message)"
    scope = {"rank_zero_info": rank_zero_info, "log": rank_zero_module.log, "message": message}
    for verbose, expected in ((False, passes), (True, True)):
        quiet_third_party(verbose=verbose)
        capture.messages.clear()
        exec(compile(code, str(origin), "exec"), scope)
        assert (capture.messages == [message]) == expected, (verbose, capture.messages)


_PYTREE = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
_CHECKPOINTING = "`is_gradient_checkpointing` is deprecated and will be removed in v6."

#: (message, category, module that warns, whether a quiet run hides it).
WARNING_ROWS = [
    (_PYTREE, FutureWarning, "lightning.pytorch.utilities._pytree", True),
    (_CHECKPOINTING, FutureWarning, "transformers.modeling_utils", True),
    (_PYTREE, FutureWarning, "drm_lightning.models.expert", False),  # only where the known one comes from
    (_PYTREE, FutureWarning, "lightning.pytorch.utilities._pytree_v2", False),
    (_CHECKPOINTING, UserWarning, "transformers.modeling_utils", False),  # only its category
    ("`other_thing` is deprecated", FutureWarning, "transformers.modeling_utils", False),  # only its message
    ("plots skipped: the 'matplotlib' package is not installed", UserWarning, "drm_lightning.evaluation.plots", False),
    ("generator states are of 2 ranks", UserWarning, "drm_lightning.models.checkpoint", False),
]


@pytest.mark.parametrize(("message", "category", "module", "hidden"), WARNING_ROWS)
def test_only_known_warnings_are_hidden(message: str, category: type[Warning], module: str, hidden: bool) -> None:
    def shown() -> bool:
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module, registry={})
        return len(seen) == 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # below our filters: anything they let through is recorded
        assert shown()
        quiet_third_party(verbose=False)
        assert shown() != hidden
        quiet_third_party(verbose=True)
        assert shown()


def test_our_own_warning_still_shows_when_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from drm_lightning.evaluation.plots import write_plots
    from tests.helpers.results import make_results

    quiet_third_party(verbose=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.warns(UserWarning, match="'matplotlib' package is not installed"):
        assert write_plots(make_results(), tmp_path) == []


# --- how main() picks the mode -----------------------------------------------------------------------------------


def _fake_run(command: str, rest: list[str], quiet) -> None:
    """``cli._run`` without the work: a known command quiets the libraries once its arguments parsed."""
    if command in cli._SUMMARY:
        quiet()


@pytest.mark.parametrize(
    ("args", "env", "verbose"),
    [
        (["merge"], {}, False),
        (["--debug", "merge"], {}, True),
        (["merge", "--x", "--debug"], {}, True),
        (["merge"], {"DRM_LIGHTNING_DEBUG": "1"}, True),
        (["merge"], {VERBOSE_ENV: "1"}, True),
        (["merge"], {VERBOSE_ENV: "true"}, True),
        (["merge"], {VERBOSE_ENV: "0"}, False),
        (["pipeline"], {VERBOSE_ENV: ""}, False),
        (["fit"], {}, False),
        (["frobnicate"], {}, None),  # an unknown command touches nothing
    ],
)
def test_main_picks_the_mode(
    args: list[str], env: dict[str, str], verbose: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bool, tuple[str, ...]]] = []
    monkeypatch.setattr(cli, "quiet_third_party", lambda verbose, libraries: calls.append((verbose, tuple(libraries))))
    monkeypatch.setattr(cli, "_run", _fake_run)
    for name in ("DRM_LIGHTNING_DEBUG", VERBOSE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(args) == 0
    # loggers first, without importing transformers/datasets; the libraries too once the arguments parsed
    assert calls == ([] if verbose is None else [(verbose, ()), (verbose, LIBRARIES)])


_DEFERRED = """
import logging, sys
from drm_lightning.verbosity import quiet_third_party
quiet_third_party(False)
assert "transformers" not in sys.modules
if sys.argv[1] == "restore-first":
    quiet_third_party(True)
from transformers.utils import logging as hf_logging
print(hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
quiet_third_party(True)
print(hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
"""


@pytest.mark.parametrize(
    ("order", "when_imported"),
    [("quiet-then-import", f"{logging.ERROR} False"), ("restore-first", f"{logging.WARNING} True")],
)
def test_transformers_is_quieted_when_imported_not_imported_to_quiet_it(order: str, when_imported: str) -> None:
    """In a fresh interpreter: quieting does not import transformers; the first import of it is quiet (or, restored
    before it came, as transformers' own defaults), and restoring gives the defaults back."""
    done = subprocess.run([sys.executable, "-c", _DEFERRED, order], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [when_imported, f"{logging.WARNING} True"]
