"""Each method's own rules where the papers leave the matrix: non-matrix parameters and excluded matrices, DRM's
ablation switches, and the shared decompositions a parameter search reuses; against ``merging.reference``.

docs/methods.md, "Non-matrix parameters and excluded matrices": Task Arithmetic sums, TIES and DARE run
their own elementwise rule, DRM trims each delta to its largest fraction ``1 − p_nl`` then elects and merges, and
Iso-C, Iso-CTS and TSV-M take the plain mean ``(1/T) Σ c_i Δ_i``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods.registry import METHODS, get_method
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

COEFFS = [1.0, 0.5, -0.3, 2.0]
TOL = 1e-12

#: Every registered method -> the float64 reference of its non-matrix rule at the given (checked) parameters. A new
#: method must say here what its authors do outside the matrices.
NONMATRIX_REFERENCE: dict[str, Callable[[list[Tensor], list[float], dict], Tensor]] = {
    "task_arithmetic": lambda d, c, p: ref.task_arithmetic(d, c),
    "ties": lambda d, c, p: ref.ties(d, p["density"], c),
    "dare": lambda d, c, p: ref.dare(d, p["drop_rate"], p["seed"], p["merge"], c, p["density"]),
    "drm_v": lambda d, c, p: ref.drm_nonmatrix(d, p["nonmatrix_drop_rate"], c, p["elect_sign"], p["disjoint_mean"]),
    "drm_h": lambda d, c, p: ref.drm_nonmatrix(d, p["nonmatrix_drop_rate"], c, p["elect_sign"], p["disjoint_mean"]),
    "iso_c": lambda d, c, p: ref.task_mean(d, c),
    "iso_cts": lambda d, c, p: ref.task_mean(d, c),
    "tsv_m": lambda d, c, p: ref.task_mean(d, c),
    "drm_iso_v": lambda d, c, p: ref.task_mean(d, c),  # DRM-Iso: Iso-C's rule (docs/drm_study.md)
    "drm_iso_h": lambda d, c, p: ref.task_mean(d, c),
    "regmean": lambda d, c, p: ref.task_mean(d, c),  # RegMean: the plain mean, as its authors (docs/methods.md)
    "regmean_plusplus": lambda d, c, p: ref.task_mean(d, c),  # RegMean++: RegMean's rule (FusionBench's code)
    "wudi": lambda d, c, p: ref.task_mean(d, c),  # FusionBench's wudi_merging: the sum over T
    "wudi_closed": lambda d, c, p: ref.task_mean(d, c),
    "model_stock": lambda d, c, p: ref.model_stock(d, c),  # elementwise: one rule everywhere, as mergekit's
}
NONMATRIX_PARAMS = {
    "ties": [{"density": 0.4}],
    "dare": [{"drop_rate": 0.5, "seed": 3}, {"drop_rate": 0.3, "merge": "ties", "density": 0.6}],
    "drm_v": [{}, {"nonmatrix_drop_rate": 0.5}, {"nonmatrix_drop_rate": 0.3, "elect_sign": False}],
    "drm_h": [{"nonmatrix_drop_rate": 0.7, "disjoint_mean": False}],
}
ROWS = [(name, params) for name in METHODS for params in [{}, *NONMATRIX_PARAMS.get(name, [])]]


def _deltas(shape: tuple[int, ...], tasks: int = 4, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [0.5 * shared + torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(tasks)]


def test_every_method_has_a_nonmatrix_reference() -> None:
    assert set(NONMATRIX_REFERENCE) == set(METHODS)


@pytest.mark.parametrize("shape", [(37,), (9, 7)], ids=["bias", "excluded-matrix"])
@pytest.mark.parametrize(("name", "params"), ROWS, ids=[f"{n}-{i}" for n, i in ROWS])
def test_nonmatrix_rule_matches_reference(name: str, params: dict, shape: tuple[int, ...]) -> None:
    method = get_method(name)
    checked = method.check(params)
    deltas = _deltas(shape)
    out = method.merge_elementwise(deltas, coefficients=COEFFS, **checked)
    expected = NONMATRIX_REFERENCE[name](deltas, COEFFS, checked)
    assert out.dtype == torch.float64 and out.shape == shape
    assert ref.relative_error(out, expected) <= TOL


@pytest.mark.parametrize("name", ["iso_c", "iso_cts", "tsv_m"])
def test_iso_and_tsv_nonmatrix_is_the_plain_mean_not_the_election(name: str) -> None:
    """The earlier rule (DRM's elect and merge for every SVD method) differs on these deltas: a real change."""
    deltas = [x.float() for x in _deltas((64,))]
    out = get_method(name).merge_elementwise(deltas, coefficients=COEFFS)
    assert ref.relative_error(out, ref.task_mean(deltas, COEFFS)) <= 1e-6
    assert ref.relative_error(out, ref.elect_and_merge([d.double() for d in deltas], COEFFS)) > 0.1


def test_drm_nonmatrix_drop_rate_is_checked_and_only_for_nonmatrix() -> None:
    method = get_method("drm_v")
    with pytest.raises(ValueError, match=r"drm_v: nonmatrix_drop_rate must lie in \[0, 1\), got 1.0"):
        method.check({"nonmatrix_drop_rate": 1.0})
    with pytest.raises(ValueError, match="drm_v: renormalise must be true or false, got 'no'"):
        method.check({"renormalise": "no"})
    deltas = _deltas((12, 10))
    # the matrix rule ignores the non-matrix trim rate; the non-matrix rule ignores the matrix drop rate
    assert torch.equal(
        method.merge_matrix(deltas, nonmatrix_drop_rate=0.9), method.merge_matrix(deltas, nonmatrix_drop_rate=0.0)
    )
    assert torch.equal(method.merge_elementwise(deltas, drop_rate=0.1), method.merge_elementwise(deltas, drop_rate=0.9))


# --------------------------------------------------------------------------------------------------------------------
# DRM's ablation switches: every combination, dense and factored, both directions
# --------------------------------------------------------------------------------------------------------------------

SWITCHES = list(itertools.product([True, False], repeat=3))
SWITCH_IDS = [f"renorm{int(a)}-elect{int(b)}-disjoint{int(c)}" for a, b, c in SWITCHES]
REFERENCE = {"vertical": ref.drm_vertical, "horizontal": ref.drm_horizontal}


def _switches(combo: tuple[bool, bool, bool]) -> dict[str, bool]:
    return dict(zip(("renormalise", "elect_sign", "disjoint_mean"), combo, strict=True))


@pytest.mark.parametrize("drop_rate", [0.0, 0.6])
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("combo", SWITCHES, ids=SWITCH_IDS)
def test_drm_switches_dense_match_reference(combo: tuple[bool, bool, bool], direction: str, drop_rate: float) -> None:
    switches = _switches(combo)
    for shape in ((20, 14), (10, 36)):  # both Gram sides (the T·n row side on 10x36 for DRM-V)
        deltas = _deltas(shape, seed=shape[0])
        out = F.drm(deltas, direction, drop_rate, COEFFS, **switches)
        expected = REFERENCE[direction](deltas, drop_rate, COEFFS, **switches)
        assert ref.relative_error(out, expected) <= 1e-9


@pytest.mark.parametrize("drop_rate", [0.0, 0.6])
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("combo", SWITCHES, ids=SWITCH_IDS)
def test_drm_switches_lora_match_reference(combo: tuple[bool, bool, bool], direction: str, drop_rate: float) -> None:
    switches = _switches(combo)
    factors = delta_cases.low_rank_factors((24, 18), [2, 3, 2, 4], seed=4)
    low_rank = [LowRankDelta(b, a, s) for b, a, s in factors]
    dense = [lr.dense(torch.float64) for lr in low_rank]
    out = F.drm(low_rank, direction, drop_rate, COEFFS, **switches)
    assert ref.relative_error(out, REFERENCE[direction](dense, drop_rate, COEFFS, **switches)) <= 1e-9
    assert ref.relative_error(out, F.drm(dense, direction, drop_rate, COEFFS, **switches)) <= 1e-9


def test_drm_switches_change_the_result() -> None:
    """Each switch on its own moves the result (none is silently ignored)."""
    deltas = _deltas((20, 14))
    full = F.drm(deltas, drop_rate=0.6)
    for name in ("renormalise", "elect_sign", "disjoint_mean"):
        assert ref.relative_error(F.drm(deltas, drop_rate=0.6, **{name: False}), full) > 1e-3, name


def test_drm_without_pruning_or_renormalisation_is_the_projection() -> None:
    """No pruning: renormalisation cancels (B_i = Δ_i V_r either way), and with neither election nor disjoint
    mean DRM is the mean of the deltas projected onto the joint basis."""
    deltas = _deltas((20, 14))
    assert ref.relative_error(F.drm(deltas, drop_rate=0.0, renormalise=False), F.drm(deltas, drop_rate=0.0)) <= 1e-12
    plain = F.drm(deltas, drop_rate=0.0, rank_tol=0.0, elect_sign=False, disjoint_mean=False, coefficients=COEFFS)
    assert ref.relative_error(plain, ref.task_mean(deltas, COEFFS)) <= 1e-12


# --------------------------------------------------------------------------------------------------------------------
# Shared decompositions (a parameter search)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_drm_basis_serves_every_drop_rate(direction: str) -> None:
    deltas = [d.float() for d in _deltas((20, 14))]
    basis = F.drm_basis(deltas, direction, COEFFS)
    for drop_rate in (0.0, 0.5, 0.8, 0.9):
        again = F.drm(deltas, direction, drop_rate, COEFFS)
        assert torch.equal(basis.merge(drop_rate), again)  # the same computation, in the same order
        assert basis.merge(drop_rate).dtype == torch.float32
    assert basis.merge(0.5, out_dtype=torch.float64).dtype == torch.float64
    assert F.drm_basis([torch.zeros(5, 4)] * 2).rank == 0 and not F.drm_basis([torch.zeros(5, 4)] * 2).merge().any()


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["tall", "wide"])
def test_iso_cts_basis_serves_every_common_fraction(shape: tuple[int, int]) -> None:
    """One decomposition of the sum for all fractions (k_c = 0 and k_c = d included); each equals ``iso_cts``."""
    deltas = _deltas(shape)
    fractions = [0.01, 0.5, 0.8, 1.0]
    basis = F.iso_cts_basis(deltas, COEFFS)
    for fraction, out in zip(fractions, basis.merge_all([{"common_fraction": f} for f in fractions]), strict=True):
        assert ref.relative_error(out, ref.iso_cts(deltas, fraction, COEFFS)) <= 1e-9
        assert torch.equal(basis.merge(fraction), F.iso_cts(deltas, fraction, COEFFS))
    with pytest.raises(ValueError, match="unknown parameter"):
        basis.merge_all([{"drop_rate": 0.5}])


