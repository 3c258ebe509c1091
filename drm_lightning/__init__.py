"""drm_lightning: fine-tune per-task experts with Lightning, merge them (DRM, Iso-C/CTS, TSV-M, TIES, ...), validate."""

from __future__ import annotations

import os
from typing import Any

# Idle OpenMP threads sleep instead of spinning. Why: with torch's default of one intra-op thread per core, every
# parallel region ends in a barrier where the finished threads spin (GNU OpenMP's default ACTIVE policy) for the one
# that was descheduled; on a CPU that other jobs share, that spin takes the cores the late thread needs. Measured on
# the 2-core project machine at load average 11-15: the quickstart's DRM-V merge took 307 s of matrix time with 2
# threads and 27 s with 1; with PASSIVE, 32 s with 2 threads (benchmarks/README.md). It is read once, when the
# OpenMP runtime loads with torch, so it is set here, before anything imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A process group still alive at exit is destroyed before the interpreter tears down (exit_cleanup: gloo aborts).
from drm_lightning import exit_cleanup as _exit_cleanup  # noqa: E402

_exit_cleanup.register()

__version__ = "0.1.0"
__all__ = ["load_task_model"]


def __getattr__(name: str) -> Any:
    """``drm_lightning.load_task_model`` without importing torch/transformers at ``import drm_lightning``."""
    if name == "load_task_model":
        from drm_lightning.export.task_model import load_task_model

        return load_task_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
