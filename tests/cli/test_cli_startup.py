"""What each subcommand imports before it does its work: ``--help`` and a malformed command line must answer
without torch, Lightning, transformers or datasets (each costs seconds), so they answer in well under 2 s.

Run in a fresh interpreter (a subprocess): this test process has them all loaded already. Every function
subcommand is here; ``fit``/``validate``/``test`` are not: they are Lightning's own ``LightningCLI``, whose options
are the ``Trainer``'s signature, so their ``--help`` imports Lightning by design.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drm_lightning.cli import FUNCTION_COMMANDS

HEAVY = ("torch", "lightning", "transformers", "datasets")
RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")

_PROBE = """
import contextlib, io, json, sys
from drm_lightning.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main(sys.argv[2:])
print(json.dumps({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(),
                  "loaded": sorted(m for m in sys.argv[1].split(",") if m in sys.modules)}))
"""


def _probe(args: list[str]) -> dict:
    command = [sys.executable, "-c", _PROBE, ",".join(HEAVY), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


#: (command line, exit status, text it must show): --help of every function subcommand and malformed lines.
CASES = [
    (["--help"], 0, "commands:"),
    (["merge", "--help"], 0, "--task_vectors"),
    (["evaluate", "--help"], 0, "--tasks"),
    (["extract", "--help"], 0, "--adapter"),
    (["statistics", "--help"], 0, "--task_vector"),
    (["pipeline", "--help"], 0, "--methods"),
    (["merge", "--no_such_option", "1"], 1, "drm-lightning: error: "),
    (["merge", "--lam", "high"], 1, "drm-lightning: error: "),
    (["pipeline", "--no_such_option", "1"], 1, "unrecognized arguments: --no_such_option"),
    (["pipeline"], 1, "required: tasks"),
    (["pipeline", "--config", RECIPE, "--strategy", "best"], 1, 'Parser key "strategy"'),
]


@pytest.mark.parametrize(("args", "status", "says"), CASES)
def test_help_and_argument_errors_import_no_heavy_library(args: list[str], status: int, says: str) -> None:
    got = _probe(args)
    assert got["status"] == status
    assert says in got["stdout"] + got["stderr"]
    assert got["loaded"] == []


def test_every_function_subcommand_is_probed() -> None:
    """A subcommand added to the CLI gets its ``--help`` row above (the table is what keeps it light)."""
    helped = {args[0] for args, _, _ in CASES if args[1:] == ["--help"]}
    assert helped == set(FUNCTION_COMMANDS)


#: What a merge at a fixed λ never needs: validation (Lightning, datasets, torchmetrics), plots, PEFT (only an
#: adapter input or ``--save_as adapter`` would); each costs from a fraction of a second to seconds of import.
NOT_FOR_A_FIXED_LAM = ("lightning", "datasets", "torchmetrics", "matplotlib", "peft")


def test_a_fixed_lam_merge_imports_nothing_it_does_not_use(dense_tvs: list, tmp_path) -> None:
    """A merge at a fixed λ imports transformers (the backbone's loader module names its classes; a base its own
    checkpoint cannot stand for is loaded and saved through its model class), but none of ``NOT_FOR_A_FIXED_LAM``."""
    tvs, out = "[" + ",".join(map(str, dense_tvs)) + "]", str(tmp_path / "out")
    args = ["merge", "--task_vectors", tvs, "--method", "task_arithmetic", "--lam", "0.5", "--output", out]
    probed = ",".join((*NOT_FOR_A_FIXED_LAM, "transformers"))
    command = [sys.executable, "-c", _PROBE, probed, *args, "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["status"] == 0, got["stderr"]
    assert got["loaded"] == ["transformers"]


_FREEZE_PROBE = """
import contextlib, gc, io, sys
from drm_lightning.cli import main
sys.argv = ["drm-lightning", *sys.argv[2:]]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main() if {console} else main(sys.argv[1:])
print(gc.get_freeze_count())
"""


@pytest.mark.parametrize("console", [True, False], ids=["console script", "in-process main(args)"])
def test_only_the_console_script_freezes_its_objects_for_a_fast_exit(console: bool) -> None:
    """``main()`` reading ``sys.argv`` (the console script, ``python -m``) ends the process, so it freezes what is left
    (the interpreter's teardown then skips traversing it); ``main([...])`` in-process freezes nothing."""
    probe = _FREEZE_PROBE.format(console=console)
    done = subprocess.run(
        [sys.executable, "-c", probe, "x", "merge", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    frozen = int(done.stdout.splitlines()[-1])
    assert (frozen > 0) == console
