"""Seeded choice and order of a split's rows: the sub-sample, the validation carve and the per-epoch shuffle.

Why all seeded: a run must see the same rows in the same order for the same configuration, on every rank, in a
fit resumed from a checkpoint as in an uninterrupted one, and for every task the merger later evaluates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from drm_lightning.data.checks import DataError


def seeded_subset(dataset: Any, limit: int | None, seed: int) -> Any:
    """The first ``limit`` rows after a seeded shuffle (kept in source order for locality); all rows if None."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    return dataset.select(keep.tolist())


def carve_validation(dataset: Any, fraction: float, seed: int, task: str, split: str) -> tuple[Any, Any]:
    """Split ``dataset`` into disjoint (train, validation) parts, the same ones for the same seed."""
    n = len(dataset)
    n_val = math.ceil(n * fraction)
    if not 0 < n_val < n:
        raise DataError(f"task {task!r}: cannot carve val_fraction={fraction} of split {split!r} with {n} rows")
    order = np.random.default_rng(seed).permutation(n)
    return dataset.select(np.sort(order[n_val:]).tolist()), dataset.select(np.sort(order[:n_val]).tolist())


class EpochShuffleSampler(Sampler[int]):
    """A shuffle of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    Why not ``shuffle=True``: a ``RandomSampler`` draws its order from the global torch RNG, whose state a Lightning
    checkpoint does not keep, so a run resumed with ``--ckpt_path`` would replay its first epoch's order instead of
    the one an uninterrupted run sees. Lightning calls ``set_epoch`` with the restored epoch before each training
    epoch (and, under DDP, forwards it through the ``DistributedSamplerWrapper`` that shards this order), so the
    order is a pure function of the configuration. Without ``set_epoch`` every pass repeats epoch 0's order.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (called by Lightning at the start of every training epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes the pair, so (seed, epoch) and (seed + 1, epoch - 1) give unrelated orders.
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples
