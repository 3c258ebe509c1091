"""Faults at an exact moment, for the fault tests: a Lightning callback that SIGKILLs its own process (named by its
class path on a ``drm-lightning fit`` command line, so it must live in an importable module, not a test module)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SigkillAt(Callback):
    """SIGKILL this process after training batch ``batch`` of epoch ``epoch``: a crash at an exact moment."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
