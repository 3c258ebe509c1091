"""``load_task_model(folder, task)``: a merged folder plus a task name -> one ready ``nn.Module`` (backbone, pooling,
head) that returns the task's class logits.

Why one call: the task heads live beside the merged weights (``heads/<task>/head.safetensors`` + ``meta.json``, format
in ``docs/interop.md``) and only ``ExpertModule`` knew how to put them back. This wraps exactly the module the
evaluation runs (``ExpertModule.from_task_vector`` on the merged backbone), so its logits are the evaluation's.

Works on both outputs of ``drm-lightning merge``: a model folder (``save_as=model``: the backbone is loaded from it)
and a PEFT adapter folder (``save_as=adapter``: the base recorded in ``merge.json`` is loaded and the adapter's
``W_0 + B·A`` and full weights are added into it, so no ``peft`` wrapper is involved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from drm_lightning.export.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS


class TaskModel(nn.Module):
    """The merged backbone under one task's head; ``forward`` takes the tokenizer's (or image processor's) tensors.

    Attributes:
        task: the task name.
        label_names: class names in logit order.
        expert: the wrapped ``ExpertModule`` (its ``backbone`` and ``head``).
    """

    def __init__(self, expert: nn.Module) -> None:
        super().__init__()
        self.expert = expert
        self.task: str = expert.task
        self.label_names: list[str] = list(expert.label_names or [])

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, num_labels]`` from ``input_ids``/``attention_mask`` (``token_type_ids``) or
        ``pixel_values``; seq2seq and ``decoder_lm`` tasks score each label word."""
        if "pixel_values" not in inputs and "attention_mask" not in inputs and "input_ids" in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return self.expert(inputs)


def adapter_backbone(folder: str | os.PathLike[str], *, torch_dtype: str | None = None) -> nn.Module:
    """The backbone of an adapter folder's base with the adapter added in: ``W_0 + B·A`` for every adapted module,
    and the saved full weights (``modules_to_save``, LoRA-layer biases) in place of the base's."""
    from safetensors.torch import load_file

    from drm_lightning.merging.engine.record import read_merge_record
    from drm_lightning.models.backbone import load_backbone

    folder = Path(folder)
    record = read_merge_record(folder)
    json.loads((folder / ADAPTER_CONFIG).read_text())  # a readable adapter_config.json, or a clear error
    prefix = "base_model.model." + str((record.get("adapter") or {}).get("backbone_prefix", ""))
    dtype = torch_dtype if torch_dtype is not None else record.get("torch_dtype")
    model = load_backbone(record["base_model"], record["family"], torch_dtype=dtype, gguf_file=record.get("gguf_file"))
    state = model.state_dict()
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    with torch.no_grad():
        for key, value in weights.items():
            if not key.startswith(prefix):
                raise ValueError(f"{folder / ADAPTER_WEIGHTS}: key {key!r} does not start with {prefix!r}")
            name = key[len(prefix) :]
            if name.endswith(".lora_A.weight"):
                module = name[: -len(".lora_A.weight")]
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                target = state[module + ".weight"]
                target.copy_((target.float() + b.float() @ value.float()).to(target.dtype))
            elif name.endswith(".lora_B.weight"):
                continue
            else:
                name = name.replace(".base_layer.", ".")
                if name not in state:
                    raise ValueError(f"{folder / ADAPTER_WEIGHTS}: key {key!r} is not a parameter of the base")
                state[name].copy_(value.to(state[name].dtype))
    return model


def load_task_model(folder: str | os.PathLike[str], task: str, *, torch_dtype: str | None = None) -> TaskModel:
    """The merged model of ``folder`` (``drm-lightning merge`` output) under the head of ``task``, in eval mode.

    Args:
        folder: a merged model folder or adapter folder (holding ``heads/<task>/``).
        task: a task name; the error lists the folder's tasks.
        torch_dtype: the backbone's dtype (default: the folder's).

    Raises:
        ValueError: an unknown task or a folder that is not a merge output.
    """
    from drm_lightning.io.task_vector import read_meta
    from drm_lightning.merging.engine.record import HEADS_DIR
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.models.expert import ExpertModule

    folder = Path(folder)
    heads = folder / HEADS_DIR
    tasks = sorted(p.name for p in heads.iterdir() if p.is_dir()) if heads.is_dir() else []
    if task not in tasks:
        raise ValueError(f"{heads}: no head for task {task!r} (tasks: {tasks})")
    meta = read_meta(heads / task)
    if (folder / ADAPTER_CONFIG).is_file():
        backbone = adapter_backbone(folder, torch_dtype=torch_dtype)
    else:
        backbone = load_backbone(str(folder), meta.family, torch_dtype=torch_dtype)
    expert = ExpertModule.from_task_vector(heads / task, backbone=backbone)
    return TaskModel(expert).eval()
