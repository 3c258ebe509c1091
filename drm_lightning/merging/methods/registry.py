"""Name → merge method: every ``MergeMethod`` the method modules declare, collected once, looked up by name.

The one interface the merger uses (mergekit-style: name, reference, parameters, function): ``get_method(name)``,
then the entry's ``check``, ``merge_matrix``, ``merge_elementwise`` and ``merge_many`` (``methods/spec.py``).

Why collected and not listed here: a method is one file. Each module of ``drm_lightning.merging.methods`` that
defines a ``METHODS`` tuple contributes its entries, found with ``pkgutil`` in module-name order (entries within a
module in their own order), so adding ``methods/<family>.py`` registers its methods with no edit elsewhere
(docs/methods.md, "Adding a method"). Two entries of one name are an error naming both modules.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from drm_lightning.merging import methods
from drm_lightning.merging.methods.spec import MergeMethod

__all__ = ["METHODS", "collect_methods", "get_method", "method_modules"]


def method_modules(package: ModuleType = methods) -> list[ModuleType]:
    """Every module of ``package`` (not its subpackages, nor this registry), imported, in name order: the registry's
    sources."""
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.ispkg)
    modules = (f"{package.__name__}.{name}" for name in names)
    return [importlib.import_module(module) for module in modules if module != __name__]


def collect_methods(modules: list[ModuleType]) -> dict[str, MergeMethod]:
    """The ``METHODS`` entries of ``modules`` by name, in module order.

    Raises:
        ValueError: a ``METHODS`` that is not a tuple of ``MergeMethod``, or a name declared twice (both modules
            named).
    """
    found: dict[str, MergeMethod] = {}
    where: dict[str, str] = {}
    for module in modules:
        entries = getattr(module, "METHODS", ())
        if not isinstance(entries, tuple) or not all(isinstance(m, MergeMethod) for m in entries):
            raise ValueError(f"{module.__name__}.METHODS must be a tuple of MergeMethod, got {entries!r}")
        for method in entries:
            if method.name in found:
                raise ValueError(
                    f"merge method {method.name!r} is declared twice: in {where[method.name]} and in "
                    f"{module.__name__}; registry names must be unique"
                )
            found[method.name], where[method.name] = method, module.__name__
    return found


METHODS: dict[str, MergeMethod] = collect_methods(method_modules())
"""Every method, by registry name."""


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None
