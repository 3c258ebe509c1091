"""Names between a task model's checkpoint (``BertForSequenceClassification``, ``LlamaForCausalLM``, ...) and the
backbone the project loads, and the classification heads that map onto the project's own heads.

Why a table and not ``from_pretrained``: the conversion reads a checkpoint tensor by tensor, so it must know, from
the names alone, which tensor is which backbone parameter. A task model holds the backbone under its class's
``base_model_prefix`` (``bert.``, ``roberta.``, ``deberta.``, ``model.``, ``vit.``) and its head beside it; a
checkpoint of the bare base class has no prefix. ``backbone_map`` accepts both.

Heads (each exactly the computation of the architecture's own head at evaluation, dropout aside):

==============================  ========================================================  =========================
checkpoint                      its head                                                  project head
==============================  ========================================================  =========================
``BertForSequenceClassification``  ``bert.pooler.dense`` (tanh on token 0), ``classifier``  ``EncoderHead`` cls:
                                                                                          ``dense``, ``out_proj``
``Roberta/XLMRoberta/Camembert``   ``classifier.dense`` (tanh on token 0), ``classifier.out_proj``  same
``DebertaV2ForSeq...``          ``pooler.dense`` + ``classifier``, if ``pooler_hidden_act`` is tanh  same
``*ForSequenceClassification``  ``score`` (no bias) on the last non-pad token             ``DecoderHead``: ``score``
(decoders)                                                                                (bias 0)
``ViTForImageClassification``   ``classifier`` on the CLS token                           ``VisionHead``
==============================  ========================================================  =========================

``head_mapping`` (project head parameter -> checkpoint tensor name) is what ``meta.json["source"]`` records, so the
export (``export/task_folders.py``) can put a merged backbone back under the architecture's own head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: model types whose sequence-classification head is RobertaClassificationHead (dense -> tanh -> out_proj).
_ROBERTA_HEADS = frozenset({"roberta", "xlm-roberta", "camembert"})
#: model types whose sequence-classification head is BertPooler (dense -> tanh on token 0) + classifier.
_BERT_POOLER_HEADS = frozenset({"bert"})

#: model type -> project family, for folders that do not say (adapters over a plain base).
FAMILY_OF_MODEL_TYPE: dict[str, str] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "deberta", "deberta-v2", "electra"), "encoder"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"), "decoder"),
    **dict.fromkeys(("t5", "mt5", "umt5"), "seq2seq"),
    **dict.fromkeys(("vit", "deit"), "vision"),
}


Rename = Callable[[str], str]


def checkpoint_renamer(model: torch.nn.Module) -> Rename:
    """Checkpoint name -> ``state_dict()`` name of ``model``, as ``from_pretrained`` renames keys when it loads.

    Why: since transformers 5 some architectures hold their weights under other names than their checkpoints
    (ViT: ``encoder.layer.0.attention.attention.query`` is loaded into ``layers.0.attention.q_proj``). Renamings
    are applied here; a key that transformers would *convert* (fuse, split, permute) cannot be read tensor by
    tensor and is refused. Identity where transformers has no such mapping (4.x).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        renamed, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise ValueError(
                f"tensor {key!r} is converted by transformers when loaded (pattern {converted!r}: fused or split "
                "weights), which a tensor-by-tensor import cannot follow"
            )
        return renamed

    return rename


def backbone_map(
    keys: list[str], backbone: Mapping[str, Any], prefix: str, rename: Rename | None = None
) -> tuple[dict[str, str], list[str]]:
    """Split checkpoint ``keys`` into backbone parameters and the rest.

    Args:
        keys: checkpoint tensor names.
        backbone: the backbone's ``state_dict()`` names.
        prefix: the task model's ``base_model_prefix`` (stripped where present).
        rename: checkpoint name -> backbone name after the prefix is stripped (``checkpoint_renamer``).

    Returns:
        ``(mapping, rest)``: backbone name -> checkpoint key, and the keys that are no backbone parameter (heads,
        poolers, ``lm_head``), sorted.
    """
    mapping: dict[str, str] = {}
    rest: list[str] = []
    lead = f"{prefix}." if prefix else None
    for key in sorted(keys):
        candidates = [key]  # as is first: a decoder_lm backbone (a *ForCausalLM) keeps the prefix in its own names
        if lead and key.startswith(lead):
            candidates.append(key[len(lead) :])
        name = next((c for c in candidates if c in backbone), None)
        if name is None and rename is not None:
            name = next((r for r in map(rename, candidates) if r in backbone), None)
        if name is not None and name not in mapping:
            mapping[name] = key
        else:
            rest.append(key)
    return mapping, rest


