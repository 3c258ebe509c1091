"""LoRA settings for an expert, and the bridge to ``peft``.

Why a dataclass of our own rather than ``peft.LoraConfig``: it is what the CLI and YAML configs see (plain values,
help from the attribute docstrings), it validates early with messages that name the setting, and its defaults for
``target_modules`` depend on the model family, which ``peft`` does not know about.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from drm_lightning.models.backbone import check_family

# Attention query/value projections: the classic LoRA placement (Hu et al., 2021). Layer names differ between
# architectures and between transformers versions (ViT: query/value in 4.x, q_proj/v_proj in 5.x), so each family
# lists candidates in order of preference and the first whose layers all exist in the backbone is used.
DEFAULT_TARGET_MODULES: dict[str, list[list[str]]] = {
    "encoder": [["query", "value"], ["query_proj", "value_proj"], ["q_proj", "v_proj"], ["q_lin", "v_lin"]],
    "decoder": [["q_proj", "v_proj"], ["query", "value"]],
    "decoder_lm": [["q_proj", "v_proj"], ["query", "value"]],
    "seq2seq": [["q", "v"], ["q_proj", "v_proj"]],
    "vision": [["query", "value"], ["q_proj", "v_proj"]],
    "clip": [["q_proj", "v_proj"]],
}

ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    """LoRA hyperparameters of an expert (``peft`` LoRA on the backbone; the task head stays fully trainable)."""

    r: int = 8
    """Rank of the update ``B @ A``."""
    alpha: float = 16.0
    """Scaling numerator: the update is ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | None = None
    """Names (suffixes) of the linear layers to adapt; None picks the attention query/value layers of the family."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023)."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r={self.r!r}: expected a positive integer")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha!r}: expected a positive finite number")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r}: expected a number in [0, 1)")
        if self.target_modules is not None:
            bad = isinstance(self.target_modules, str) or not all(isinstance(t, str) and t for t in self.target_modules)
            if bad or not self.target_modules:
                raise ValueError(
                    f"lora.target_modules={self.target_modules!r}: expected a non-empty list of module names, or None"
                )
            self.target_modules = list(self.target_modules)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @property
    def scale(self) -> float:
        """The factor multiplying ``B @ A`` (as ``peft`` computes it)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def resolved_targets(self, family: str, backbone: torch.nn.Module) -> list[str]:
        """``target_modules``, or the family's default query/value layers that exist in ``backbone``."""
        if self.target_modules is not None:
            return list(self.target_modules)
        check_family(family)
        linear_names = {
            name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)
        }
        for candidate in DEFAULT_TARGET_MODULES[family]:
            if set(candidate) <= linear_names:
                return list(candidate)
        raise ValueError(
            f"lora.target_modules=None: no default query/value layers {DEFAULT_TARGET_MODULES[family]} found in the "
            f"{family} backbone ({type(backbone).__name__}); set lora.target_modules"
        )


def add_lora(backbone: torch.nn.Module, settings: LoraSettings, family: str) -> torch.nn.Module:
    """Wrap ``backbone`` with ``peft`` LoRA adapters; only the adapter factors stay trainable.

    Raises:
        ValueError: when none of the target modules exists in the backbone (the message lists what was asked).
    """
    from peft import LoraConfig, get_peft_model

    targets = settings.resolved_targets(family, backbone)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.use_rslora,
        bias="none",
    )
    try:
        return get_peft_model(backbone, config)
    except ValueError as err:
        raise ValueError(f"lora.target_modules={targets!r} do not match the {family} backbone: {err}") from None


_LORA_KEY = re.compile(rf"^(?P<base>.+)\.lora_(?P<which>[AB])\.{ADAPTER_NAME}\.weight$")


def backbone_name(peft_name: str) -> str:
    """Map a ``peft`` parameter name to the plain backbone's ``state_dict()`` name.

    ``base_model.model.encoder.layer.0.attention.self.query.base_layer.weight`` ->
    ``encoder.layer.0.attention.self.query.weight``. Names that ``peft`` did not touch pass through.
    """
    name = peft_name[len(_PEFT_PREFIX) :] if peft_name.startswith(_PEFT_PREFIX) else peft_name
    return name.replace(".base_layer.", ".")


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a ``peft`` model's state dict into LoRA factors and everything else, both under backbone names.

    Returns:
        ``(factors, rest)``: ``factors`` maps ``"<weight name>.lora_A"`` ([r, in]) and ``"<weight name>.lora_B"``
        ([out, r]) as in ``io/task_vector.py``; ``rest`` maps plain backbone names to the other tensors.
    """
    factors: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = backbone_name(key)
        match = _LORA_KEY.match(name)
        if match:
            factors[f"{match['base']}.weight.lora_{match['which']}"] = tensor
        elif ".lora_" in name:
            # lora_embedding_*, DoRA magnitudes, other adapters: the task-vector format has no place for them.
            raise ValueError(f"LoRA parameter {key!r}: only linear-layer LoRA (lora_A/lora_B) can be exported")
        else:
            rest[name] = tensor
    return factors, rest
