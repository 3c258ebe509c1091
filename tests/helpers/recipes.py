"""Recipes and CLI fits as the tests build them: one quiet CPU trainer block, one way to write and run each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drm_lightning.io.task_vector import TaskVectorMeta, read_meta

#: A recipe's ``trainer`` for tests: CPU, no logger, checkpoints, progress bar, summary or validation loop.
QUIET_CPU_TRAINER: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                                     "enable_progress_bar": False, "enable_model_summary": False,
                                     "limit_val_batches": 0}  # fmt: skip
#: The same for ``drm-lightning fit/validate/test`` on the command line (validation left on).
QUIET_TRAINER: list[str] = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
                            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                            "--trainer.enable_model_summary=false"]  # fmt: skip


def write_recipe(tmp: Path, recipe: dict[str, Any]) -> Path:
    """``tmp/recipe.yaml`` holding ``recipe`` (JSON is YAML), opened by the command that runs it."""
    path = tmp / "recipe.yaml"
    path.write_text("# drm-lightning pipeline --config recipe.yaml\n" + json.dumps(recipe))
    return path


def run_recipe(tmp: Path, recipe: dict[str, Any]) -> Path:
    """Write ``recipe`` and run it in this process (``drm-lightning pipeline``); its run folder."""
    from drm_lightning.cli import main

    assert main(["pipeline", "--config", str(write_recipe(tmp, recipe))]) == 0
    return Path(recipe["run_dir"])


def tiny_two_task_recipe(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """The tiny encoder on ``write_tiny_tasks``' two tasks of odd split sizes (48/15/15: ranks must not pad them),
    two epochs each; ``overrides`` replace top-level keys (``methods``, ``run_dir``...)."""
    from tests.helpers.tiny_models import make_tiny_model
    from tests.helpers.tiny_tasks import write_tiny_tasks

    backbone = make_tiny_model("encoder", tmp / "tiny_bert")
    tasks = write_tiny_tasks(tmp / "data", sizes=(48, 15, 15))
    recipe = {
        "run_dir": str(tmp / "run"),
        "tasks": [str(tasks["sentiment"]), str(tasks["animal"])],
        "data": {"max_length": 12, "batch_size": 8, "eval_batch_size": 32},
        "model": {"backbone": backbone, "pooling": "mean", "learning_rate": 0.003, "warmup_ratio": 0.0},
        "trainer": {**QUIET_CPU_TRAINER, "devices": 1, "max_epochs": 2},
        "methods": [{"method": "drm_v", "lambdas": [0.5, 1.0]}],
        "plots": False,
    }
    return {**recipe, **overrides}


def cli_fit(tmp: Path, model: dict[str, Any], data: dict[str, Any]) -> TaskVectorMeta:
    """``drm-lightning fit`` of ``model`` on ``data`` for two steps (one validation batch), quiet, on CPU; the task
    vector's meta."""
    from drm_lightning.cli import main

    config = tmp / "fit.yaml"
    config.write_text(json.dumps({"model": model, "data": data}))
    args = ["fit", "--config", str(config), *QUIET_TRAINER, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    assert main([*args, f"--task_vector_dir={tmp / 'tv'}", f"--trainer.default_root_dir={tmp}"]) == 0
    return read_meta(tmp / "tv")