@dataclass
class HeadMatch:
    """A checkpoint head mapped onto a project head, or the reason there is none.

    Attributes:
        config: the project head's ``config()`` (``meta.json["head"]``); empty when there is no usable head.
        mapping: project head parameter -> checkpoint tensor name.
        zeros: project head parameters with no checkpoint tensor, set to zero (a bias-free ``score``).
        reason: why there is no usable head (empty when there is one).
        layout: the name of the table row that matched.
    """

    config: dict[str, Any] = field(default_factory=dict)
    mapping: dict[str, str] = field(default_factory=dict)
    zeros: list[str] = field(default_factory=list)
    reason: str = ""
    layout: str = ""

    def tensors(self, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head's state dict in float32, read through ``read`` (checkpoint name -> tensor)."""
        out = {name: read(key).to(torch.float32) for name, key in self.mapping.items()}
        for name in self.zeros:
            weight = out[name.rpartition(".")[0] + ".weight"]
            out[name] = torch.zeros(weight.shape[0], dtype=torch.float32)
        return out


def match_head(
    family: str,
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    prefix: str,
    hidden_size: int,
) -> HeadMatch:
    """Find which row of the table fits the non-backbone tensors ``shapes`` (checkpoint name -> shape).

    Args:
        family: the project family of the base.
        config: the checkpoint's ``config.json`` (``model_type``, ``pooler_hidden_act``, dropout settings).
        shapes: the tensors outside the backbone (and, for adapters, the base's pooler if the head needs it).
        prefix: the task model's ``base_model_prefix``.
        hidden_size: the backbone's hidden size.
    """
    model_type = str(config.get("model_type", ""))
    dropout = config.get("classifier_dropout")
    dropout = float(dropout if dropout is not None else config.get("hidden_dropout_prob", 0.1) or 0.0)

    def linear(name: str, out: int | None = None, bias: bool = True) -> bool:
        weight = shapes.get(f"{name}.weight")
        ok = weight is not None and len(weight) == 2 and weight[1] == hidden_size
        ok = ok and (out is None or weight[0] == out)
        return ok and (not bias or shapes.get(f"{name}.bias") == (weight[0],))

    def encoder(pooler: str, classifier: str, layout: str) -> HeadMatch:
        labels = shapes[f"{classifier}.weight"][0]
        mapping = {
            "dense.weight": f"{pooler}.weight",
            "dense.bias": f"{pooler}.bias",
            "out_proj.weight": f"{classifier}.weight",
            "out_proj.bias": f"{classifier}.bias",
        }
        head = {"type": "encoder", "hidden_size": hidden_size, "num_labels": labels, "pooling": "cls"}
        return HeadMatch({**head, "dropout": min(dropout, 0.99)}, mapping, layout=layout)

    if family == "encoder":
        if model_type in _ROBERTA_HEADS and linear("classifier.dense", hidden_size) and linear("classifier.out_proj"):
            return encoder("classifier.dense", "classifier.out_proj", "roberta_classification_head")
        if linear("classifier"):
            if model_type in _BERT_POOLER_HEADS and linear(f"{prefix}.pooler.dense", hidden_size):
                return encoder(f"{prefix}.pooler.dense", "classifier", "bert_pooler_classifier")
            if model_type == "deberta-v2" and linear("pooler.dense", hidden_size):
                act = config.get("pooler_hidden_act", "gelu")
                if act == "tanh":
                    return encoder("pooler.dense", "classifier", "deberta_context_pooler")
                return HeadMatch(reason=f"its pooler's activation is {act!r}; the project's encoder head uses tanh")
            if model_type in _BERT_POOLER_HEADS:
                return HeadMatch(reason=f"'classifier' without the pooler '{prefix}.pooler.dense' it sits on")
        return HeadMatch(reason=_none_found(shapes, model_type))
    if family == "decoder" and linear("score", bias=False):
        bias = "score.bias" in shapes
        mapping = {"score.weight": "score.weight", **({"score.bias": "score.bias"} if bias else {})}
        config_out = {"type": "decoder", "hidden_size": hidden_size, "num_labels": shapes["score.weight"][0]}
        return HeadMatch(config_out, mapping, zeros=[] if bias else ["score.bias"], layout="decoder_score")
    if family == "vision" and linear("classifier"):
        mapping = {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
        labels = shapes["classifier.weight"][0]
        config_out = {"type": "vision", "hidden_size": hidden_size, "num_labels": labels}
        return HeadMatch(config_out, mapping, layout="vision_classifier")
    return HeadMatch(reason=_none_found(shapes, model_type))


def _none_found(shapes: Mapping[str, tuple[int, ...]], model_type: str) -> str:
    if not shapes:
        return "no classification head: the checkpoint holds no tensors beside the backbone"
    shown = sorted(shapes)[:4]
    return f"no classification head of a kind the toolkit has: found {shown} (model_type {model_type!r})"


def label_names(config: Mapping[str, Any], num_labels: int) -> list[str]:
    """Label names from ``config.id2label`` (by id), or ``LABEL_<i>`` where it does not cover ``num_labels``."""
    id2label = config.get("id2label") or {}
    try:
        names = [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(num_labels)]
    except (KeyError, TypeError):
        return [f"LABEL_{i}" for i in range(num_labels)]
    return names if len(set(names)) == len(names) else [f"LABEL_{i}" for i in range(num_labels)]


def check_labels(where: str, expert: list[str], task: list[str] | None) -> None:
    """Refuse an imported expert whose labels are not its task's, in the same order (one line, both lists).

    Why: the head's logits are in the checkpoint's ``id2label`` order and the datamodule's labels index its own
    ``label_names``; two orders of the same names would score every example against the wrong class, silently.
    Generic names (``LABEL_0``, ...) say nothing about the order and are taken as the task's, if as many.
    """
    if task is None or not expert or list(expert) == list(task):
        return
    generic = [f"LABEL_{i}" for i in range(len(expert))]
    if list(expert) == generic and len(expert) == len(task):
        return
    raise ValueError(
        f"{where}: the expert's labels {list(expert)} (its config.id2label, in logit order) are not the task's "
        f"label_names {list(task)}; give the datamodule label_names in the expert's order"
    )
