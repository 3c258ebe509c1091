"""The tokenizer (and image-processor) files of a ``save_pretrained`` folder: one list for every folder written.

Why one list: a merged model folder gets its base's tokenizer (``export.folder_writer.save_tokenizer``, which
looks for the core files in a local base folder first), the disk-space estimate counts those
(``merging.engine.space``), and each task's classifier folder copies every tokenizer file from the merged folder
(``export.task_folders``); two lists kept apart had already drifted (one knew ten files, the other five)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The files that define a tokenizer: a local base folder with none of them has no tokenizer to save (a folder with
#: only special tokens or an image processor's config would load as an empty tokenizer), and the disk-space estimate
#: counts these.
TOKENIZER_CORE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")
#: Every file of a saved tokenizer and image processor, as ``save_pretrained`` names them: the core files, special
#: and added tokens, BPE vocabularies and merges, the image processor's config.
TOKENIZER_FILES = (
    *TOKENIZER_CORE_FILES,
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
)


def tokenizer_files(folder: str | os.PathLike[str], names: tuple[str, ...] = TOKENIZER_FILES) -> list[Path]:
    """The files of ``names`` that ``folder`` holds, in their order (none for a missing folder)."""
    folder = Path(folder)
    return [folder / name for name in names if (folder / name).is_file()]


def copy_tokenizer_files(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[Path]:
    """Copy ``source``'s tokenizer files into the folder ``target`` (``shutil.copy2``: bytes and times); return the
    copies."""
    return [Path(shutil.copy2(path, Path(target) / path.name)) for path in tokenizer_files(source)]
