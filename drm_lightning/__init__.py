"""drm_lightning: fine-tune per-task experts with Lightning, merge them (DRM, Iso-C/CTS, TSV-M, TIES, ...), validate."""

from __future__ import annotations

import os
from typing import Any

# Idle OpenMP threads spin only briefly, then sleep. Why: with torch's default of one intra-op thread per core, every
# parallel region ends in a barrier where the finished threads wait for the others. GNU OpenMP's default spins for
# 300,000 iterations: on a CPU that other jobs share, that spin takes the cores a descheduled thread needs (the
# quickstart's DRM-V merge: 307 s of matrix time with 2 threads, 27 s with 1, at load average 11-15). Sleeping at
# once (PASSIVE) fixes that but wakes a thread at every one of the thousands of short regions of a merge, which on
# an idle machine made the merges 2-3x slower. A short spin (3,000 iterations, microseconds) is as fast as spinning
# when idle and as PASSIVE under load (benchmarks/README.md "Threads"). Both are read once, when the OpenMP runtime
# loads with torch, so they are set here, before anything imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

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
