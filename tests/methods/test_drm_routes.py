"""DRM's memory-lean routes (``methods/drm_joint.py``, ``methods/drm_prune.py``) against the float64 reference.

The small shapes of ``test_functional_reference.py`` take the one-sort threshold route; here the projections have
more than ``4 · elementwise.SAMPLE`` entries, so the thresholds come from the sample, the one-pass count and the
bands, and the pruning runs over many chunks of rows. Also: the ``T·n`` row Gram (``T·n < m``) and the stacked SVD
that a ``rank_tol`` below ``linalg.GRAM_MIN_RATIO`` needs.
"""

from __future__ import annotations

import pytest
import torch

from drm_lightning.merging import functional as F
from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods import drm_joint
from drm_lightning.merging.ops import elementwise as E
from tests.helpers import delta_cases

COEFFS = [1.0, 0.5, -0.3, 2.0]
SWITCHES = [
    {},
    {"renormalise": False},
    {"elect_sign": False},
    {"disjoint_mean": False},
    {"renormalise": False, "elect_sign": False, "disjoint_mean": False},
]


@pytest.fixture(scope="module")
def large() -> list[torch.Tensor]:
    deltas = delta_cases.make_deltas("random", (300, 240), 4, seed=3)  # T·n·r = 4·300·240 > 4·SAMPLE
    assert 4 * 300 * 240 > 4 * E.SAMPLE
    return deltas


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "drm")
def test_large_parameter_matches_reference(large: list[torch.Tensor], direction: str, switches: dict) -> None:
    expected = ref.drm(large, direction, 0.7, COEFFS, **switches)
    assert ref.relative_error(F.drm(large, direction, 0.7, COEFFS, **switches), expected) <= 1e-9


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_sweep_equals_separate_merges(large: list[torch.Tensor], direction: str) -> None:
    """One basis, many settings in one pass over the chunks: each output is the separate merge's, bit for bit."""
    sets = [{"drop_rate": p} for p in (0.0, 0.5, 0.8, 0.9)] + [{"drop_rate": 0.7, **s} for s in SWITCHES[1:]]
    merged = F.drm_basis(large, direction, COEFFS).merge_all(sets)
    for params, out in zip(sets, merged, strict=True):
        assert torch.equal(out, F.drm(large, direction, coefficients=COEFFS, **params)), params


@pytest.mark.parametrize(("shape", "direction"), [((10, 90), "vertical"), ((90, 10), "horizontal")])
def test_row_gram_route(shape: tuple[int, int], direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``T·n < m``: the ``T·n``-sided row Gram, built block by block, and ``V_r = XᵀU_r / σ``."""
    routes: list[str] = []
    for name in ("_row_route", "_column_route"):
        real = getattr(drm_joint, name)
        monkeypatch.setattr(drm_joint, name, lambda *a, real=real, name=name: (routes.append(name), real(*a))[1])
    deltas = delta_cases.make_deltas("random", shape, 4, seed=1)
    expected = ref.drm(deltas, direction, 0.6, COEFFS)
    assert ref.relative_error(F.drm(deltas, direction, 0.6, COEFFS), expected) <= 1e-9
    assert routes == ["_row_route"]


def test_small_rank_tol_takes_the_stacked_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept components below ``GRAM_MIN_RATIO·σ_max`` (here 1e-7 with ``rank_tol=1e-8``): the Gram route would lose
    them, so the stacked float64 SVD is used, and the result still matches the reference."""
    gen = torch.Generator().manual_seed(0)
    n, m, tasks = 20, 16, 3
    spectrum = torch.logspace(0, -7, m, dtype=torch.float64)
    stacked = (delta_cases.orthonormal(tasks * n, m, gen) * spectrum) @ delta_cases.orthonormal(m, m, gen).T
    deltas = list(stacked.split(n))
    svds: list[int] = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **k: (svds.append(1), real_svd(a, **k))[1])
    out = F.drm(deltas, "vertical", 0.5, rank_tol=1e-8)
    assert svds, "the stacked SVD was not used"
    assert ref.relative_error(out, ref.drm(deltas, "vertical", 0.5, rank_tol=1e-8)) <= 1e-6


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_empty_parameter_gives_an_empty_result(shape: tuple[int, int], direction: str) -> None:
    out = F.drm([torch.zeros(shape)] * 2, direction)
    assert out.shape == shape and out.dtype == torch.float32
    assert F.drm_basis([torch.zeros(shape)] * 2, direction).merge_all([{"drop_rate": 0.5}, {}])[1].shape == shape
