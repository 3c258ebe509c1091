"""JSON files read back: one reader whose errors name the file (missing, not JSON, not an object)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(
    path: str | os.PathLike[str], *, error: type[ValueError] = ValueError, hint: str | None = None
) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        error: what to raise (the caller's own ``ValueError`` subclass, e.g. ``TaskVectorError``).
        hint: added to the "not found" message, e.g. ``"is <folder> a task vector folder?"``.

    Raises:
        error: the file is missing, not JSON, or holds something other than an object (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found" + (f" ({hint})" if hint else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
