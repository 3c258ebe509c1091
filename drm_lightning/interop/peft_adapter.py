"""A PEFT LoRA adapter folder (``PeftModel.save_pretrained``) -> a LoRA task vector, factors kept as they are.

::

    drm-lightning extract --adapter my-lora-adapter --output tv/task        # base from adapter_config.json
    drm-lightning extract --base meta-llama/Llama-3.1-8B --adapter my-lora --output tv/task

What is kept: each adapted linear layer's ``lora_A`` [r, in] and ``lora_B`` [out, r] under the backbone weight's
name (the format of ``io/task_vector.py``). The task-vector format has one rank and one scale; PEFT allows
a rank and alpha per module (``rank_pattern`` / ``alpha_pattern``) and rsLoRA's ``alpha / sqrt(r)``. So ``r`` is
the largest rank, smaller factors are padded with zero rows of A and zero columns of B (``B @ A`` is unchanged),
``scale`` is the adapter's default (``lora_alpha`` over ``r`` or ``sqrt(r)``), and a module whose own scale
differs carries the ratio in its ``B`` (float64 product, stored float32). ``modules_to_save`` of backbone layers
become dense deltas against the base; a ``classifier`` / ``score`` among them becomes the task's head (a BERT
classifier's pooler is taken from the base checkpoint, where PEFT left it frozen).

Refused before the base is loaded, each with one line naming the folder and the value: another PEFT type (IA3,
LoHa, prompt tuning, ...), DoRA and the other LoRA variants the format cannot hold, LoRA on embeddings, target
modules that are not linear layers of the base, and factors whose sizes do not fit the base (an adapter trained
on another model).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from drm_lightning.interop.base import BaseInfo, describe_base, embedding_skip_patterns, skipped
from drm_lightning.interop.checkpoint import CheckpointError, SafetensorsFolder, local_folder
from drm_lightning.interop.names import backbone_map, label_names, match_head
from drm_lightning.interop.write import ImportPlan, head_source
from drm_lightning.io.json_file import read_json_object
from drm_lightning.io.task_vector import LoraMeta

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
#: adapter_config.json settings the LoRA task-vector format cannot represent: key -> what it is.
UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude per output)",
    "lora_bias": "LoRA bias terms",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


def is_adapter(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def check_adapter_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse adapter types and LoRA variants the task-vector format cannot hold (names the file and setting)."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{where}: peft_type={kind!r} is not supported: only LoRA adapters (with rsLoRA, rank_pattern, "
            "alpha_pattern, modules_to_save) can be merged"
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{where}: {key}={config[key]!r}: {what} is not supported; plain LoRA only")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def plan_adapter(
    adapter: str, base: str | None, *, family: str | None = None, skip: Sequence[str] = ()
) -> tuple[ImportPlan, BaseInfo]:
    """Check a PEFT adapter against its base and plan the conversion; reads JSON and headers only."""
    folder = local_folder(adapter)
    where = str(folder / ADAPTER_CONFIG)
    config = read_json_object(folder / ADAPTER_CONFIG, error=CheckpointError)
    check_adapter_config(config, where)
    recorded = config.get("base_model_name_or_path")
    base_name = base if base is not None else recorded
    if not base_name:
        raise CheckpointError(f"{where}: no base_model_name_or_path; pass base= (--base)")
    try:
        info = describe_base(str(base_name), family)
    except CheckpointError as err:
        hint = "" if base is not None else " (the base named by its adapter_config.json; pass --base to use another)"
        raise CheckpointError(f"{where}: {err}{hint}") from None
    files = SafetensorsFolder(folder, "adapter_model")
    keys = [k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k for k in files.names()]
    stored = dict(zip(keys, files.names(), strict=True))
    factors: dict[str, dict[str, str]] = {}
    plain: list[str] = []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = key
        elif ".lora_embedding_" in key:
            raise CheckpointError(f"{files.tensors[stored[key]].file}: {key!r}: LoRA on an embedding is not supported")
        elif ".lora_" in key:
            raise CheckpointError(f"{files.tensors[stored[key]].file}: {key!r} is not a lora_A/lora_B factor")
        else:
            plain.append(key)
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))

    def scale_of(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    plan = ImportPlan()
    scale = scale_of(r_default, alpha_default)
    modules: dict[str, tuple[str, str, float]] = {}  # backbone weight -> (A key, B key, own scale)
    head_lora: dict[str, tuple[str, str, float]] = {}  # a head tensor's checkpoint name -> its LoRA
    origin = f"adapter_config.json names base {recorded!r}" if recorded else "no base recorded"
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{folder}: module {module!r} has lora_{next(iter(pair))} without its partner")
        lead = f"{info.prefix}."
        name = f"{module}.weight"  # as is first: a decoder_lm backbone keeps the prefix
        if name not in info.shapes:
            name = (module[len(lead) :] if info.prefix and module.startswith(lead) else module) + ".weight"
            name = name if name in info.shapes else _renamed(info, name, folder)
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
        if name not in info.shapes and module in (f"{info.prefix}.pooler.dense", "pooler.dense"):
            r = files.tensors[stored[pair["A"]]].shape[0]
            head_lora[f"{info.prefix}.pooler.dense.weight"] = (stored[pair["A"]], stored[pair["B"]], scale_of(r, alpha))
            continue  # a LoRA on the pooler the project's backbone drops: folded into the head's dense layer
        if name not in info.shapes or len(info.shapes[name]) != 2:
            raise CheckpointError(
                f"{where}: target module {module!r} (target_modules={config.get('target_modules')!r}) is not a linear "
                f"layer of the base {info.name} ({origin})"
            )
        if skipped(name, skip):
            continue
        shape_a, shape_b = files.tensors[stored[pair["A"]]].shape, files.tensors[stored[pair["B"]]].shape
        out_f, in_f = info.shapes[name]
        r = shape_a[0] if len(shape_a) == 2 else -1
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[1] != in_f or shape_b != (out_f, r):
            raise CheckpointError(
                f"{folder}: module {module!r} has lora_A {list(shape_a)} and lora_B {list(shape_b)}, but the base "
                f"{info.name} has {name!r} of shape {[out_f, in_f]}: the adapter was trained on another base ({origin})"
            )
        modules[name] = (stored[pair["A"]], stored[pair["B"]], scale_of(r, alpha))
    rank = max((files.tensors[a].shape[0] for a, _, _ in modules.values()), default=r_default)
    for name, (key_a, key_b, own) in modules.items():
        out_f, in_f = info.shapes[name]
        plan.lora_shapes[name] = ((rank, in_f), (out_f, rank))
        plan.lora[name] = lambda a=key_a, b=key_b, own=own: _factors(files, a, b, rank, own / scale)
    if modules:
        targets = sorted(name.removesuffix(".weight") for name in modules)
        plan.lora_meta = LoraMeta(
            r=rank, alpha=alpha_default, scale=scale, target_modules=targets,
            dropout=float(config.get("lora_dropout") or 0.0),
        )  # fmt: skip
    try:
        mapping, rest = backbone_map(plain, info.shapes, info.prefix, info.rename)
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    for name, key in mapping.items():
        tensor = files.tensors[stored[key]]
        if skipped(name, skip):
            continue
        if name in info.embeddings and tensor.shape[1:] == info.shapes[name][1:] and tensor.shape != info.shapes[name]:
            patterns = ",".join(embedding_skip_patterns(info))
            raise CheckpointError(
                f"{tensor.file}: {key!r} (modules_to_save) has {tensor.shape[0]} token embeddings, but the base "
                f"{info.name} has {info.shapes[name][0]} (tokens added when fine-tuning?): they cannot be merged onto "
                f"the base's; to merge everything else, leave them out with --skip '[{patterns}]'"
            )
        if tensor.shape != info.shapes[name]:
            raise CheckpointError(
                f"{tensor.file}: {key!r} has shape {list(tensor.shape)}, but the base {info.name} has "
                f"{list(info.shapes[name])}: the adapter was trained on another base ({origin})"
            )
        plan.dense[name] = (files, stored[key])
    _plan_head(plan, info, files, {k: stored[k] for k in rest}, folder, head_lora)
    plan.source.update(
        {
            "type": "peft",
            "path": str(folder.resolve()),
            "peft_type": "LORA",
            "task_type": config.get("task_type"),
            "base_model_name_or_path": recorded,
            "adapter_config": dict(config),
            "ranks": {name: files.tensors[a].shape[0] for name, (a, _, _) in modules.items()},
        }
    )
    return plan, info


def _renamed(info: BaseInfo, name: str, folder: Path) -> str:
    try:
        return info.rename(name)
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from None


def _factors(files: SafetensorsFolder, key_a: str, key_b: str, rank: int, ratio: float) -> tuple[torch.Tensor, ...]:
    """``(A, B)`` in float32, zero-padded to ``rank``, ``ratio`` (own scale / recorded scale) folded into B."""
    factor_a, factor_b = files.read(key_a).to(torch.float32), files.read(key_b).to(torch.float32)
    if ratio != 1.0:
        factor_b = (factor_b.double() * ratio).to(torch.float32)
    r = factor_a.shape[0]
    if r < rank:
        factor_a = torch.cat([factor_a, factor_a.new_zeros(rank - r, factor_a.shape[1])])
        factor_b = torch.cat([factor_b, factor_b.new_zeros(factor_b.shape[0], rank - r)], dim=1)
    return factor_a.contiguous(), factor_b.contiguous()


def _plan_head(
    plan: ImportPlan,
    info: BaseInfo,
    files: SafetensorsFolder,
    rest: Mapping[str, str],
    folder: Path,
    head_lora: Mapping[str, tuple[str, str, float]],
) -> None:
    """The head among ``modules_to_save``; a BERT classifier gets its pooler from the base checkpoint (plus the
    adapter's LoRA on it, if any: ``W + scale·B·A``, as PEFT computes it)."""
    readers = {key: (lambda k=stored: files.read(k)) for key, stored in rest.items()}
    shapes = {key: files.tensors[stored].shape for key, stored in rest.items()}
    pooler = f"{info.prefix}.pooler.dense"
    if info.family == "encoder" and "classifier.weight" in shapes and f"{pooler}.weight" not in shapes:
        try:
            base_files = SafetensorsFolder(info.folder)
        except CheckpointError:
            base_files = None
        for part in ("weight", "bias"):
            for key in (f"pooler.dense.{part}", f"{pooler}.{part}"):
                if base_files is not None and key in base_files.tensors:
                    shapes[f"{pooler}.{part}"] = base_files.tensors[key].shape
                    readers[f"{pooler}.{part}"] = lambda k=key, f=base_files: f.read(k)
                    break
        if f"{pooler}.weight" in head_lora and f"{pooler}.weight" in readers:
            key_a, key_b, own = head_lora[f"{pooler}.weight"]
            plain = readers[f"{pooler}.weight"]
            readers[f"{pooler}.weight"] = lambda: (
                plain().double() + own * (files.read(key_b).double() @ files.read(key_a).double())
            )
    own = folder / "config.json"
    model_config = {**info.config, **read_json_object(own, error=CheckpointError)} if own.is_file() else {}
    model_config = model_config or dict(info.config)
    head = match_head(info.family, model_config, shapes, info.prefix, info.hidden_size)
    plan.head, plan.head_read = head, lambda key: readers[key]()
    if head.config:
        labels = label_names(model_config, int(head.config["num_labels"]))
        plan.label_names = labels
        model_config = _task_model_config(info, model_config, labels)
    used = set(head.mapping.values())
    plan.source.update(
        {
            "architectures": list(model_config.get("architectures") or []),
            "model_type": info.config.get("model_type"),
            "config": model_config,
            "head": head_source(head),
            "no_head_reason": head.reason or None,
            "dropped": [k for k in rest if k not in used],
        }
    )


def _task_model_config(info: BaseInfo, config: Mapping[str, Any], labels: list[str]) -> dict[str, Any]:
    """The config.json of the sequence-classification model the adapter was trained on (for the export)."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if info.family == "vision" else AutoModelForSequenceClassification
    try:
        arch = auto._model_mapping[type(AutoConfig.for_model(info.config["model_type"]))].__name__
    except (KeyError, ValueError):
        arch = None
    out = {k: v for k, v in config.items() if k not in ("id2label", "label2id", "num_labels")}
    out["id2label"] = {str(i): name for i, name in enumerate(labels)}
    out["label2id"] = {name: i for i, name in enumerate(labels)}
    out["architectures"] = [arch] if arch else []
    return out
