"""The registry collects every method module's ``METHODS`` (merging/methods/registry.py): a new method is one new file.

What a new module in ``merging/methods/`` must bring along is held here and next to the tables it feeds: a section
of docs/methods.md (below), a float64 reference row (``test_functional_reference.py``), its non-matrix rule
(``test_method_rules.py``) and a merge config (``test_configs.py``).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from drm_lightning.merging import functional as F
from drm_lightning.merging.methods.registry import METHODS, collect_methods, get_method, method_modules
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

ROOT = Path(__file__).resolve().parents[2]


def _entry(name: str) -> MergeMethod:
    return MergeMethod(name, name.upper(), "https://example.org", F.task_arithmetic, False, {})


def _module(name: str, methods: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.METHODS = methods  # type: ignore[attr-defined]
    return module


def test_every_method_module_contributes_its_entries_in_module_order() -> None:
    modules = method_modules()
    expected = [m.name for module in modules for m in getattr(module, "METHODS", ())]
    assert list(METHODS) == expected
    assert {"basic", "drm", "drm_iso", "iso", "tsv"} <= {m.__name__.rsplit(".", 1)[1] for m in modules}
    for name, method in METHODS.items():
        assert get_method(name) is method and method.name == name


def test_a_new_module_in_a_methods_package_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The discovery itself, on a package of its own: the module file is all it takes."""
    package = tmp_path / "extra_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("VALUE = 1\n")  # no METHODS: contributes nothing
    (package / "knots.py").write_text(
        "from drm_lightning.merging.functional import task_mean\n"
        "from drm_lightning.merging.methods.spec import MergeMethod\n"
        "METHODS = (MergeMethod('knots', 'Knots', 'https://example.org', task_mean, False, {}),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import extra_methods

    try:
        found = collect_methods(method_modules(extra_methods))
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "extra_methods"]:
            del sys.modules[name]
    assert list(found) == ["knots"]


def test_a_name_declared_twice_names_both_modules() -> None:
    first, second = _module("pkg.first", (_entry("twin"),)), _module("pkg.second", (_entry("twin"),))
    with pytest.raises(ValueError, match=r"'twin' is declared twice: in pkg\.first and in pkg\.second"):
        collect_methods([first, second])


@pytest.mark.parametrize("bad", [[_entry("listed")], (_entry("ok"), "not a method")], ids=["list", "stray"])
def test_methods_must_be_a_tuple_of_merge_methods(bad: object) -> None:
    with pytest.raises(ValueError, match=r"pkg\.bad\.METHODS must be a tuple of MergeMethod"):
        collect_methods([_module("pkg.bad", bad)])


def test_every_registered_method_has_a_section_in_docs_methods() -> None:
    """A ``## `` heading of docs/methods.md names each registry key in backticks (its contract)."""
    headings = [line for line in (ROOT / "docs" / "methods.md").read_text().splitlines() if line.startswith("## ")]
    named = {name for line in headings for name in re.findall(r"`([a-z0-9_]+)`", line)}
    missing = sorted(set(METHODS) - named)
    assert not missing, f"docs/methods.md has no '## ... `name`' section for {missing}"


def test_a_registered_method_without_a_named_grid_gets_the_grid_of_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    from drm_lightning.evaluation.lambda_search import ELEMENTWISE_GRID, SVD_GRID, default_grid

    svd = MergeMethod("knots", "Knots", "https://example.org", F.iso_c, True, {}, elementwise=F.task_mean)
    monkeypatch.setitem(METHODS, "knots", svd)
    monkeypatch.setitem(METHODS, "braids", _entry("braids"))
    assert default_grid("knots") == list(SVD_GRID) and default_grid("braids") == list(ELEMENTWISE_GRID)
    for name in METHODS:
        assert default_grid(name)
    with pytest.raises(ValueError, match="no default λ grid"):
        default_grid("unregistered")


def test_a_method_brings_the_checks_of_its_own_parameters() -> None:
    def check_knots(value: object) -> int:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"knots must be a positive integer, got {value!r}")
        return value

    method = MergeMethod(
        "knots",
        "Knots",
        "https://example.org",
        F.task_arithmetic,
        False,
        {"knots": 3},
        param_checks={"knots": check_knots},
    )
    assert method.check({"knots": 5}) == {"knots": 5}
    with pytest.raises(ValueError, match="knots: knots must be a positive integer, got 0"):
        method.check({"knots": 0})
    with pytest.raises(ValueError, match=r"parameter\(s\) \['knots'\] have no check"):
        MergeMethod("knots", "Knots", "https://example.org", F.task_arithmetic, False, {"knots": 3})


def test_the_float64_reference_imports_no_method_code() -> None:
    """``merging/reference.py`` is the independent check of every method: it must not reuse what it checks."""
    import ast

    tree = ast.parse((ROOT / "drm_lightning" / "merging" / "reference.py").read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [name for name in imported if (name or "").startswith("drm_lightning")], imported


def _span_residuals(merged: torch.Tensor, lora: list[LowRankDelta]) -> dict[str, float]:
    """Relative residual of ``merged`` outside the joint column space of the ``B_i`` and the row space of the
    ``A_i``."""
    cols, _ = torch.linalg.qr(torch.cat([f.B for f in lora], dim=1))
    rows, _ = torch.linalg.qr(torch.cat([f.A for f in lora]).mT)
    norm = merged.norm()
    return {
        "columns": float((merged - cols @ (cols.mT @ merged)).norm() / norm),
        "rows": float((merged - (merged @ rows) @ rows.mT).norm() / norm),
    }


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_lora_span_is_where_the_merge_of_lora_experts_lies(name: str, shape: tuple[int, int]) -> None:
    """``lora_span`` (what ``save_as=adapter`` trusts) against float64 merges of random LoRA factors (RegMean's with
    random data Grams): inside the declared spans to rounding, and far outside the others, so no method is
    declared exact that is not, nor refused that is."""
    n, m = shape
    gen = torch.Generator().manual_seed(3)
    f64 = torch.float64
    lora = [LowRankDelta(b, a, 0.5) for b, a in delta_cases.agreeing_factors(shape, (2, 3, 2), gen)]
    inputs = [torch.randn(3 * m, m, generator=gen, dtype=f64) for _ in lora]
    method = METHODS[name]
    kwargs = {"statistics": [x.T @ x / x.shape[0] for x in inputs]} if method.needs_statistics else {}
    merge = method.merge_matrix if method.matrix_only else method.fn
    residual = _span_residuals(merge(lora, out_dtype=f64, **kwargs), lora)
    inside = {"both": {"columns", "rows"}, "columns": {"columns"}, "rows": {"rows"}, None: set()}[method.lora_span]
    for span, value in residual.items():
        if span in inside:
            assert value < 1e-12, (span, value)
        else:
            assert value > 1e-4, (span, value)
