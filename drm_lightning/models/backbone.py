"""Load a pretrained ``transformers`` backbone per model family (fingerprints: ``task_vectors/fingerprint.py``).

Why one loader: the expert, the task-vector callback (which reloads ``W_0`` at the end of fitting), the merger and
the evaluator must all see the *same* module with the *same* ``state_dict()`` names, or deltas would not line up
with their base weights.

Families:

- ``"encoder"``: ``AutoModel`` (BERT, MiniLM, RoBERTa, DeBERTa-v2), with a classification head on top.
- ``"decoder"``: ``AutoModel`` (``LlamaModel``), head on the last non-pad token.
- ``"decoder_lm"``: ``AutoModelForCausalLM`` (``LlamaForCausalLM``); labels are words scored by the model's own
  ``lm_head``, so the whole causal LM is the backbone and a merged folder is a complete, generating causal LM.
- ``"seq2seq"``: ``AutoModelForSeq2SeqLM`` (``T5ForConditionalGeneration``); labels are words, so the LM head is
  the task head and the whole model is the backbone.
- ``"vision"``: ``AutoModel`` (``ViTModel``), head on the CLS token.
- ``"clip"``: ``CLIPVisionModelWithProjection`` read from a ``CLIPModel`` checkpoint: the vision tower and its
  projection are the backbone (fine-tuned and merged, under the same ``vision_model.*`` / ``visual_projection.*``
  names as in ``CLIPModel``); the task heads are frozen zero-shot class embeddings from the text tower.

Pooling layers: encoder and vision backbones are loaded with ``add_pooling_layer=False`` where the model class
accepts it (BERT, RoBERTa, ViT). Our heads pool ``last_hidden_state`` themselves, so a pooler would only cost
compute and carry parameters that never receive a gradient (and so never a delta). A checkpoint's pooler weights
are then reported by ``transformers`` as unused, which is expected.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from drm_lightning.io.task_vector import TORCH_DTYPES
from drm_lightning.models.resolve import resolve_pretrained

# Re-exported: callers have always imported the fingerprint from here.
from drm_lightning.task_vectors.fingerprint import fingerprint as fingerprint
from drm_lightning.task_vectors.fingerprint import fingerprint_matches as fingerprint_matches
from drm_lightning.task_vectors.fingerprint import fingerprint_state as fingerprint_state

if TYPE_CHECKING:  # transformers is imported where a model is built: its import costs ~0.5 s a merge never needs
    import transformers

    from drm_lightning.io.task_vector import TaskVectorMeta

FAMILIES = ("encoder", "decoder", "decoder_lm", "seq2seq", "vision", "clip")
#: Families whose LM head scores the labels as words: no task head of their own (``models/label_words.py``).
LABEL_WORD_FAMILIES = ("seq2seq", "decoder_lm")

POOLED_FAMILIES = ("encoder", "vision")


def check_family(family: str) -> str:
    """Return ``family`` if it is one of ``FAMILIES``; otherwise raise a ValueError naming it."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    return family


def parse_dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` (or ``torch.bfloat16``) -> ``torch.bfloat16``; None stays None; anything else is refused."""
    if torch_dtype is None:
        return None
    name = dtype_name(torch_dtype) if isinstance(torch_dtype, torch.dtype) else torch_dtype
    if name not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: expected one of {TORCH_DTYPES} or None")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how a dtype is written to meta.json and merge.json."""
    return str(dtype).removeprefix("torch.")


def accepts_pooling_flag(config: transformers.PretrainedConfig) -> bool:
    """Whether the ``AutoModel`` class for ``config`` takes ``add_pooling_layer`` (BERT, RoBERTa, ViT do)."""
    from transformers import AutoModel

    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def clip_vision_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The ``clip`` backbone's config: a ``CLIPConfig``'s vision part with the whole model's ``projection_dim``.

    Why: ``CLIPVisionConfig`` defaults its own ``projection_dim`` (512), which a checkpoint's ``vision_config`` need
    not repeat; the vision projection must map to the joint space the text embeddings live in. A vision-only config
    (a saved ``clip`` backbone or merged tower) passes through.
    """
    from transformers import CLIPConfig

    if not isinstance(config, CLIPConfig):
        return config
    vision = config.vision_config.__class__.from_dict(config.vision_config.to_dict())
    vision.projection_dim = config.projection_dim
    return vision


def load_backbone(
    name: str,
    family: str = "encoder",
    *,
    torch_dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> transformers.PreTrainedModel:
    """Load the pretrained backbone of ``family`` from a hub id, local folder or ``package://`` name.

    Args:
        name: hub id, ``save_pretrained`` folder, or ``package://<module>/<subpath>``.
        family: one of ``FAMILIES``.
        torch_dtype: weights dtype, a ``torch.dtype`` or its name (``None`` keeps the checkpoint's own dtype).
        trust_remote_code: off by default: nothing executable is loaded unless asked.
        gguf_file: a GGUF file name inside ``name`` (SmolLM2-style folders); dequantised on load.

    Returns:
        The model in eval mode, as ``from_pretrained`` leaves it.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    check_family(family)
    torch_dtype = parse_dtype(torch_dtype)
    path = resolve_pretrained(name)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if family == "seq2seq":
        return AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    if family == "decoder_lm":
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if family == "clip":
        from transformers import CLIPVisionModelWithProjection

        config = clip_vision_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
        return CLIPVisionModelWithProjection.from_pretrained(path, config=config, **kwargs)
    if family in POOLED_FAMILIES:
        config_kwargs = {k: v for k, v in kwargs.items() if k in ("trust_remote_code", "gguf_file")}
        config = AutoConfig.from_pretrained(path, **config_kwargs)
        if accepts_pooling_flag(config):
            kwargs["add_pooling_layer"] = False
    return AutoModel.from_pretrained(path, **kwargs)


def load_recorded_base(
    meta: TaskVectorMeta,
    *,
    name: str | None = None,
    family: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> transformers.PreTrainedModel:
    """Load the base model a task vector was taken against, the way its expert loaded it.

    Why: the fingerprint in ``meta.json`` is of the weights *as loaded* (dtype included), so a base fitted with
    ``torch_dtype=bfloat16`` or from a GGUF file must be reloaded the same way. Every argument left ``None`` takes
    the recorded value (``meta.base_model``, ``meta.family``, ``meta.torch_dtype``, ``meta.gguf_file``); an explicit
    one wins. ``trust_remote_code`` is never taken from the file: running a model folder's code stays opt-in.
    """
    options = meta.load_options(
        dtype_name(torch_dtype) if isinstance(torch_dtype, torch.dtype) else torch_dtype, gguf_file
    )
    return load_backbone(
        name if name is not None else meta.base_model,
        family if family is not None else meta.family,
        torch_dtype=options["torch_dtype"],
        gguf_file=options["gguf_file"],
        trust_remote_code=trust_remote_code,
    )
