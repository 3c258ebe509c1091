"""A recipe's ``experts``: tasks whose expert was made elsewhere, imported instead of fitted.

::

    # recipes/my_recipe.yaml
    experts:
      sst2: ckpt/sst2-bert            # a fine-tuned save_pretrained folder (of model.backbone)
      rte: adapters/rte-lora          # a PEFT LoRA adapter
      mnli: runs/other/task_vectors/mnli   # a task vector folder

Why in the pipeline: a recipe names the tasks (their datamodules) for merging, the λ search and the report; an
expert that already exists only has to be put where the pipeline reads task vectors. Each is converted once into
``<experts_dir or run_dir>/task_vectors/<task>`` with the task's own name; ``experts/<task>/import.json`` records
where from (the folder, its files' sizes and modification times, the base and how it was loaded), so a second run
reuses the conversion until the source changes.

Checked when the pipeline starts, before anything is fitted or loaded: every key is a task of the recipe, every
folder can be converted against ``model.backbone`` (the importers' checks), it has a head (the pipeline
evaluates every task; an expert without one is refused with the reason), and its labels are the task's
``label_names`` in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from drm_lightning.interop.checkpoint import local_folder
from drm_lightning.interop.full_model import plan_model
from drm_lightning.interop.inputs import input_kind
from drm_lightning.interop.names import check_labels
from drm_lightning.interop.peft_adapter import plan_adapter
from drm_lightning.interop.write import write_import
from drm_lightning.io.atomic import atomic_dir
from drm_lightning.io.task_vector import META_FILE, read_meta
from drm_lightning.models.backbone import LABEL_WORD_FAMILIES

RECORD = "import.json"


class RecipeExperts:
    """The recipe's imported experts, checked up front (``check``) and converted on demand (``materialize``).

    Args:
        experts: task -> folder (or cached hub id).
        tasks: the recipe's task names.
        model: the recipe's model settings (``backbone``, ``family``, ``torch_dtype``, ``gguf_file``).
    """

    def __init__(self, experts: Mapping[str, str], tasks: Sequence[str], model: Mapping[str, Any]) -> None:
        self.experts = dict(experts)
        self.base = str(model.get("backbone"))
        self.family = model.get("family")
        self.load = {"torch_dtype": model.get("torch_dtype"), "gguf_file": model.get("gguf_file")}
        unknown = sorted(set(self.experts) - set(tasks))
        if unknown:
            raise ValueError(f"experts: {unknown} are not tasks of the recipe (its tasks: {list(tasks)})")
        self.kinds = {task: input_kind(source) for task, source in self.experts.items()}
        self.plans: dict[str, Any] = {}
        for task, source in self.experts.items():
            where = f"experts.{task}={source!r}"
            if self.kinds[task] == "task_vector":
                meta = read_meta(local_folder(source))
                if meta.task != task:
                    raise ValueError(f"{where}: the task vector is for task {meta.task!r}")
                if not meta.head and meta.family not in LABEL_WORD_FAMILIES:
                    raise ValueError(f"{where}: the task vector has no head; the pipeline evaluates every task")
                continue
            planner = plan_adapter if self.kinds[task] == "adapter" else plan_model
            plan, info = planner(source, self.base, family=self.family)
            if not plan.head.config and info.family not in LABEL_WORD_FAMILIES:
                raise ValueError(f"{where}: {plan.head.reason}; the pipeline evaluates every task, so it needs a head")
            self.plans[task] = (plan, info)

    def check_labels(self, datamodules: Mapping[str, Any]) -> None:
        """Every imported expert's labels are its task's, in the same order (``names.check_labels``)."""
        for task, source in self.experts.items():
            if task in self.plans:
                labels = self.plans[task][0].label_names
            else:
                labels = read_meta(local_folder(source)).label_names
            check_labels(f"experts.{task}={source!r}", labels, getattr(datamodules[task], "label_names", None))

    def digest(self, task: str) -> str:
        """What the conversion depends on: the source folder's files (name, size, mtime), base and load options."""
        folder = local_folder(self.experts[task])
        paths = [p for p in folder.rglob("*") if p.is_file()]
        files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
        payload = {"source": str(folder.resolve()), "files": files, "base": self.base, **self.load}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def is_current(self, task: str, target: Path, record_dir: Path) -> bool:
        record = record_dir / RECORD
        if not (target / META_FILE).is_file() or not record.is_file():
            return False
        try:
            return json.loads(record.read_text()).get("digest") == self.digest(task)
        except (json.JSONDecodeError, OSError):
            return False

    def materialize(self, task: str, target: Path, record_dir: Path) -> None:
        """Convert (or copy) ``task``'s expert into the task-vector folder ``target``; record it in ``record_dir``."""
        source = self.experts[task]
        if self.kinds[task] == "task_vector":
            with atomic_dir(target) as tmp:
                for path in local_folder(source).iterdir():
                    if path.is_file():
                        shutil.copy2(path, tmp / path.name)
        else:
            plan, info = self.plans[task]
            write_import(plan, info, target, task, **self.load)
        record_dir.mkdir(parents=True, exist_ok=True)
        record = {"digest": self.digest(task), "source": os.fspath(source), "kind": self.kinds[task]}
        (record_dir / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def run(self, target: Callable[[str], Path], record_dir: Callable[[str], Path], log: Callable[[str], None]) -> None:
        """Bring every imported expert up to date (call on one process: it writes)."""
        for task in self.experts:
            if self.is_current(task, target(task), record_dir(task)):
                log(f"{task}: reusing the imported expert in {target(task)}")
                continue
            self.materialize(task, target(task), record_dir(task))
            log(f"{task}: imported {self.kinds[task]} {self.experts[task]} -> {target(task)}")
