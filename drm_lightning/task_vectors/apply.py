"""Add a task vector onto a backbone: ``W <- W + lam * delta`` for every parameter in the folder.

Why: evaluation needs the expert itself (base weights plus its own task vector) beside the merged models, and a
test needs to show that base + task vector reproduces the fine-tuned expert. Deltas are read one tensor at a time
(``safe_open``), added in float32 and cast back to each weight's dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import DELTAS_FILE, LORA_A_SUFFIX, LORA_B_SUFFIX, TaskVectorError, read_meta


def apply_task_vector(
    backbone: nn.Module,
    folder: str | os.PathLike[str],
    lam: float = 1.0,
    *,
    check_fingerprint: bool = True,
) -> nn.Module:
    """Add ``lam`` times the task vector in ``folder`` onto ``backbone``'s weights, in place.

    Args:
        backbone: the plain backbone (as ``load_backbone`` returns it; no ``peft`` wrapper).
        folder: a task vector folder.
        lam: scaling coefficient.
        check_fingerprint: refuse a backbone whose weights are not the ones the task vector was taken against.

    Returns:
        ``backbone``.

    Raises:
        TaskVectorError: a parameter name or shape in the folder does not fit the backbone, a LoRA factor lacks
            its partner, or (with ``check_fingerprint``) the base weights differ.
    """
    from drm_lightning.task_vectors.fingerprint import fingerprint_matches, short_fingerprint

    meta = read_meta(folder)
    path = Path(folder) / DELTAS_FILE
    if check_fingerprint and not fingerprint_matches(backbone, meta.base_fingerprint):
        recorded = [f"{k}={v!r}" for k, v in meta.load_options().items() if v is not None]
        how = f", loaded with {', '.join(recorded)}" if recorded else ""
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in backbone.state_dict().values()})
        raise TaskVectorError(
            f"{path}: the backbone's weights are not the base model the task vector was taken against "
            f"({meta.base_model!r}{how}, fingerprint {short_fingerprint(meta.base_fingerprint)}; this backbone holds "
            f"{dtypes} "
            "weights; different model, revision or dtype: load_recorded_base(meta) loads it as recorded)"
        )
    state = backbone.state_dict()  # detached views sharing storage with the parameters
    with open_safetensors(path, error=TaskVectorError) as f, torch.no_grad():
        keys = set(f.keys())
        _check(f, keys, state, meta.lora is not None, path)
        for key in sorted(keys):
            if key.endswith(LORA_B_SUFFIX):
                continue  # added with its lora_A partner
            if key.endswith(LORA_A_SUFFIX):
                name = key[: -len(LORA_A_SUFFIX)]
                factor_a, factor_b = f.get_tensor(key).float(), f.get_tensor(name + LORA_B_SUFFIX).float()
                delta = meta.lora.scale * (factor_b @ factor_a)
            else:
                name = key
                delta = f.get_tensor(key).float()
            weight = state[name]
            weight.copy_((weight.float() + lam * delta.to(weight.device)).to(weight.dtype))
    return backbone


def _check(f, keys: set[str], state: dict[str, torch.Tensor], has_lora: bool, path: Path) -> None:
    """Validate names, pairs and shapes before any weight changes, so a bad folder never half-applies."""
    for key in sorted(keys):
        shape = tuple(f.get_slice(key).get_shape())
        is_a, is_b = key.endswith(LORA_A_SUFFIX), key.endswith(LORA_B_SUFFIX)
        name = key[: -len(LORA_A_SUFFIX)] if is_a else key[: -len(LORA_B_SUFFIX)] if is_b else key
        if name not in state:
            raise TaskVectorError(f"{path}: parameter {name!r} (from key {key!r}) is not in the backbone")
        target = tuple(state[name].shape)
        if not (is_a or is_b):
            if shape != target:
                raise TaskVectorError(f"{path}: {key!r} has shape {shape}, the weight has shape {target}")
            continue
        if not has_lora:
            raise TaskVectorError(f"{path}: LoRA factor {key!r} but meta.json has no 'lora' section")
        partner = name + (LORA_B_SUFFIX if is_a else LORA_A_SUFFIX)
        if partner not in keys:
            raise TaskVectorError(f"{path}: {key!r} has no matching {partner!r}")
        if is_a:
            shape_b = tuple(f.get_slice(partner).get_shape())
            ok = len(target) == 2 and len(shape) == 2 and len(shape_b) == 2
            if not ok or shape[1] != target[1] or shape_b[0] != target[0] or shape[0] != shape_b[1]:
                raise TaskVectorError(
                    f"{path}: {key!r} {shape} and {partner!r} {shape_b} do not factor a weight of shape {target}"
                )
