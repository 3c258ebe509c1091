"""``drm-lightning evaluate``: one backbone under every task's head, on one split of every task.

::

    drm-lightning evaluate --model merged/drm_v --task_vectors [tv/a,tv/b] --tasks [configs/task/a.yaml,...]
    drm-lightning evaluate --model merged/drm_v_delta --lam 0.8 ...   # a merged delta at another λ
    drm-lightning evaluate --task_vectors [...] --tasks [...]            # the pretrained backbone
    drm-lightning evaluate --experts true --task_vectors [...] --tasks [...]   # each expert on its own task

Why the task vectors are always needed: they carry each task's head (and label names) and the base model's name,
fingerprint and how it was loaded (``torch_dtype``, ``gguf_file``); the backbone alone has no classifier. The base
(for the pretrained row, the experts and a merged delta) is loaded as recorded unless ``--torch_dtype`` /
``--gguf_file`` say otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from drm_lightning.commands.tasks import TaskEntry


def evaluate(
    task_vectors: list[str],
    tasks: list[TaskEntry],
    model: str | None = None,
    lam: float | None = None,
    experts: bool = False,
    split: str = "test",
    trainer: dict[str, Any] | None = None,
    output: str | None = None,
    torch_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
    gguf_file: str | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a backbone under each task's head: metrics per task on one split.

    Args:
        task_vectors: the experts' task vector folders (their heads, label names and base model).
        tasks: the tasks' datamodules (configs/task/*.yaml paths or class_path mappings), one per task vector.
        model: a merged model folder (from merge), a merged delta folder (with --lam), or any save_pretrained
            folder / hub id of the same architecture; default: the pretrained base model.
        lam: λ for a merged delta folder (W_0 + λ·Δ_merged).
        experts: evaluate each task's expert (base + its own task vector) instead of one shared backbone.
        split: the split to evaluate: train, validation or test.
        trainer: Trainer arguments for the runs (e.g. {accelerator: gpu, devices: 1, precision: bf16-mixed}).
        output: a JSON file to write the metrics to.
        torch_dtype: the dtype to load the base (or --model) in; default: for the base, the one the task vectors
            record; for --model, its checkpoint's own.
        gguf_file: a GGUF file inside the base folder to load it from (default: the one the task vectors record).

    Returns:
        ``{task: {metric: value}}``.
    """
    from drm_lightning.commands.tasks import task_datamodules
    from drm_lightning.evaluation.multitask import evaluate_backbone

    if not task_vectors:
        raise ValueError("task_vectors=[]: give the task vector folders (they hold the task heads)")
    if experts and model is not None:
        raise ValueError(f"experts=True evaluates each expert; model={model!r} cannot be given with it")
    if lam is not None and model is None:
        raise ValueError(f"lam={lam!r}: only meaningful with --model <merged delta folder>")
    datamodules = task_datamodules(tasks, task_vectors)
    if model is None:
        backbone = load_base(task_vectors, torch_dtype, gguf_file, check_fingerprint=experts)
    else:
        backbone = load_model(model, lam, task_vectors, torch_dtype=torch_dtype, gguf_file=gguf_file)
    metrics = evaluate_backbone(backbone, task_vectors, datamodules, split, trainer, with_task_vector=experts)
    what = "experts" if experts else (model or "pretrained")
    print(format_metrics(metrics, f"{what} on {split}"))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"metrics: {output}", file=sys.stderr)
    return metrics


