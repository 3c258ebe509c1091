"""Task heads: map a backbone's ``last_hidden_state`` to class logits.

Why plain ``nn.Module``s with a ``config()``: a head's state dict goes to ``head.safetensors`` and its constructor
arguments to ``meta.json["head"]``, so ``build_head(meta.head)`` rebuilds it anywhere (evaluation puts the merged
backbone under each task's head). Heads keep their own dtype (float32) and cast the pooled features to it, so a
bfloat16 backbone still gets a float32 head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

POOLINGS = ("cls", "mean")


def _check_sizes(hidden_size: int, num_labels: int) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size!r}: expected a positive integer")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels={num_labels!r}: expected an integer >= 2")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row; right or left padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(torch.long)).argmax(dim=-1)


class EncoderHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> linear on the CLS token or the masked mean of all tokens.

    The RoBERTa-style classification head. ``pooling="mean"`` suits sentence-embedding models such as
    all-MiniLM-L6-v2, which were trained with mean pooling.
    """

    kind = "encoder"

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1) -> None:
        super().__init__()
        _check_sizes(hidden_size, num_labels)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: expected a number in [0, 1)")
        self.hidden_size, self.num_labels, self.pooling, self.dropout_p = hidden_size, num_labels, pooling, dropout
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pool(hidden, attention_mask).to(self.dense.weight.dtype)
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "hidden_size": self.hidden_size,
            "num_labels": self.num_labels,
            "pooling": self.pooling,
            "dropout": self.dropout_p,
        }


class ChoiceHead(EncoderHead):
    """The encoder head with one output: the score of one (context, option) pair (as ``*ForMultipleChoice``).

    A multiple-choice expert runs every option of an example through the backbone and this head; the options'
    scores are the logits over the options, so the head does not depend on how many options a task has.
    """

    kind = "choice"

    def __init__(self, hidden_size: int, pooling: str = "cls", dropout: float = 0.1) -> None:
        super().__init__(hidden_size, 2, pooling, dropout)
        self.num_labels = 1
        self.out_proj = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(hidden, attention_mask).squeeze(-1)

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "hidden_size": self.hidden_size, "pooling": self.pooling, "dropout": self.dropout_p}


class DecoderHead(nn.Module):
    """Linear layer on the hidden state of the last non-pad token (as ``LlamaForSequenceClassification`` does)."""

    kind = "decoder"

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        _check_sizes(hidden_size, num_labels)
        self.hidden_size, self.num_labels = hidden_size, num_labels
        self.score = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            last = hidden[:, -1]
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, last_token_index(attention_mask)]
        return self.score(last.to(self.score.weight.dtype))

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "hidden_size": self.hidden_size, "num_labels": self.num_labels}


class VisionHead(nn.Module):
    """Linear layer on the CLS token of ``ViTModel``'s (already layer-normed) ``last_hidden_state``."""

    kind = "vision"

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        _check_sizes(hidden_size, num_labels)
        self.hidden_size, self.num_labels = hidden_size, num_labels
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(hidden[:, 0].to(self.classifier.weight.dtype))

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "hidden_size": self.hidden_size, "num_labels": self.num_labels}


class ZeroShotHead(nn.Module):
    """CLIP's zero-shot classifier: ``logit_scale · cos(image embedding, class embedding)``.

    The class embeddings (``weight [num_labels, embed_dim]``, unit rows) are the text encoder's normalised embeddings
    of each class name under the task's prompt templates (``models/zeroshot.py``), computed once when the expert is
    created. They are a buffer, never trained, and travel in ``head.safetensors``: evaluating a merged vision tower
    needs no text encoder. ``logit_scale`` is the CLIP model's own (``exp`` of its learned log-scale).
    """

    kind = "zeroshot"

    def __init__(self, embed_dim: int, num_labels: int, logit_scale: float = 100.0) -> None:
        super().__init__()
        _check_sizes(embed_dim, num_labels)
        if not isinstance(logit_scale, int | float) or not logit_scale > 0:
            raise ValueError(f"logit_scale={logit_scale!r}: expected a positive number")
        self.embed_dim, self.num_labels, self.logit_scale = embed_dim, num_labels, float(logit_scale)
        self.register_buffer("weight", torch.zeros(num_labels, embed_dim))

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        image = torch.nn.functional.normalize(embeds.to(self.weight.dtype), dim=-1)
        return self.logit_scale * image @ self.weight.t()

    def config(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "embed_dim": self.embed_dim,
            "num_labels": self.num_labels,
            "logit_scale": self.logit_scale,
        }


HEADS: dict[str, type[nn.Module]] = {
    cls.kind: cls for cls in (EncoderHead, ChoiceHead, DecoderHead, VisionHead, ZeroShotHead)
}


def build_head(config: dict[str, Any]) -> nn.Module:
    """Rebuild a head from its ``config()`` (``meta.json["head"]``); errors name the bad key."""
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in HEADS:
        raise ValueError(f"head type={kind!r}: expected one of {sorted(HEADS)}")
    try:
        return HEADS[kind](**config)
    except TypeError as err:
        raise ValueError(f"head config {config!r} for type {kind!r}: {err}") from None


def task_head(
    family: str, task_type: str, hidden_size: int, num_labels: int, pooling: str, dropout: float
) -> nn.Module | None:
    """The new trained head of an expert of ``family``; None where the family brings its own (``clip``: a zero-shot
    head, ``models/zeroshot.py``; label-word families: the LM head) or, for multiple choice, scores options itself."""
    if task_type == "multiple_choice":
        return ChoiceHead(hidden_size, pooling, dropout) if family == "encoder" else None
    if family == "encoder":
        return EncoderHead(hidden_size, num_labels, pooling, dropout)
    if family == "decoder":
        return DecoderHead(hidden_size, num_labels)
    if family == "vision":
        return VisionHead(hidden_size, num_labels)
    return None
