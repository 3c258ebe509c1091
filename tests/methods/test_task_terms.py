"""Per-task terms of the matrix methods that have them (``MergeMethod.task_terms``: RegMean, ``wudi_closed``).

What learned per-task coefficients weigh (``evaluation/coefficients.read_task_stacks``): the terms ``D_i`` sum to the
method's merge, and ``Σ_i λ_i D_i`` is the method's merge with coefficients ``λ_i c_i`` (nonzero ``λ_i``), both
against the float64 references of ``drm_lightning.merging.reference`` written from the equations; on the case table
of every method, dense and LoRA-factored alike.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import Tensor

from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods.registry import METHODS, get_method
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

F64 = torch.float64
CASES = ("random", "rank_deficient", "zero_task", "tiny_task", "all_zero", "clustered_tasks")
SHAPES = {"tall": (48, 32), "wide": (32, 80)}
COEFFS = [1.0, 0.5, -0.3, 2.0]
SCALES = [0.5, -1.5, 2.0, 0.25]  # learned coefficients λ_i, none zero
PARAMS = {"regmean": {"alpha": 0.9, "ridge": 1e-6}, "wudi_closed": {"ridge": 0.1}}


def grams_for(cols: int, tasks: int, seed: int) -> list[Tensor]:
    """Per-row mean Grams of random inputs with spread feature scales (fewer rows than columns: singular)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, cols, dtype=F64)
    out = []
    for _ in range(tasks):
        x = torch.randn(cols // 2, cols, generator=gen, dtype=F64) * scales
        out.append(x.T @ x / (cols // 2))
    return out


def reference(method: str, deltas: list[Tensor], grams: list[Tensor], coefficients: list[float]) -> Tensor:
    params = PARAMS[method]
    if method == "regmean":
        return ref.regmean(deltas, grams, params["alpha"], coefficients, params["ridge"])
    return ref.wudi_closed(deltas, params["ridge"], coefficients)


def terms(method: str, deltas: list, grams: list[Tensor], coefficients: list[float]) -> Tensor:
    spec = get_method(method)
    return spec.matrix_terms(
        deltas, coefficients, grams if spec.needs_statistics else None, **PARAMS[method], out_dtype=F64
    )  # fmt: skip


def case(name: str, shape: tuple[int, int]) -> tuple[list[Tensor], list[Tensor]]:
    seed = zlib.crc32(f"{name}{shape}".encode()) % 1000
    return delta_cases.make_deltas(name, shape, 4, seed=seed), grams_for(shape[1], 4, seed)


def test_the_methods_with_task_terms() -> None:
    assert sorted(name for name, m in METHODS.items() if m.task_terms is not None) == sorted(PARAMS)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", sorted(PARAMS))
def test_terms_sum_to_the_merge_and_scale_as_its_coefficients(method: str, name: str, shape: tuple[int, int]) -> None:
    deltas, grams = case(name, shape)
    got = terms(method, deltas, grams, COEFFS)
    assert got.shape == (4, *shape) and got.dtype == F64
    assert ref.relative_error(got.sum(dim=0), reference(method, deltas, grams, COEFFS)) <= 1e-9
    scaled = torch.tensordot(torch.tensor(SCALES, dtype=F64), got, dims=1)
    expected = reference(method, deltas, grams, [s * c for s, c in zip(SCALES, COEFFS, strict=True)])
    assert ref.relative_error(scaled, expected) <= 1e-9
    if name == "zero_task":
        assert not got[1].any()
    if name == "all_zero":
        assert not got.any()


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_one_task_matches_the_reference(method: str) -> None:
    deltas, grams = case("random", SHAPES["tall"])
    got = terms(method, deltas[:1], grams[:1], [1.0])[0]
    assert ref.relative_error(got, reference(method, deltas[:1], grams[:1], [1.0])) <= 1e-9


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("method", sorted(PARAMS))
def test_lora_factors_give_the_dense_terms(method: str, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(3)
    n, m = shape
    factors = [(torch.randn(n, r, generator=gen), torch.randn(r, m, generator=gen)) for r in (2, 3, 4, 2)]
    lora = [LowRankDelta(b, a) for b, a in factors]
    dense = [b @ a for b, a in factors]
    grams = [g.float() for g in grams_for(m, 4, 5)]
    torch.testing.assert_close(
        terms(method, lora, grams, COEFFS), terms(method, dense, grams, COEFFS), rtol=1e-5, atol=1e-5
    )  # fmt: skip


def test_a_method_without_task_terms_is_refused_in_one_line() -> None:
    deltas, _ = case("random", SHAPES["tall"])
    with pytest.raises(ValueError, match=r"^iso_c: its matrix rule has no per-task terms$"):
        get_method("iso_c").matrix_terms(deltas)