@pytest.mark.parametrize("name", list(METHODS))
def test_merge_many_equals_one_merge_per_parameter_set(name: str) -> None:
    method = get_method(name)
    sweeps = {
        "ties": [{"density": d} for d in (0.1, 0.4)],
        "dare": [{"drop_rate": p} for p in (0.3, 0.6)],
        "drm_v": [{"drop_rate": p} for p in (0.5, 0.9)] + [{"drop_rate": 0.5, "renormalise": False}],
        "drm_h": [{"drop_rate": 0.2}, {"drop_rate": 0.2, "rank_tol": 0.1}, {"nonmatrix_drop_rate": 0.4}],
        "iso_cts": [{"common_fraction": f} for f in (0.5, 0.8, 0.9)],
        "wudi": [{"steps": 0}, {"steps": 20, "lr": 1e-2}],
        "wudi_closed": [{"ridge": r} for r in (1e-3, 0.01, 0.1)],
    }.get(name, [{}, {}])
    matrix, vector = _deltas((20, 14)), _deltas((11,))
    many = method.merge_many("matrix", matrix, sweeps, COEFFS) if method.matrix_only else None
    for i, params in enumerate(sweeps):
        if many is not None:  # Iso-CTS shares a wider decomposition of the sum: another product, so a tolerance
            single = method.merge_matrix(matrix, COEFFS, **params)
            assert torch.equal(many[i], single) or (name == "iso_cts" and ref.relative_error(many[i], single) <= 1e-9)
    elementwise = method.merge_many("elementwise", vector, sweeps, COEFFS)
    for i, params in enumerate(sweeps):
        assert torch.equal(elementwise[i], method.merge_elementwise(vector, COEFFS, **params))
    with pytest.raises(ValueError, match="rule='diagonal'"):
        method.merge_many("diagonal", matrix, sweeps)
