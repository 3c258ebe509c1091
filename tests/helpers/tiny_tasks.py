"""Two learnable tiny csv tasks (words every tiny tokenizer knows), their task YAMLs, and a model YAML for the CLI."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

POSITIVE = ["good", "great"]
NEGATIVE = ["bad", "awful"]
NOUNS = "movie film plot actor story scene music ending cast script".split()
TINY_TASKS: dict[str, list[str]] = {"sentiment": ["neg", "pos"], "animal": ["cat", "dog"]}


def _sentence(task: str, label: int, rng: random.Random) -> str:
    if task == "sentiment":
        return f"the {rng.choice(NOUNS)} is {rng.choice(POSITIVE if label else NEGATIVE)}"
    return f"the {'dog' if label else 'cat'} and the {rng.choice(NOUNS)} is {rng.choice(POSITIVE + NEGATIVE)}"


def write_tiny_tasks(folder: Path, sizes: tuple[int, int, int] = (96, 32, 32)) -> dict[str, Path]:
    """Two learnable tiny csv tasks (words every tiny tokenizer knows) and a task YAML for each; task -> YAML."""
    rng = random.Random(0)
    out = {}
    for task, labels in TINY_TASKS.items():
        files = {}
        for split, n in zip(("train", "validation", "test"), sizes, strict=True):
            path = folder / task / f"{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                for i in range(n):
                    writer.writerow([_sentence(task, i % 2, rng), labels[i % 2]])
            files[split] = str(path)
        spec = {
            "data": {
                "class_path": "drm_lightning.data.text.TextClassificationDataModule",
                "init_args": {
                    "task": task,
                    "label_names": labels,
                    "data_files": files,
                    "max_length": 16,
                    "batch_size": 16,
                },
            }
        }
        out[task] = folder / f"{task}.yaml"
        out[task].write_text(json.dumps(spec))  # JSON is YAML
    return out


def write_model_yaml(folder: Path, backbone: str) -> Path:
    path = folder / "model.yaml"
    model = {"backbone": backbone, "pooling": "mean", "learning_rate": 0.003, "warmup_ratio": 0.0}
    path.write_text(json.dumps({"model": model}))
    return path
