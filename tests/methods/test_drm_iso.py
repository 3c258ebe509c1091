"""DRM-Iso against its float64 reference (``tests/reference.py``), dense and factored, every dtype and edge case."""

from __future__ import annotations

import zlib

import pytest
import torch

from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods.drm_iso import drm_iso
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

CASES = ("random", "rank_deficient", "zero_task", "tiny_task", "all_zero", "clustered_tasks", "disjoint")
COEFFS = [1.0, 0.5, -0.3, 2.0]


def _deltas(case: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    seed = zlib.crc32(f"drm_iso{case}{shape}".encode()) % 1000
    return [d.to(dtype) for d in delta_cases.make_deltas(case, shape, 4, seed=seed)]


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 80)], ids=["48x32", "32x80"])
@pytest.mark.parametrize("case", CASES)
def test_float32_matches_reference(case: str, shape: tuple[int, int], direction: str) -> None:
    deltas = _deltas(case, shape)
    drop = 0.0 if case == "disjoint" else 0.8  # disjoint: every joint singular value repeats, no pruning cut then
    out = drm_iso(deltas, direction, drop, COEFFS)
    expected = ref.drm_iso(deltas, direction, drop, COEFFS)
    assert out.dtype == torch.float32 and out.shape == shape and torch.isfinite(out).all()
    assert ref.relative_error(out, expected) <= 1e-5
    if case == "all_zero":
        assert not out.any()


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_float64_exact_and_bfloat16_only_rounds(direction: str) -> None:
    deltas = _deltas("random", (40, 24), torch.float64)
    assert ref.relative_error(drm_iso(deltas, direction, 0.5), ref.drm_iso(deltas, direction, 0.5)) <= 1e-9
    low = [d.to(torch.bfloat16) for d in deltas]
    expected = ref.drm_iso(low, direction, 0.5)
    assert drm_iso(low, direction, 0.5).dtype == torch.bfloat16
    assert ref.relative_error(drm_iso(low, direction, 0.5), expected.to(torch.bfloat16)) <= 1e-3
    assert ref.relative_error(drm_iso(low, direction, 0.5, out_dtype=torch.float32), expected) <= 1e-5


def test_spectrum_is_flat_at_iso_c_level() -> None:
    """Every kept singular value equals Iso-C's level: the mean singular value of the summed deltas."""
    deltas = _deltas("random", (48, 32), torch.float64)
    s = torch.linalg.svdvals(drm_iso(deltas))
    level = torch.linalg.svdvals(sum(deltas)).mean()
    assert torch.allclose(s, torch.full_like(s, float(level)), rtol=1e-9)


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_factored_lora_deltas_give_the_dense_result(direction: str) -> None:
    factors = delta_cases.low_rank_factors((48, 32), [2, 3, 2, 4])
    lowrank = [LowRankDelta(b, a, s) for b, a, s in factors]
    dense = [(s * b @ a) for b, a, s in factors]
    expected = ref.drm_iso(dense, direction, 0.5, COEFFS)
    assert ref.relative_error(drm_iso(lowrank, direction, 0.5, COEFFS), expected) <= 1e-9


def test_bad_arguments_name_the_value() -> None:
    deltas = _deltas("random", (8, 6))
    with pytest.raises(ValueError, match="drop_rate"):
        drm_iso(deltas, drop_rate=1.0)
    with pytest.raises(ValueError, match="direction"):
        drm_iso(deltas, direction="diagonal")
    with pytest.raises(ValueError, match="out_dtype"):
        drm_iso(deltas, out_dtype=torch.int32)


def test_registry_drop_rate_search_reuses_the_basis_and_equals_separate_merges() -> None:
    from drm_lightning.merging.methods.registry import get_method

    deltas = _deltas("random", (24, 16), torch.float64)
    method = get_method("drm_iso_h")
    sets = [{"drop_rate": p} for p in (0.0, 0.5, 0.9)]
    many = method.merge_many("matrix", deltas, sets, COEFFS)
    for params, out in zip(sets, many, strict=True):
        expected = ref.drm_iso(deltas, "horizontal", params["drop_rate"], COEFFS)
        assert ref.relative_error(out, expected) <= 1e-9
    assert torch.equal(method.merge_elementwise(deltas, COEFFS), get_method("iso_c").merge_elementwise(deltas, COEFFS))
