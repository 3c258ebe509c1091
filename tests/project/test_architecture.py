"""Imports run one way (docs/architecture.md): the layer order, no cycle between packages or between modules, no
private name across modules.

Parsed with ``ast`` (nothing is imported), over every import: module level, inside functions (the lazy ones that keep
``import drm_lightning.merging.functional`` light) and under ``if TYPE_CHECKING:`` (a type from a higher layer is a
dependency all the same). A new package or top-level module must be given a layer in ``LAYERS``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "drm_lightning"

#: Lowest first. A unit (a package or a top-level module of drm_lightning) may import units of lower layers only;
#: units of one layer do not import each other. The same table is drawn in docs/architecture.md.
LAYERS: list[set[str]] = [
    {"verbosity", "memory", "world", "exit_cleanup"},  # utilities: import nothing of drm_lightning
    {"io"},  # every byte on disk: safetensors, the task-vector and merged-delta formats; every reader/writer uses it
    {"task_vectors"},  # the on-disk contract between experts and merging, and its fingerprint
    {"models"},  # backbones, heads, the expert LightningModule
    {"data", "callbacks", "interop", "merging"},  # datamodules; extraction callback; experts from HF/PEFT; the merge
    {"evaluation", "export"},  # validation of merged models, λ search, report; merged weights out (PEFT, ...)
    {"commands"},  # merge / evaluate / pipeline
    {"cli"},  # the one entry point
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """``drm_lightning.merging.engine.merger`` -> ``merging``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, root: Path) -> Iterator[tuple[int, str, str | None]]:
    """``(line, imported module, imported name or None)`` for every import of ``drm_lightning`` in ``path``."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    package = root.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            if target.split(".")[0] != package:
                continue
            for alias in node.names:
                # ``from drm_lightning.merging import functional`` imports a module: name it as such
                sub = f"{target}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    root.parent / Path(*sub.split("."))
                ).is_dir()
                yield (node.lineno, sub, None) if is_module else (node.lineno, target, alias.name)


def private_uses(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """``module._name`` attribute reads on a drm_lightning module bound by an import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == root.name:
            for alias in node.names:
                sub = root.parent / Path(*f"{node.module}.{alias.name}".split("."))
                if sub.with_suffix(".py").is_file() or sub.is_dir():
                    bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            bound.update(a.asname for a in node.names if a.asname and a.name.split(".")[0] == root.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield node.lineno, f"{node.value.id}.{node.attr}"


def problems(root: Path, layer: dict[str, int]) -> list[str]:
    """Every violation under ``root``, one line each (file:line and what is wrong)."""
    found: list[str] = []
    edges: dict[str, dict[str, str]] = {}
    module_edges: dict[str, dict[str, str]] = {}
    modules = {module_name(path, root) for path in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        unit = unit_of(module)
        where = path.relative_to(root.parent)
        if unit and unit not in layer:
            found.append(f"{where}: {unit!r} has no layer in LAYERS (docs/architecture.md)")
            continue
        for line, target, name in imports(path, root):
            dep = unit_of(target)
            if target in modules and target != module:
                module_edges.setdefault(module, {}).setdefault(target, f"{where}:{line}")
            private = [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if private and target != module:
                found.append(f"{where}:{line}: imports the private module {target}")
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                found.append(f"{where}:{line}: imports the private name {name} of {target}")
            if not unit or not dep or dep == unit:
                continue
            edges.setdefault(unit, {}).setdefault(dep, f"{where}:{line}")
            if dep not in layer:
                continue
            if layer[dep] >= layer[unit]:
                found.append(
                    f"{where}:{line}: {unit} (layer {layer[unit]}) imports {target} ({dep}, layer {layer[dep]}): "
                    "imports run from higher layers to lower ones only"
                )
        for line, use in private_uses(path, root):
            found.append(f"{where}:{line}: reads the private name {use} of another module")
    found.extend(cycles(edges))
    found.extend(module_cycles(module_edges))
    return list(dict.fromkeys(found))  # one line per import statement, however many names it takes


def cycles(edges: dict[str, dict[str, str]]) -> list[str]:
    """One line per import cycle between units, with the import that closes each step."""
    out: list[str] = []
    seen: set[frozenset[str]] = set()

    def visit(unit: str, path: list[str]) -> None:
        for dep in sorted(edges.get(unit, {})):
            if dep in path:
                loop = [*path[path.index(dep) :], dep]
                key = frozenset(loop)
                if key not in seen:
                    seen.add(key)
                    steps = ", ".join(f"{a} -> {b} ({edges[a][b]})" for a, b in zip(loop, loop[1:], strict=False))
                    out.append(f"import cycle between packages: {steps}")
            elif len(path) < len(edges) + 1:
                visit(dep, [*path, dep])

    for unit in sorted(edges):
        visit(unit, [unit])
    return out


def module_cycles(edges: dict[str, dict[str, str]]) -> list[str]:
    """One line per group of modules that import each other in a ring (a strongly connected component), naming one
    ring through it with the import that closes each step. Lazy imports inside functions count: they only move the
    cycle to run time."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(edges.get(node, {})):
            if dep not in index:
                connect(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    out = []
    for group in groups:
        ring = [group[0]]
        while True:  # follow edges inside the group (back to the start if it can, else somewhere new) until one repeats
            inside = [d for d in sorted(edges[ring[-1]]) if d in group]
            nxt = ring[0] if ring[0] in inside else next((d for d in inside if d not in ring), inside[0])
            if nxt in ring:
                ring = [*ring[ring.index(nxt) :], nxt]
                break
            ring.append(nxt)
        steps = ", ".join(f"{a} -> {b} ({edges[a][b]})" for a, b in zip(ring, ring[1:], strict=False))
        out.append(f"import cycle between modules: {steps}")
    return out


def test_imports_follow_the_layers_without_cycles_or_private_names() -> None:
    found = problems(ROOT, LAYER)
    assert found == [], "\n".join(found)


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {unit_of(module_name(p, ROOT)) for p in ROOT.rglob("*.py")} - {""}
    assert units == set(LAYER), f"in the package but not in LAYERS: {units - set(LAYER)}; stale: {set(LAYER) - units}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "drm_lightning"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a cycle (both directions also break the layer order)
            {"low/__init__.py": "", "low/a.py": "def f():\n    from drm_lightning.high.b import g\n",
             "high/__init__.py": "", "high/b.py": "from drm_lightning.low.a import f\n"},
            ["low/a.py:2: low (layer 0) imports drm_lightning.high.b", "import cycle between packages: high -> low"],
        ),
        (  # a type-only import from above
            {"low/__init__.py": "", "low/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
             "    from drm_lightning.high.b import G\n", "high/__init__.py": "", "high/b.py": "G = 1\n"},
            ["low/a.py:3: low (layer 0) imports drm_lightning.high.b"],
        ),
        (  # private names: imported, read as an attribute, a private module
            {"low/__init__.py": "", "low/a.py": "_x = 1\n", "low/_impl.py": "",
             "high/__init__.py": "", "high/b.py": "from drm_lightning.low.a import _x\n"
             "from drm_lightning.low import a\nprint(a._x)\nfrom drm_lightning.low import _impl\n"},
            ["high/b.py:1: imports the private name _x", "high/b.py:3: reads the private name a._x",
             "high/b.py:4: imports the private module drm_lightning.low._impl"],
        ),
        ({"other.py": ""}, ["'other' has no layer"]),  # a new unit must be placed
        (  # two modules of one package importing each other, one of them lazily
            {"low/__init__.py": "", "low/a.py": "from drm_lightning.low.b import g\n",
             "low/b.py": "def g():\n    from drm_lightning.low.a import f\n"},
            ["import cycle between modules: drm_lightning.low.a -> drm_lightning.low.b (drm_lightning/low/a.py:1), "
             "drm_lightning.low.b -> drm_lightning.low.a (drm_lightning/low/b.py:2)"],
        ),
        (  # a relative import is resolved like an absolute one
            {"low/__init__.py": "", "low/a.py": "from ..high import b\n", "high/__init__.py": "", "high/b.py": ""},
            ["low/a.py:1: low (layer 0) imports drm_lightning.high.b"],
        ),
    ],
    ids=["cycle", "type-only", "private", "unplaced", "module-cycle", "relative"],
)  # fmt: skip
def test_the_checker_finds_each_kind_of_violation(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    found = problems(_tree(tmp_path, files), {"low": 0, "high": 1})
    for text in expected:
        assert any(text in line for line in found), (text, found)


def test_the_checker_accepts_a_clean_tree(tmp_path: Path) -> None:
    files = {"low/__init__.py": "", "low/a.py": "_x = 1\nprint(_x)\n",
             "high/__init__.py": "", "high/b.py": "from drm_lightning.low.a import f\nfrom drm_lightning.low import a\n"
             "print(a.f)\n"}  # fmt: skip
    assert problems(_tree(tmp_path, files), {"low": 0, "high": 1}) == []


def test_the_float64_oracle_imports_nothing_of_drm_lightning() -> None:
    """``merging/reference.py`` checks the methods (tests, benchmarks): it must share no code with them
    (docs/architecture.md, "Where the float64 oracle lives")."""
    path = ROOT / "merging" / "reference.py"
    assert list(imports(path, ROOT)) == []
