"""Image classification tasks (ViT family) as a ``LightningDataModule`` on ``datasets``.

Why the backbone's own ``AutoImageProcessor`` and no torchvision: resizing and normalising exactly as the
pretrained model expects keeps every expert (and the merged model) on the same input distribution, and
torchvision has no CPU-only wheel that leaves this project's torch alone. Images are decoded and processed in
the collate function, so nothing but the raw files is ever cached.

A config (LightningCLI ``data:`` section)::

    class_path: drm_lightning.data.image.ImageClassificationDataModule
    init_args:
      task: fashion
      image_processor: google/vit-base-patch16-224-in21k
      data_dir: /data/fashion        # imagefolder: <split>/<label>/<file>.png
      label_names: [tshirt, trouser, pullover]
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from drm_lightning.data.checks import DataError
from drm_lightning.data.common import ClassificationDataModule
from drm_lightning.data.sources import load_dataset_checked, load_hub_dataset
from drm_lightning.models.resolve import resolve_pretrained


def _as_rgb(value: Any, column: str) -> Any:
    """A decoded PIL image in RGB (grayscale sets such as MNIST become 3-channel, as ViT expects)."""
    from PIL import Image

    if isinstance(value, str | Path):
        value = Image.open(value)
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    if not isinstance(value, Image.Image):
        kind = type(value).__name__
        raise DataError(f"image column {column!r}: expected an image, a path or image bytes, got {kind}")
    return value.convert("RGB")


#: The CLIP paper's plain prompt, for tasks that name no templates of their own.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def check_templates(templates: list[str], where: str) -> None:
    """Each template must be a string with exactly one ``{}`` (the class name), and there must be at least one."""
    if isinstance(templates, str) or not templates:
        raise DataError(f"{where}: templates must be a non-empty list of strings with one '{{}}', got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise DataError(f"{where}: template {template!r} must hold exactly one '{{}}' for the class name")


@dataclass
class ImageCollator:
    """Process a list of rows into ``pixel_values`` and ``labels``; picklable, so it works with loader workers."""

    processor: Any
    image_column: str
    label_column: str
    label_map: Mapping[Any, int]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [_as_rgb(row[self.image_column], self.image_column) for row in rows]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([self.label_map[row[self.label_column]] for row in rows], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


class ImageClassificationDataModule(ClassificationDataModule):
    """One image classification task: a hub dataset or a local imagefolder, processed on the fly.

    Batches are dicts of ``pixel_values`` (float ``[B, 3, H, W]`` as the processor makes them) and ``labels``.
    """

    def __init__(
        self,
        task: str,
        image_processor: str,
        label_names: list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_dir: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        train_split: str = "train",
        validation_split: str | None = "validation",
        test_split: str | None = "test",
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        metrics: list[str] | None = None,
        cache_dir: str | None = None,
        templates: list[str] | None = None,
    ) -> None:
        """Describe one task; nothing is loaded until ``setup``.

        Args:
            task: Task name; keys task vectors, metrics and reports.
            image_processor: Hub id, local folder or ``package://module/sub`` holding the backbone's
                ``preprocessor_config.json``.
            label_names: Class names in head-output order. An imagefolder's folder names map by name. None takes
                the train split's ``ClassLabel`` names (loading the dataset when they are first asked for).
            dataset: Hub id (or local dataset folder) for ``datasets.load_dataset``; excludes ``data_dir``.
            dataset_config: The hub dataset's configuration.
            data_dir: Local imagefolder (``<split>/<label>/<image>`` or ``<label>/<image>``); excludes ``dataset``.
            image_column: Column with the image (decoded image, path or bytes).
            label_column: Column with the label (class label, string name or integer index).
            train_split: Split used for training.
            validation_split: Split used for validation; when None or absent, ``val_fraction`` of the train
                split is carved off with ``seed``.
            test_split: Split used by ``test``; None if there is none.
            val_fraction: Fraction of the train split carved off when there is no validation split.
            seed: Seed of the carve, of ``max_*_samples`` sub-sampling and of the train shuffle, whose order
                depends only on (seed, epoch) so that a resumed fit sees the order an uninterrupted one does.
            batch_size: Training batch size.
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            num_workers: DataLoader worker processes (image decoding is the costly part).
            max_train_samples: Keep this many training rows (a seeded random subset) for fast runs.
            max_eval_samples: Same for validation and test.
            metrics: Metrics the model reports for this task: ``accuracy``, ``f1``, ``mcc``.
            cache_dir: Where ``datasets`` keeps its Arrow cache (default: its own, ~/.cache/huggingface).
            templates: Prompt templates of the class names for zero-shot heads (the ``clip`` family), ``{}`` where
                the name goes, e.g. ``["a centered satellite photo of {}."]``; None: ``["a photo of a {}."]``.
        """
        super().__init__(**self.base_arguments(locals()))
        if templates is not None:
            check_templates(templates, f"task {task!r}")
        if (dataset is None) == (data_dir is None):
            raise DataError(f"task {task!r}: give exactly one of dataset (hub id) or data_dir (imagefolder)")
        self.save_hyperparameters(logger=False)  # logged by ExpertModule as data/<name> (keys clash)

    @property
    def templates(self) -> list[str]:
        """Templates of the class names for a zero-shot head (``clip`` family)."""
        return list(self.hparams.templates or DEFAULT_TEMPLATES)

    @cached_property
    def processor(self) -> Any:
        """The backbone's image processor, loaded on first use."""
        from transformers import AutoImageProcessor

        name = resolve_pretrained(self.hparams.image_processor)
        return AutoImageProcessor.from_pretrained(name, trust_remote_code=False)

    @override
    def _input_columns(self) -> list[str]:
        return [self.hparams.image_column]

    @override
    def _load_splits(self) -> Any:
        hp = self.hparams
        if hp.data_dir is not None:
            if not Path(hp.data_dir).is_dir():
                raise DataError(f"task {self.task!r}: data_dir not found: {hp.data_dir!r}")
            source = f"imagefolder {hp.data_dir!r}"
            return load_dataset_checked(self.task, source, "imagefolder", data_dir=hp.data_dir, cache_dir=hp.cache_dir)
        return load_hub_dataset(self.task, hp.dataset, hp.dataset_config, hp.cache_dir)

    @override
    def _collator(self, label_map: dict[Any, int]) -> ImageCollator:
        hp = self.hparams
        return ImageCollator(self.processor, hp.image_column, hp.label_column, label_map)
