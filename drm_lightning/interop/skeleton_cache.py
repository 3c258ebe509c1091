"""The base's skeleton kept on disk between commands, so a merge of model folders whose base was described before
builds nothing through ``transformers``.

Why: describing the base (``interop/base.py``) builds it on the meta device through ``transformers``, which for a
Llama imports the library, its config and modelling modules and builds the layers: about 2 s of every merge of
model folders, a third of a Task Arithmetic merge of four 135 M experts. The skeleton is a pure function of a few
inputs, so it is remembered by all of them:

* the family and the text of ``config.json`` (a rewritten config is another entry);
* the ``transformers`` and ``torch`` versions;
* the source of the code that builds the skeleton and reads it (``interop/base.py``, ``interop/names.py``,
  ``models/backbone.py``, this module), so an edited rule is never answered from an old entry.

An entry holds the backbone's names and shapes, its ``base_model_prefix``, its token-embedding names, and the
checkpoint renames looked up so far (``names.checkpoint_renamer``'s answers, key by key). A key not yet looked up
builds the real renamer (and imports ``transformers``) then, and is added to the entry; a key the renamer refuses
(a fused or split weight) raises as it always did and is not remembered.

Where: ``DRM_LIGHTNING_CACHE`` (a folder; ``off`` turns the cache off), else ``$XDG_CACHE_HOME/drm_lightning``,
else ``~/.cache/drm_lightning``; one small JSON file per entry under ``skeletons/``. The cache only saves time: an
entry that cannot be read or does not parse is built again and overwritten, a folder that cannot be written is
left alone, and entries are replaced atomically (two processes writing one entry leave one whole file).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from drm_lightning.interop.names import Rename

#: The environment variable that names the cache folder (``off``: no cache).
CACHE_ENV = "DRM_LIGHTNING_CACHE"
#: Bumped when an entry's layout changes.
FORMAT = 1
#: The modules whose source the skeleton and its reading depend on (relative to the package folder).
_SOURCES = ("interop/base.py", "interop/names.py", "interop/skeleton_cache.py", "models/backbone.py")

Skeleton = tuple[dict[str, tuple[int, ...]], str, list[str], Rename]


def cache_folder() -> Path | None:
    """The folder entries live in, or None where ``DRM_LIGHTNING_CACHE=off`` (or there is no home folder)."""
    named = os.environ.get(CACHE_ENV, "")
    if named.strip().lower() == "off":
        return None
    if named:
        return Path(named).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "drm_lightning"
    try:
        return Path.home() / ".cache" / "drm_lightning"
    except RuntimeError:  # no home folder to be found: no cache
        return None


def cached_skeleton(family: str, config_text: str, build: Callable[[], Skeleton]) -> Skeleton:
    """The skeleton of a base with this family and ``config.json`` text: from the cache, else ``build()`` (then
    remembered). The rename returned answers from the entry and builds the real one only for a key it lacks."""
    path = _entry_path(family, config_text)
    entry = _read(path) if path is not None else None
    if entry is None:
        shapes, prefix, embeddings, rename = build()
        memo = _RenameMemo(path, {"shapes": shapes, "prefix": prefix, "embeddings": embeddings}, {}, lambda: rename)
        memo.save()
        return shapes, prefix, embeddings, memo
    shapes = {name: tuple(shape) for name, shape in entry["shapes"].items()}
    memo = _RenameMemo(path, entry, dict(entry["renames"]), lambda: build()[3])
    return shapes, entry["prefix"], list(entry["embeddings"]), memo


class _RenameMemo:
    """``names.checkpoint_renamer``'s answers, remembered key by key in the entry at ``path``."""

    def __init__(self, path: Path | None, entry: dict[str, Any], renames: dict[str, str], real: Callable[[], Rename]):
        self._path, self._entry, self._renames, self._make_real = path, entry, renames, real
        self._real: Rename | None = None
        self._unsaved = False

    def __call__(self, key: str) -> str:
        if key not in self._renames:
            if self._real is None:
                self._real = self._make_real()
            self._renames[key] = self._real(key)  # a refused key raises here and is not remembered
            self._unsaved = True
            _UNSAVED.add(self)
        return self._renames[key]

    def save(self) -> None:
        """Write the entry with every rename answered so far (atomically; a folder that cannot be written is left)."""
        self._unsaved = False
        if self._path is None:
            return
        entry = {**self._entry, "format": FORMAT, "renames": dict(sorted(self._renames.items()))}
        entry["shapes"] = {name: list(shape) for name, shape in entry["shapes"].items()}
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.stem}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    json.dump(entry, out)
                os.replace(temporary, self._path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError:
            pass


#: Memos with renames not yet on disk: saved when the process exits (a rename is looked up key by key, so writing
#: the entry at each new key would write it once per head tensor).
_UNSAVED: set[_RenameMemo] = set()


@atexit.register
def _save_unsaved() -> None:
    while _UNSAVED:
        memo = _UNSAVED.pop()
        if memo._unsaved:
            memo.save()


def _entry_path(family: str, config_text: str) -> Path | None:
    folder = cache_folder()
    if folder is None:
        return None
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in (str(FORMAT), family, config_text, _version("transformers"), torch.__version__):
        digest.update(part.encode("utf-8") + b"\0")
    for source in _SOURCES:
        digest.update((package / source).read_bytes() + b"\0")
    return folder / "skeletons" / f"{digest.hexdigest()[:40]}.json"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _read(path: Path) -> dict[str, Any] | None:
    """The entry at ``path``, or None where there is none or it is not one this format wrote."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return None
    shapes, renames = entry.get("shapes"), entry.get("renames")
    if not (
        isinstance(shapes, dict)
        and all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes.values())
        and isinstance(entry.get("prefix"), str)
        and isinstance(entry.get("embeddings"), list)
        and all(isinstance(name, str) for name in entry["embeddings"])
        and isinstance(renames, dict)
        and all(isinstance(value, str) for value in renames.values())
    ):
        return None
    return entry
