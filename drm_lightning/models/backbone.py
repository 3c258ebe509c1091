"""Load a pretrained ``transformers`` backbone per model family, and fingerprint its weights.

Why one loader: the expert, the task-vector callback (which reloads ``W_0`` at the end of fitting), the merger and
the evaluator must all see the *same* module with the *same* ``state_dict()`` names, or deltas would not line up
with their base weights.

Families:

- ``"encoder"``: ``AutoModel`` (BERT, MiniLM, RoBERTa, DeBERTa-v2), with a classification head on top.
- ``"decoder"``: ``AutoModel`` (``LlamaModel``), head on the last non-pad token.
- ``"seq2seq"``: ``AutoModelForSeq2SeqLM`` (``T5ForConditionalGeneration``); labels are words, so the LM head is
  the task head and the whole model is the backbone.
- ``"vision"``: ``AutoModel`` (``ViTModel``), head on the CLS token.

Pooling layers: encoder and vision backbones are loaded with ``add_pooling_layer=False`` where the model class
accepts it (BERT, RoBERTa, ViT). Our heads pool ``last_hidden_state`` themselves, so a pooler would only cost
compute and carry parameters that never receive a gradient (and so never a delta). A checkpoint's pooler weights
are then reported by ``transformers`` as unused, which is expected.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from drm_lightning.models.resolve import resolve_pretrained

FAMILIES = ("encoder", "decoder", "seq2seq", "vision")

_POOLED_FAMILIES = ("encoder", "vision")


def check_family(family: str) -> str:
    """Return ``family`` if it is one of ``FAMILIES``; otherwise raise a ValueError naming it."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    return family


def _accepts_pooling_flag(config: transformers.PretrainedConfig) -> bool:
    """Whether the ``AutoModel`` class for ``config`` takes ``add_pooling_layer`` (BERT, RoBERTa, ViT do)."""
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def load_backbone(
    name: str,
    family: str = "encoder",
    *,
    torch_dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> transformers.PreTrainedModel:
    """Load the pretrained backbone of ``family`` from a hub id, local folder or ``package://`` name.

    Args:
        name: hub id, ``save_pretrained`` folder, or ``package://<module>/<subpath>``.
        family: one of ``FAMILIES``.
        torch_dtype: weights dtype (``None`` keeps the checkpoint's default, float32 for most).
        trust_remote_code: off by default: nothing executable is loaded unless asked.
        gguf_file: a GGUF file name inside ``name`` (SmolLM2-style folders); dequantised on load.

    Returns:
        The model in eval mode, as ``from_pretrained`` leaves it.
    """
    check_family(family)
    path = resolve_pretrained(name)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if family == "seq2seq":
        return AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    if family in _POOLED_FAMILIES:
        config_kwargs = {k: v for k, v in kwargs.items() if k in ("trust_remote_code", "gguf_file")}
        config = AutoConfig.from_pretrained(path, **config_kwargs)
        if _accepts_pooling_flag(config):
            kwargs["add_pooling_layer"] = False
    return AutoModel.from_pretrained(path, **kwargs)


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 hex digest of a module's ``state_dict()``: sorted names, dtype, shape and raw bytes.

    Why: a task vector records the fingerprint of the weights it was taken against, so the merger can refuse to
    add deltas onto a different base model. Tensors are hashed one at a time (contiguous, on CPU) so memory stays
    bounded by the largest tensor even for 8B models.
    """
    return fingerprint_state(module.state_dict())


def fingerprint_state(state: Mapping[str, torch.Tensor]) -> str:
    """``fingerprint`` of a plain ``name -> tensor`` mapping (e.g. the frozen part of a checkpoint)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(str(tensor.dtype).encode())
        digest.update(b"\0")
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(b"\0")
        raw = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().data)
    return digest.hexdigest()
