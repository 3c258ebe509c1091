"""Merged model -> one ``AutoModelForSequenceClassification`` folder per task imported from a classifier checkpoint.

::

    <merged>/tasks/<task>/   config.json (the expert's own, labels included), model.safetensors, tokenizer

Why: an expert imported from ``BertForSequenceClassification`` (or RoBERTa, DeBERTa-v2, a decoder's ``score``,
ViT) should come back as what it was, with the merged backbone inside, loadable by plain ``transformers``. This is
the inverse of the import's name mapping: the architecture is rebuilt from the ``config.json`` recorded in
``meta.json["source"]``, the merged backbone goes under its ``base_model_prefix``, and each head tensor goes back
to the checkpoint name ``source.head.mapping`` recorded (a BERT head's ``dense`` becomes ``bert.pooler.dense``).
Its logits equal the project's own evaluation of the merged backbone under the task's head (the test checks this
in a process that never imports drm_lightning). Tasks fitted here, or imported without a usable head, get none.
Each folder is written by ``folder_writer.write_folder`` (the merged model folder's writer) with the merged
folder's tokenizer files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from drm_lightning.export.folder_writer import write_folder
from drm_lightning.interop.names import checkpoint_renamer
from drm_lightning.io.task_vector import HEAD_FILE, META_FILE, read_head, read_meta
from drm_lightning.merging.engine.record import HEADS_DIR

TASKS_DIR = "tasks"


def exportable(meta_source: dict[str, Any] | None) -> bool:
    """Whether an expert's ``meta.json["source"]`` records a head that maps back onto its architecture."""
    if not meta_source or not meta_source.get("head") or not meta_source.get("config"):
        return False
    archs = meta_source["config"].get("architectures") or []
    return any(str(a).endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs)


def export_task_models(merged: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write ``<output or merged>/tasks/<task>/`` for every exportable task of the merged model folder ``merged``.

    Returns:
        The folders written (none when no task was imported from a classifier checkpoint).
    """
    merged = Path(merged)
    root = Path(output) if output is not None else merged / TASKS_DIR
    heads = sorted(p for p in (merged / HEADS_DIR).glob("*") if (p / META_FILE).is_file())
    todo = [(p, read_meta(p)) for p in heads]
    todo = [(p, m) for p, m in todo if exportable(m.source)]
    if not todo:
        return []
    from drm_lightning.models.backbone import load_backbone

    backbone = load_backbone(str(merged), todo[0][1].family)
    written = []
    for folder, meta in todo:
        target = root / meta.task
        model = build_task_model(backbone.state_dict(), meta.source, read_head(folder), folder)
        write_folder(target, model, tokenizer_files_of=merged)
        written.append(target)
        print(f"{target}: task {meta.task!r} as {type(model).__name__}", file=sys.stderr)
    return written


def build_task_model(
    backbone_state: dict[str, torch.Tensor], source: dict[str, Any], head: dict[str, torch.Tensor], where: Path
) -> torch.nn.Module:
    """The expert's own architecture with ``backbone_state`` as its backbone and ``head`` mapped back."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    config_dict = {k: v for k, v in source["config"].items() if k not in ("transformers_version", "_name_or_path")}
    config = AutoConfig.for_model(**config_dict)
    archs = config_dict.get("architectures") or []
    auto = AutoModelForImageClassification if any("ImageClassification" in a for a in archs) else None
    auto = auto or AutoModelForSequenceClassification
    dtype = next(iter(backbone_state.values())).dtype if backbone_state else torch.float32
    model = auto.from_config(config).to(torch.float32)
    inner = getattr(model, model.base_model_prefix)
    embedding = getattr(inner.get_input_embeddings(), "weight", None)
    name = next((n for n, p in inner.named_parameters() if p is embedding), None)
    if name in backbone_state and embedding is not None and backbone_state[name].shape != embedding.shape:
        # An expert with added tokens, imported with its embeddings skipped: it merges onto, and now uses, the base's
        # vocabulary (the tokenizer beside it is the base's too).
        config = AutoConfig.for_model(**{**config_dict, "vocab_size": int(backbone_state[name].shape[0])})
        model = auto.from_config(config).to(torch.float32)
        inner = getattr(model, model.base_model_prefix)
    own = inner.state_dict()
    mismatched = [k for k, v in own.items() if k in backbone_state and backbone_state[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{where}: merged backbone tensors {mismatched[:3]} do not fit {type(model).__name__}")
    missing, unexpected = inner.load_state_dict(backbone_state, strict=False)
    if unexpected:
        raise ValueError(f"{where}: merged backbone tensors {unexpected[:3]} do not fit {type(model).__name__}")
    state = model.state_dict()
    rename = checkpoint_renamer(model)  # the recorded names are the checkpoint's; state_dict() may differ (v5)
    mapping, zeros = source["head"]["mapping"], set(source["head"].get("zeros", []))
    filled = set()
    for name, tensor in head.items():
        if name in zeros:
            if bool(tensor.any()):
                raise ValueError(f"{where / HEAD_FILE}: {name!r} is not zero, but {type(model).__name__} has no place")
            continue
        key = mapping.get(name)
        key = key if key is None or key in state else rename(key)
        if key not in state or tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{where / META_FILE}: head tensor {name!r} maps to {key!r}, not a fitting tensor")
        with torch.no_grad():
            state[key].copy_(tensor)
        filled.add(key)
    prefix = f"{model.base_model_prefix}."
    left = [f"{prefix}{k}" for k in missing if f"{prefix}{k}" not in filled]
    left += [k for k in state if not k.startswith(prefix) and k not in filled]
    if left:
        raise ValueError(f"{where}: {type(model).__name__} parameters {left[:3]} come from neither backbone nor head")
    return model.to(dtype).eval()
