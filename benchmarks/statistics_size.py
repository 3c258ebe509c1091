"""What RegMean's input statistics weigh for each shipped model config: per layer kind, per model, per task.

For every ``configs/model/*.yaml`` this builds the backbone as ``ExpertModule`` loads it for the config's family
(``models/backbone.load_backbone``: ``AutoModel`` without a pooler for ``encoder``/``vision``, the seq2seq LM for
``seq2seq``, the vision tower with its projection for ``clip``, the causal LM for ``decoder_lm``) from its
architecture config, on the ``meta`` device (no weights, no download), picks the layers the statistics recorder
picks (``callbacks/grams.recorded_layers``: every ``nn.Linear`` a dense fit trains; with ``lora``, the adapted layers,
matched by ``target_modules`` as peft matches a list: the module's name or its last dotted parts), and sums their
float32 Grams with ``io/statistics.gram_bytes`` (``in² · 4`` bytes per layer and task).

The hub models' architecture numbers are written below (``HUB_CONFIGS``), copied from each model's ``config.json``
on the Hugging Face hub, so the script runs offline; the packaged MiniLM's is read from its folder. A recipe's model
is one of these configs (``recipes/*.yaml`` name the same backbones).

Usage::

    python benchmarks/statistics_size.py                       # every configs/model/*.yaml, a markdown table each
    python benchmarks/statistics_size.py configs/model/llama31_8b_lora.yaml --json sizes.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("drm_lightning") is None:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(ROOT))
from drm_lightning.io.statistics import gram_bytes  # noqa: E402

HUB_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "meta-llama/Llama-3.1-8B": (
        "LlamaConfig",
        {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256},
    ),
    "microsoft/deberta-v3-base": (
        "DebertaV2Config",
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "vocab_size": 128100, "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
         "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1,
         "position_biased_input": False, "type_vocab_size": 0},
    ),
    "google-t5/t5-base": (
        "T5Config",
        {"d_model": 768, "d_ff": 3072, "d_kv": 64, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12,
         "vocab_size": 32128, "feed_forward_proj": "relu", "tie_word_embeddings": True},
    ),
    "openai/clip-vit-base-patch32": (
        "CLIPVisionConfig",
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "image_size": 224, "patch_size": 32, "projection_dim": 512},
    ),
    "google/vit-base-patch32-224-in21k": (
        "ViTConfig",
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "image_size": 224, "patch_size": 32},
    ),
}  # fmt: skip
"""Hub backbone -> (transformers config class, the architecture numbers of its ``config.json``)."""


def architecture_config(backbone: str) -> Any:
    """The backbone's transformers config: from ``HUB_CONFIGS``, or read from a local or packaged folder."""
    import transformers

    if backbone in HUB_CONFIGS:
        name, values = HUB_CONFIGS[backbone]
        return getattr(transformers, name)(**values)
    from drm_lightning.models.resolve import resolve_pretrained

    return transformers.AutoConfig.from_pretrained(resolve_pretrained(backbone))


def meta_backbone(config: Any, family: str) -> nn.Module:
    """The backbone ``load_backbone`` would build for ``family``, with every tensor on the ``meta`` device."""
    import transformers

    from drm_lightning.models.backbone import POOLED_FAMILIES, accepts_pooling_flag

    with torch.device("meta"):
        if family == "seq2seq":
            return transformers.AutoModelForSeq2SeqLM.from_config(config)
        if family == "decoder_lm":
            return transformers.AutoModelForCausalLM.from_config(config)
        if family == "clip":
            return transformers.CLIPVisionModelWithProjection(config)
        if family in POOLED_FAMILIES and accepts_pooling_flag(config):
            return transformers.AutoModel.from_config(config, add_pooling_layer=False)
        return transformers.AutoModel.from_config(config)


def recorded_widths(backbone: nn.Module, family: str, targets: Sequence[str] | None) -> dict[str, int]:
    """Weight name -> input width of each layer the recorder records (dense: every trained ``nn.Linear``; LoRA:
    the ``targets``)."""
    from drm_lightning.callbacks.grams import recorded_layers

    if family == "decoder_lm":  # ExpertModule freezes the base's LM head: every task's head
        backbone.get_output_embeddings().weight.requires_grad_(False)
    if targets is None:
        return {name: layer.in_features for name, layer in recorded_layers(backbone, lora=False).items()}
    widths = {}
    for name, module in backbone.named_modules():
        if type(module) is nn.Linear and any(name == t or name.endswith("." + t) for t in targets):
            widths[f"{name}.weight"] = module.in_features
    return widths


def layer_kind(name: str) -> str:
    """A weight name with its block numbers replaced by ``*``: the rows of the per-kind table."""
    return re.sub(r"\.\d+\.", ".*.", name)


def config_sizes(path: Path) -> dict[str, Any]:
    """The statistics of one model config: per layer kind (count, input width, bytes per layer and in all)."""
    model = yaml.safe_load(path.read_text())["model"]
    family = model.get("family", "encoder")
    lora = model.get("lora")
    targets = lora.get("target_modules") if lora else None
    if lora and targets is None:
        raise ValueError(f"{path}: lora without target_modules; name them to size the statistics")
    backbone = meta_backbone(architecture_config(model["backbone"]), family)
    widths = recorded_widths(backbone, family, targets)
    kinds: dict[str, dict[str, Any]] = {}
    for name, width in widths.items():
        row = kinds.setdefault(layer_kind(name), {"count": 0, "width": width, "bytes_each": gram_bytes({name: width})})
        row["count"] += 1
        row["bytes"] = row["count"] * row["bytes_each"]
    return {
        "config": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "backbone": model["backbone"],
        "family": family,
        "lora_targets": targets,
        "layers": len(widths),
        "bytes_per_task": gram_bytes(widths),
        "kinds": kinds,
    }


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def format_sizes(sizes: dict[str, Any]) -> str:
    """One config's markdown table."""
    lora = f", LoRA on {', '.join(sizes['lora_targets'])}" if sizes["lora_targets"] else ", dense"
    lines = [
        f"`{sizes['config']}` ({sizes['backbone']}, {sizes['family']}{lora}): {sizes['layers']} layers, "
        f"**{_size(sizes['bytes_per_task'])} per task** ({sizes['bytes_per_task']:,} bytes)",
        "",
        "| layer kind | layers | input width | per layer and task | all of the kind, per task |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, row in sizes["kinds"].items():
        lines.append(
            f"| `{kind}` | {row['count']} | {row['width']} | {_size(row['bytes_each'])} | {_size(row['bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="model configs (default: configs/model/*.yaml)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    paths = args.configs or sorted((ROOT / "configs" / "model").glob("*.yaml"))
    results = [config_sizes(path.resolve()) for path in paths]
    print("\n\n".join(format_sizes(sizes) for sizes in results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
