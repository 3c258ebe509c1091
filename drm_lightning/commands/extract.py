"""``drm-lightning extract``: a fine-tuned ``transformers`` model or a PEFT LoRA adapter -> a task-vector folder.

::

    drm-lightning extract --base bert-base-uncased --model my-sst2-bert --output tv/sst2      # full fine-tune
    drm-lightning extract --adapter my-lora --output tv/task          # PEFT LoRA; base from adapter_config.json

Convert once, merge many times: the folder is the same format ``fit`` writes (``io/task_vector.py``), so
``merge``, ``evaluate`` and ``pipeline`` take it unchanged. ``merge`` also converts such folders itself when they
are given among ``--task_vectors`` (the same code, so the result is bit for bit the same).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal


def extract(
    output: str,
    model: str | None = None,
    adapter: str | None = None,
    base: str | None = None,
    family: Literal["encoder", "decoder", "decoder_lm", "seq2seq", "vision"] | None = None,
    task: str | None = None,
    skip: list[str] | None = None,
    torch_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
    gguf_file: str | None = None,
) -> Path:
    """Convert a fine-tuned model or a PEFT LoRA adapter into a task-vector folder.

    Args:
        output: the task-vector folder to write (task_vector.safetensors, head.safetensors, meta.json).
        model: a fully fine-tuned save_pretrained folder (or a hub id in the local cache); an adapter folder
            (adapter_config.json) given here is converted as an adapter.
        adapter: a PEFT LoRA adapter folder (PeftModel.save_pretrained).
        base: the model it was fine-tuned from (needed for --model; adapters default to their
            adapter_config.json's base_model_name_or_path).
        family: the backbone family (default: from the base's model_type).
        task: the task name (default: the folder's name).
        skip: regexes of backbone parameters to leave out (kept at the base's weights), e.g. the embeddings of a
            model with added tokens.
        torch_dtype: the dtype to load the base in (recorded, so merges load it the same way).
        gguf_file: a GGUF file inside the base folder to load it from.

    Returns:
        The task-vector folder.
    """
    from drm_lightning.interop.inputs import convert, input_kind

    if (model is None) == (adapter is None):
        raise ValueError("extract: give exactly one of --model (a fine-tuned model) or --adapter (a PEFT adapter)")
    source = model if model is not None else adapter
    assert source is not None
    kind = input_kind(source)
    if adapter is not None and kind != "adapter":
        raise ValueError(f"adapter={adapter!r}: no adapter_config.json there; a fine-tuned model goes to --model")
    out = convert(
        source, output, kind=kind, base=base, family=family, task=task, skip=list(skip or []),
        torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip
    print(f"task vector: {out}", file=sys.stderr)
    return out
