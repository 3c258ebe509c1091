"""``drm-lightning statistics``: record the input statistics RegMean needs for a task vector made elsewhere.

::

    drm-lightning statistics --task_vector tv/sst2 --task configs/task/sst2.yaml

Experts fitted here get them when fitting ends (``TaskVectorCallback``); a task vector from ``extract`` or from an
older run does not. This rebuilds the expert (the base plus the task vector, its head), runs a seeded sample of the
task's training examples through it in eval mode, and adds each changed linear layer's input Gram to the folder
(``io/statistics.py``), the same statistics the callback records (``callbacks/grams.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from drm_lightning.commands.tasks import TaskEntry


def statistics(
    task_vector: str,
    task: TaskEntry,
    examples: int = 256,
    layers: list[str] | None = None,
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """Add input statistics (each changed linear layer's input Gram) to a task vector folder, for RegMean.

    Args:
        task_vector: the task vector folder (statistics.safetensors and meta.json's statistics are replaced).
        task: the task's datamodule (a configs/task/*.yaml path or a class_path mapping) whose training split
            the examples come from.
        examples: training examples to run (a seeded sample; default 256, FusionBench's num_regmean_examples).
        layers: regexes of weight names to record (default: every linear layer the task vector changes).
        seed: seed of the sample.
        device: where the expert runs (default CUDA if available, else CPU).

    Returns:
        The task vector folder.
    """
    from drm_lightning.commands.tasks import task_datamodules
    from drm_lightning.merging.engine.reader import TaskVectorReader

    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples={examples!r}: expected a positive integer")
    TaskVectorReader(task_vector)  # validates the folder before any model or data is loaded
    datamodule = next(iter(task_datamodules([task], [task_vector]).values()))
    return add_expert_statistics(task_vector, datamodule, examples, layers=layers, seed=seed, device=device)


def add_expert_statistics(
    task_vector: str | Path,
    datamodule: Any,
    examples: int = 256,
    *,
    layers: list[str] | None = None,
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """``statistics`` with the task's datamodule already built (the pipeline's): rebuild the expert, run the sample
    of training examples, write the Grams into the folder."""
    from drm_lightning.callbacks.grams import expert_grams, named_layers, train_loader
    from drm_lightning.io.statistics import add_statistics, gram_bytes
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.models.expert import ExpertModule
    from drm_lightning.world import resolve_device

    reader = TaskVectorReader(task_vector)
    loader = train_loader(datamodule, reader.task)
    expert = ExpertModule.from_task_vector(task_vector, with_task_vector=True).to(resolve_device(device))
    targets = named_layers(expert.backbone, reader.names(), layers)
    size = gram_bytes({name: layer.in_features for name, layer in targets.items()})
    print(
        f"statistics: {reader.task}: {len(targets)} layers, {size / 1e6:.1f} MB of float32 Grams to record "
        f"({size} bytes)",
        file=sys.stderr,
    )
    grams = expert_grams(expert, loader, examples, targets, seed=seed)
    folder = add_statistics(task_vector, grams.sums, grams.rows, grams.examples)
    print(f"statistics: {len(grams.sums)} layers on {grams.examples} examples -> {folder}", file=sys.stderr)
    return folder