def load_base(
    task_vectors: list[str],
    torch_dtype: str | None = None,
    gguf_file: str | None = None,
    *,
    check_fingerprint: bool = False,
) -> Any:
    """The pretrained base the task vectors share, loaded as they record it (or as asked); ``None`` when they were
    taken against several bases (each expert then loads its own, as recorded).

    Why here: the experts' fingerprints are of the base *as loaded* (a bfloat16 or GGUF load differs from the
    checkpoint's float32), so the shared base must be loaded the same way. With ``check_fingerprint`` (the experts
    are about to be added onto it) a base whose weights differ is refused, naming the task vector.
    """
    from drm_lightning.io.task_vector import TaskVectorError, read_meta
    from drm_lightning.merging.engine.setup import base_load_options
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.task_vectors.fingerprint import fingerprint, fingerprint_matches, short_fingerprint

    metas = [read_meta(folder) for folder in task_vectors]
    if len({(m.base_model, m.base_fingerprint, m.family) for m in metas}) != 1:
        given = {k: v for k, v in {"torch_dtype": torch_dtype, "gguf_file": gguf_file}.items() if v is not None}
        if given:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: the task vectors were taken against several "
                "base models; each is loaded as its meta.json records"
            )
        return None
    load = base_load_options(metas, task_vectors, torch_dtype, gguf_file)
    module = load_backbone(metas[0].base_model, metas[0].family, **load)
    if check_fingerprint:
        if not fingerprint_matches(module, metas[0].base_fingerprint):
            actual = fingerprint(module)
            how = ", ".join(f"{k}={v!r}" for k, v in load.items() if v is not None) or "its checkpoint's dtype"
            raise TaskVectorError(
                f"{Path(task_vectors[0]) / 'meta.json'}: base model {metas[0].base_model!r} loaded with {how} has "
                f"fingerprint {short_fingerprint(actual)}, the task vector was taken against "
                f"{short_fingerprint(metas[0].base_fingerprint)}"
            )
    return module


def load_model(
    model: str,
    lam: float | None,
    task_vectors: list[str],
    *,
    torch_dtype: str | None = None,
    gguf_file: str | None = None,
) -> Any:
    """Load the backbone to evaluate: a merged delta at ``lam``, a merged model or adapter folder, or any model name.

    A merged delta's base is loaded as ``merge.json`` records it unless ``torch_dtype`` / ``gguf_file`` are given;
    any other model loads in its checkpoint's dtype unless ``torch_dtype`` is given (``gguf_file`` names a file of
    the base, so it only applies to a merged delta).
    """
    from drm_lightning.io.merged_delta import MERGED_DIR
    from drm_lightning.io.task_vector import read_meta
    from drm_lightning.merging.engine.apply import apply_merged_delta
    from drm_lightning.merging.engine.record import read_merge_record
    from drm_lightning.models.backbone import load_backbone

    folder = Path(model)
    if (folder / MERGED_DIR).is_dir():
        if lam is None:
            raise ValueError(f"model={model!r} is a merged delta folder: give --lam (the λ of W_0 + λ·Δ_merged)")
        return apply_merged_delta(folder, lam, torch_dtype=torch_dtype, gguf_file=gguf_file)
    if lam is not None:
        raise ValueError(f"lam={lam!r}: model={model!r} is not a merged delta folder (no {MERGED_DIR}/ inside)")
    if gguf_file is not None:
        raise ValueError(f"gguf_file={gguf_file!r}: only for the base model or a merged delta, not model={model!r}")
    if (folder / "adapter_config.json").is_file() and (folder / "merge.json").is_file():
        from drm_lightning.export.task_model import adapter_backbone

        return adapter_backbone(folder, torch_dtype=torch_dtype)  # a --save_as adapter folder: base + adapter
    if (folder / "merge.json").is_file():
        family = read_merge_record(folder)["family"]
    else:
        family = read_meta(task_vectors[0]).family
    return load_backbone(model, family, torch_dtype=torch_dtype)


def format_metrics(metrics: dict[str, dict[str, float]], title: str) -> str:
    """A small markdown table: one row per task, one column per metric."""
    names = sorted({name for values in metrics.values() for name in values})
    lines = [f"{title}:", "", "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task, values in metrics.items():
        cells = [f"{values[n]:.4f}" if n in values else "n/a" for n in names]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
