"""The one writer of a model folder: a ``transformers`` model's config and weights, its tokenizer, the task heads,
``merge.json`` and the model card, written atomically.

Every folder of merged weights is written through it: the merged model (``model_folder``: the base's own
architecture with ``λ·Δ_merged`` added, the base's tokenizer, ``heads/``, ``merge.json``, ``README.md``), each
task's classifier (``task_folders``: the expert's own architecture around the merged backbone, the merged folder's
tokenizer files) and a PEFT adapter (``adapter``: its own weights writer, then what the merged model gets).
A folder's tokenizer comes either from a base model (loaded and saved again, so a hub checkpoint's files come out
as ``transformers`` writes them today) or from a folder this project wrote (its ``io.tokenizer_files`` copied).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from drm_lightning.export.model_card import write_model_card
from drm_lightning.io.atomic import atomic_dir
from drm_lightning.io.tokenizer_files import TOKENIZER_CORE_FILES, copy_tokenizer_files, tokenizer_files
from drm_lightning.merging.engine.record import HEADS_DIR, MERGE_FILE
from drm_lightning.models.resolve import resolve_pretrained


def save_tokenizer(base: str, folder: Path) -> bool:
    """Save the base model's tokenizer into ``folder``, if it has one; return whether it did.

    A local base folder without any of ``TOKENIZER_CORE_FILES`` has none (``AutoTokenizer`` would build an empty one
    from a CLIP folder's image-processor config alone).
    """
    path = resolve_pretrained(base)
    if Path(path).is_dir() and not tokenizer_files(path, TOKENIZER_CORE_FILES):
        return False
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a hub model without a tokenizer, or an image model's folder
        return False
    tokenizer.save_pretrained(folder)
    return True


def write_folder(
    output: Path,
    weights: nn.Module | Callable[[Path], object],
    *,
    max_shard_size: str | int | None = None,
    tokenizer_of: str | None = None,
    tokenizer_files_of: Path | None = None,
    heads: Path | Callable[[Path], None] | None = None,
    record: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Write a model folder at ``output`` (replacing a previous one), atomically: a crash or an error leaves nothing
    at ``output``.

    Args:
        output: the folder; the model card names it (``output.name``), not the temporary sibling written first.
        weights: a ``transformers`` model, saved with ``save_pretrained`` (config, generation config, safetensors
            shards); or a function that writes the folder's config and weights into the folder it is given (a PEFT
            adapter's ``adapter_config.json`` and ``adapter_model.safetensors``).
        max_shard_size: ``save_pretrained``'s shard size (its own default when ``None``).
        tokenizer_of: a base model (hub id, folder, ``package://``) whose tokenizer is saved beside the weights.
        tokenizer_files_of: a folder whose tokenizer files are copied as they are (a merged folder this project wrote).
        heads: a ``heads/`` folder copied whole (if it exists), or a function that writes ``heads/`` into the folder
            it is given.
        record: ``merge.json`` (or a function giving it, called once everything else is written); a folder with one
            also gets its model card (``README.md``, read from it).
    """
    with atomic_dir(output) as tmp:
        if isinstance(weights, nn.Module):
            weights.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
        else:
            weights(tmp)
        if tokenizer_of is not None:
            save_tokenizer(tokenizer_of, tmp)
        if tokenizer_files_of is not None:
            copy_tokenizer_files(tokenizer_files_of, tmp)
        if isinstance(heads, Path):
            if heads.is_dir():
                shutil.copytree(heads, tmp / HEADS_DIR)
        elif heads is not None:
            heads(tmp)
        if record is not None:
            data = record() if callable(record) else record
            (tmp / MERGE_FILE).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            write_model_card(tmp, name=output.name)
