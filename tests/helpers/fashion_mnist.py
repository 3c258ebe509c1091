"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files), as small imagefolders for tests.

Why imagefolders: they are what ``ImageClassificationDataModule(data_dir=...)`` reads with ``datasets``, so a test
built on them runs the real image data path (decode, RGB, the model's image processor) on real images, offline.
``apt-get install dataset-fashion-mnist`` puts the idx files in ``FASHION_MNIST_DIR``; tests skip without them.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def available() -> bool:
    return all((FASHION_MNIST_DIR / name).is_file() for pair in FILES.values() for name in pair)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip) as an array: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dimensions, data."""
    with gzip.open(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not a uint8 idx file (magic {zero:#x} {dtype:#x})")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def write_imagefolders(
    root: Path, groups: Mapping[str, Sequence[int]], per_class: Mapping[str, int], seed: int = 0
) -> dict[str, Path]:
    """One imagefolder per task, ``root/<task>/<split>/<class name>/<i>.png``, of the classes in ``groups[task]``.

    ``per_class[split]`` images of each class are drawn (seeded) from that split of Fashion-MNIST.
    """
    from PIL import Image

    out = {}
    rng = np.random.default_rng(seed)
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(FASHION_MNIST_DIR / images_file)
        labels = read_idx(FASHION_MNIST_DIR / labels_file)
        for task, classes in groups.items():
            for label in classes:
                rows = rng.choice(np.flatnonzero(labels == label), per_class[split], replace=False)
                folder = root / task / split / CLASSES[label]
                folder.mkdir(parents=True, exist_ok=True)
                for i, row in enumerate(rows):
                    Image.fromarray(images[row]).save(folder / f"{i}.png")
            out[task] = root / task
    return out
