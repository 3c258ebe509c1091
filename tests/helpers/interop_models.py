"""Experts made by ``transformers`` and ``peft`` themselves (not by this project), tiny and saved to disk.

Why: the importers must read what those libraries write (sharded safetensors with an index, bf16 weights, PEFT's
``base_model.model.`` names, rsLoRA, ``rank_pattern``, ``modules_to_save``), so the tests build that with the
libraries' own ``save_pretrained``. Hidden size 32; "fine-tuning" is a seeded perturbation of every weight, and
LoRA ``B`` is initialised non-zero (``init_lora_weights=False``) so every adapter changes its model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tests.helpers.merge_inputs import TINY_CONFIGS

LABELS = ["negative", "neutral", "positive"]
BERT = TINY_CONFIGS["bert"]
LLAMA = TINY_CONFIGS["llama"]


def bert_config(**overrides) -> BertConfig:
    labels = dict(enumerate(LABELS))
    return BertConfig(**{**BERT, **overrides}, id2label=labels, label2id={v: k for k, v in labels.items()})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


def bert_base(folder: Path, seed: int = 0, **overrides) -> Path:
    """A plain ``BertModel`` (with its pooler), as a hub BERT checkpoint holds it."""
    torch.manual_seed(seed)
    BertModel(bert_config(**overrides)).save_pretrained(folder)
    return folder


def bert_classifier(base: Path, folder: Path, seed: int, *, shard: str | None = None, **overrides) -> Path:
    """A fully "fine-tuned" ``BertForSequenceClassification`` of ``base`` (3 labels), optionally sharded."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, config=bert_config(**overrides))
    perturb(model, seed)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def llama_base(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).to(dtype).save_pretrained(folder)
    return folder


def llama_causal(base: Path, folder: Path, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A fully "fine-tuned" ``LlamaForCausalLM`` of ``base``, saved in ``dtype``."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    perturb(model, seed)
    model.save_pretrained(folder)
    return folder


def lora_adapter(model: torch.nn.Module, folder: Path, seed: int, **lora) -> Path:
    """``peft.get_peft_model(model, LoraConfig(**lora))`` with non-zero B, saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # a trained classifier, not the random one modules_to_save starts from
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(folder)
    return folder


def bert_lora(base: Path, folder: Path, seed: int, **lora) -> Path:
    """A SEQ_CLS LoRA adapter of ``BertForSequenceClassification`` over ``base`` (classifier in modules_to_save)."""
    from peft import TaskType

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base)  # the base's config: its size and 3 labels
    settings = {"task_type": TaskType.SEQ_CLS, "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    return lora_adapter(model, folder, seed, **{**settings, **lora})


def llama_lora(base: Path, folder: Path, seed: int, **lora) -> Path:
    from peft import TaskType

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"task_type": TaskType.CAUSAL_LM, "r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return lora_adapter(model, folder, seed, **{**settings, **lora})


def token_batch(vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 9), generator=generator)
    return ids, torch.ones_like(ids)
