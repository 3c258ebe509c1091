"""The one writer of a model folder: a ``transformers`` model's config and weights, its tokenizer, the task heads,
``merge.json`` and the model card, written atomically.

Two folders are written through it: the merged model (``model_folder``: the base's own architecture with
``λ·Δ_merged`` added, the base's tokenizer, ``heads/``, ``merge.json``, ``README.md``) and each task's classifier
(``task_folders``: the expert's own architecture around the merged backbone, the merged folder's tokenizer files).
A folder's tokenizer comes either from a base model (loaded and saved again, so a hub checkpoint's files come out
as ``transformers`` writes them today) or from a folder this project wrote (its ``io.tokenizer_files`` copied).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drm_lightning.export.model_card import write_model_card
from drm_lightning.io.atomic import atomic_dir
from drm_lightning.io.tokenizer_files import TOKENIZER_CORE_FILES, copy_tokenizer_files, tokenizer_files
from drm_lightning.merging.engine.record import MERGE_FILE
from drm_lightning.models.resolve import resolve_pretrained

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def save_tokenizer(base: str, folder: Path) -> bool:
    """Save the base model's tokenizer into ``folder``, if it has one; return whether it did.

    A local base folder without any of ``TOKENIZER_CORE_FILES`` has none (``AutoTokenizer`` would build an empty one
    from a CLIP folder's image-processor config alone).
    """
    from transformers import AutoTokenizer

    path = resolve_pretrained(base)
    if Path(path).is_dir() and not tokenizer_files(path, TOKENIZER_CORE_FILES):
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a hub model without a tokenizer, or an image model's folder
        return False
    tokenizer.save_pretrained(folder)
    return True


def write_folder(
    output: Path,
    model: PreTrainedModel,
    *,
    max_shard_size: str | int | None = None,
    tokenizer_of: str | None = None,
    tokenizer_files_of: Path | None = None,
    heads: Callable[[Path], None] | None = None,
    record: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as a ``save_pretrained`` folder at ``output`` (replacing a previous one), atomically: a crash
    or an error leaves nothing at ``output``.

    Args:
        output: the folder; the model card names it (``output.name``), not the temporary sibling written first.
        model: saved with ``save_pretrained`` (its config, generation config and safetensors shards).
        max_shard_size: ``save_pretrained``'s shard size (its own default when ``None``).
        tokenizer_of: a base model (hub id, folder, ``package://``) whose tokenizer is saved beside the weights.
        tokenizer_files_of: a folder whose tokenizer files are copied as they are (a merged folder this project wrote).
        heads: writes ``heads/`` into the folder it is given.
        record: ``merge.json``; a folder with one also gets its model card (``README.md``, read from it).
    """
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
        if tokenizer_of is not None:
            save_tokenizer(tokenizer_of, tmp)
        if tokenizer_files_of is not None:
            copy_tokenizer_files(tokenizer_files_of, tmp)
        if heads is not None:
            heads(tmp)
        if record is not None:
            (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
            write_model_card(tmp, name=output.name)
