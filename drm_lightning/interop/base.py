"""What the base model looks like, known before its weights are loaded: config, backbone names and shapes.

Why before: a fine-tuned model or adapter that does not fit the base (another architecture or size, added tokens,
modules the base lacks) must be refused in a second with one line, not after an 8B model has been read. The
backbone is built on PyTorch's ``meta`` device from the base's ``config.json``, exactly as ``load_backbone`` would
build it (same class, ``add_pooling_layer=False`` where the family drops the pooler), which gives every
``state_dict()`` name and shape without allocating a byte of weights.

The compatibility rules (``check_same_model``): the same ``model_type`` and the same size settings (hidden size,
layers, heads, key-value heads, feed-forward size, and their T5/GPT-2 spellings); a different ``vocab_size`` is the
added-tokens case, refused with both sizes and the ``skip`` patterns that merge everything but the embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drm_lightning.interop.checkpoint import CheckpointError, local_folder
from drm_lightning.interop.names import FAMILY_OF_MODEL_TYPE, Rename, checkpoint_renamer
from drm_lightning.interop.skeleton_cache import cached_skeleton
from drm_lightning.io.json_file import read_json_object
from drm_lightning.models.backbone import check_family

#: config keys that fix a model's size: two checkpoints that differ in one are different models.
SIZE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "type_vocab_size",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "n_embd",
    "n_layer",
    "n_head",
    "image_size",
    "patch_size",
    "num_channels",
)


@dataclass
class BaseInfo:
    """The base model as the conversion needs it.

    Attributes:
        name: the base as it will be recorded in meta.json (an existing local path made absolute).
        folder: its local folder.
        config: its ``config.json``.
        family: the project family.
        shapes: backbone ``state_dict()`` name -> shape.
        prefix: the ``base_model_prefix`` of the backbone class (``bert``, ``model``, ...).
        embeddings: names of the backbone's token-embedding parameters.
        rename: checkpoint name (prefix stripped) -> backbone name (``names.checkpoint_renamer``).
    """

    name: str
    folder: Path
    config: dict[str, Any]
    family: str
    shapes: dict[str, tuple[int, ...]]
    prefix: str
    embeddings: list[str]
    rename: Rename

    @property
    def hidden_size(self) -> int:
        return int(self.config.get("hidden_size") or self.config.get("d_model") or self.config.get("n_embd") or 0)


def recorded_name(name: str) -> str:
    """``name`` as meta.json records it: an existing local path made absolute (the merge may run elsewhere in the
    tree), a hub id or ``package://`` name unchanged."""
    path = Path(name)
    return str(path.resolve()) if not name.startswith("package://") and path.exists() else name


def family_of(config: Mapping[str, Any], where: str) -> str:
    """The project family of a ``config.json`` (``model_type``), or a ValueError that says to pass ``family``."""
    model_type = str(config.get("model_type", ""))
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise CheckpointError(
            f"{where}: model_type={model_type!r} has no known family; pass family= (one of encoder, decoder, "
            "decoder_lm, seq2seq, vision)"
        )
    return FAMILY_OF_MODEL_TYPE[model_type]


def describe_base(base: str, family: str | None = None) -> BaseInfo:
    """Config, family and backbone skeleton of ``base`` (a folder, ``package://`` name or cached hub id)."""
    folder = local_folder(base)
    config = read_json_object(folder / "config.json", error=CheckpointError)
    family = check_family(family) if family is not None else family_of(config, str(folder / "config.json"))
    shapes, prefix, embeddings, rename = _skeleton(folder, family)
    return BaseInfo(recorded_name(base), folder, config, family, shapes, prefix, embeddings, rename)


#: The last skeletons built, by (folder, family, config.json text): a merge of T experts of one base describes that
#: base T times, and each meta-device build costs a fraction of a second (the first also imports the model's module).
_SKELETONS: dict[tuple[str, str, str], tuple[dict[str, tuple[int, ...]], str, list[str], Rename]] = {}
_SKELETONS_KEPT = 4


def _skeleton(folder: Path, family: str) -> tuple[dict[str, tuple[int, ...]], str, list[str], Rename]:
    """``_build_skeleton``, remembered for the same folder, family and config text (a rewritten config is rebuilt),
    in this process and on disk (``skeleton_cache``)."""
    text = (folder / "config.json").read_text(encoding="utf-8")
    key = (str(folder.resolve()), family, text)
    if key not in _SKELETONS:
        while len(_SKELETONS) >= _SKELETONS_KEPT:
            _SKELETONS.pop(next(iter(_SKELETONS)))
        _SKELETONS[key] = cached_skeleton(family, text, lambda: _build_skeleton(folder, family))
    shapes, prefix, embeddings, rename = _SKELETONS[key]
    return dict(shapes), prefix, list(embeddings), rename


def _build_skeleton(folder: Path, family: str) -> tuple[dict[str, tuple[int, ...]], str, list[str], Rename]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from drm_lightning.models.backbone import POOLED_FAMILIES, accepts_pooling_flag

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    kwargs: dict[str, Any] = {}
    if family in POOLED_FAMILIES and accepts_pooling_flag(config):
        kwargs["add_pooling_layer"] = False
    auto = {"seq2seq": AutoModelForSeq2SeqLM, "decoder_lm": AutoModelForCausalLM}.get(family, AutoModel)
    with torch.device("meta"):
        model = auto.from_config(config, **kwargs)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weight = getattr(model.get_input_embeddings(), "weight", None)  # ViT's patch embedding has none
    embeddings = [n for n, p in model.named_parameters() if weight is not None and p is weight]
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    return shapes, prefix, embeddings, checkpoint_renamer(model)


def embedding_skip_patterns(info: BaseInfo) -> list[str]:
    """Regexes for ``skip`` that leave the token embeddings (and an untied LM head) out of a conversion."""
    return [re.escape(name) for name in info.embeddings] or [r"(^|\.)(embed_tokens|word_embeddings)\."]


def skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether backbone parameter ``name`` matches one of the ``skip`` regexes (``re.search``)."""
    return any(re.search(pattern, name) for pattern in skip)


def check_same_model(config: Mapping[str, Any], info: BaseInfo, where: str, skip: Sequence[str]) -> None:
    """Refuse a checkpoint whose ``config.json`` describes another model than the base; one line, both values.

    Raises:
        CheckpointError: another ``model_type``, another size, or (unless ``skip`` leaves the embeddings out) another
            vocabulary size.
    """
    theirs, ours = config.get("model_type"), info.config.get("model_type")
    if theirs != ours:
        raise CheckpointError(
            f"{where}: model_type={theirs!r}, but the base {info.name} is {ours!r}: another architecture"
        )
    for key in SIZE_KEYS:
        if key in config and key in info.config and config[key] != info.config[key]:
            raise CheckpointError(
                f"{where}: {key}={config[key]!r}, but the base {info.name} has {key}={info.config[key]!r}: a model "
                "of another size"
            )
    vocab, base_vocab = config.get("vocab_size"), info.config.get("vocab_size")
    if vocab is not None and base_vocab is not None and vocab != base_vocab:
        if info.embeddings and all(skipped(name, skip) for name in info.embeddings):
            return
        patterns = ",".join(embedding_skip_patterns(info))
        raise CheckpointError(
            f"{where}: vocab_size={vocab}, but the base {info.name} has vocab_size={base_vocab} (tokens added when "
            f"fine-tuning?): its embeddings cannot be merged onto the base's; to merge everything else, leave them "
            f"out with --skip '[{patterns}]'"
        )
