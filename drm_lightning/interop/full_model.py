"""A fully fine-tuned ``transformers`` checkpoint -> a dense task vector ``W_ft - W_0`` (with its head, if any).

::

    drm-lightning extract --base bert-base-uncased --model my-sst2-bert --output tv/sst2

Everything that can be refused is refused from ``config.json`` files and safetensors headers, before the base is
loaded (``plan_model``): another architecture or size, another vocabulary size (added tokens: merge the rest with
``skip``), tensors whose shape differs from the base's, weights that are not safetensors. Then ``write_import``
streams the fine-tuned tensors one at a time against the loaded base.

Names: the checkpoint's ``<prefix>.<backbone name>`` tensors are the backbone's (``interop/names.py``); a
classification head that fits one of the project's heads becomes ``head.safetensors``; anything else outside the
backbone (an LM head, a pooler without a classifier) is left out and listed in ``meta.json["source"]["dropped"]``.
Backbone parameters the checkpoint lacks (tied weights, frozen buffers) keep a zero delta and are listed as
``missing``.
"""

from __future__ import annotations

from collections.abc import Sequence

from drm_lightning.interop.base import BaseInfo, check_same_model, describe_base, skipped
from drm_lightning.interop.checkpoint import CheckpointError, SafetensorsFolder, local_folder
from drm_lightning.interop.names import backbone_map, label_names, match_head
from drm_lightning.interop.write import ImportPlan, head_source
from drm_lightning.io.json_file import read_json_object
from drm_lightning.io.safetensors import FLOAT_CODES


def plan_model(
    model: str, base: str | None, *, family: str | None = None, skip: Sequence[str] = ()
) -> tuple[ImportPlan, BaseInfo]:
    """Check a fine-tuned folder against its base and plan the conversion; reads configs and headers only.

    Raises:
        CheckpointError: no ``--base``, another architecture/size/vocabulary, a tensor of another shape or a
            non-float dtype, no safetensors weights (each naming the folder and the value).
    """
    folder = local_folder(model)
    config = read_json_object(folder / "config.json", error=CheckpointError)
    if base is None:
        raise CheckpointError(
            f"{folder}: a fully fine-tuned model needs base= (--base): the model it was fine-tuned from"
        )
    info = describe_base(base, family)
    check_same_model(config, info, str(folder / "config.json"), skip)
    files = SafetensorsFolder(folder)
    try:
        mapping, rest = backbone_map(files.names(), info.shapes, info.prefix, info.rename)
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    plan = ImportPlan(whole_model=True)
    skipped_names = []
    for name, key in mapping.items():
        tensor = files.tensors[key]
        if skipped(name, skip):
            skipped_names.append(name)
            continue
        if tensor.shape != info.shapes[name]:
            raise CheckpointError(
                f"{tensor.file}: tensor {key!r} has shape {list(tensor.shape)}, but the base {info.name} has "
                f"{list(info.shapes[name])} for {name!r}: not fine-tuned from this base"
            )
        if tensor.dtype not in FLOAT_CODES:
            raise CheckpointError(f"{tensor.file}: tensor {key!r} has dtype {tensor.dtype}, expected a float dtype")
        plan.dense[name] = (files, key)
    if not mapping:
        shown = ", ".join(repr(k) for k in files.names()[:3])
        raise CheckpointError(
            f"{folder}: none of its {len(files.tensors)} tensors ({shown}, ...) is a parameter of the backbone of the "
            f"base {info.name} (names like {next(iter(info.shapes))!r}): another architecture, or other names"
        )
    head = match_head(info.family, config, {k: files.tensors[k].shape for k in rest}, info.prefix, info.hidden_size)
    plan.head, plan.head_read = head, files.read
    num_labels = int(head.config.get("num_labels", 0)) or len(config.get("id2label") or {})
    plan.label_names = label_names(config, num_labels) if num_labels >= 2 else []
    used = set(head.mapping.values())
    plan.source = {
        "type": "transformers",
        "path": str(folder.resolve()),
        "architectures": list(config.get("architectures") or []),
        "model_type": config.get("model_type"),
        "config": config,
        "head": head_source(head),
        "no_head_reason": head.reason or None,
        "dropped": [k for k in rest if k not in used],
        "missing": sorted(set(info.shapes) - set(mapping)),
        "skipped": sorted(skipped_names),
    }
    return plan, info
