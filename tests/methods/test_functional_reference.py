"""Every merge method against the float64 references of ``drm_lightning.merging.reference`` (docs/methods.md, straight).

The contract asks for 1e-3 relative Frobenius error whatever dtype arrives; float32 outputs are held to ``TOL_F32``
(1e-5, i.e. nothing beyond float32 output rounding) so that a precision regression shows long before it breaks the
contract. bfloat16 outputs are compared with the float64 reference *rounded to bfloat16* (the method may add nothing
beyond the final cast), and with ``out_dtype=float32`` against the raw reference.

Structured inputs are used only where the method is well defined on them (see ``reference.make_deltas``):
repeated singular values for Task Arithmetic, TIES, DARE, Iso-C and Iso-CTS (no cut inside a cluster), per-task
clusters for TSV-M (no cut inside a cluster), and for DRM the block-diagonal tasks without pruning, where every
singular value of the stack repeats yet the result does not depend on the basis chosen inside the clusters.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods.registry import METHODS as REGISTRY
from drm_lightning.merging.methods.regmean import regmean, regmean_plusplus
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

TOL_F32 = 1e-5
CONTRACT_TOL = 1e-3
COEFFS = [1.0, 0.5, -0.3, 2.0]


@dataclass(frozen=True)
class Method:
    """A method under test: the implementation and its reference, called as ``f(deltas, coefficients)``."""

    name: str
    impl: Callable[..., Tensor]
    ref: Callable[..., Tensor]
    cases: tuple[str, ...]


def _grams(deltas: list[Tensor]) -> list[Tensor]:
    """RegMean's per-task input Grams for ``deltas``' width: ``XᵀX / rows`` of random inputs with fewer rows than
    columns (each Gram singular, their sum not) and feature scales spread over two orders of magnitude."""
    cols = deltas[0].shape[1]
    gen = torch.Generator().manual_seed(cols)
    scales = torch.logspace(-1, 1, cols, dtype=torch.float64)
    xs = [torch.randn(cols // 2 + 1, cols, generator=gen, dtype=torch.float64) * scales for _ in deltas]
    return [x.T @ x / x.shape[0] for x in xs]


COMMON = ("random", "rank_deficient", "zero_task", "tiny_task", "all_zero", "clustered_tasks")
CLUSTER_SAFE = (*COMMON, "clustered")

METHODS = [
    Method("task_arithmetic", lambda d, c, **k: F.task_arithmetic(d, c, **k), ref.task_arithmetic, CLUSTER_SAFE),
    Method("ties", lambda d, c, **k: F.ties(d, 0.3, c, **k), lambda d, c: ref.ties(d, 0.3, c), CLUSTER_SAFE),
    Method(
        "dare_ta",
        lambda d, c, **k: F.dare(d, 0.5, 7, "task_arithmetic", c, **k),
        lambda d, c: ref.dare(d, 0.5, 7, "task_arithmetic", c),
        CLUSTER_SAFE,
    ),
    Method(
        "dare_ties",
        lambda d, c, **k: F.dare(d, 0.3, 3, "ties", c, density=0.5, **k),
        lambda d, c: ref.dare(d, 0.3, 3, "ties", c, density=0.5),
        CLUSTER_SAFE,
    ),
    Method(
        "drm_v",
        lambda d, c, **k: F.drm(d, "vertical", 0.8, c, **k),
        lambda d, c: ref.drm_vertical(d, coefficients=c),
        COMMON,
    ),
    Method(
        "drm_h",
        lambda d, c, **k: F.drm(d, "horizontal", 0.8, c, **k),
        lambda d, c: ref.drm_horizontal(d, coefficients=c),
        COMMON,
    ),
    Method(
        "drm_v_no_prune",
        lambda d, c, **k: F.drm(d, "vertical", 0.0, c, **k),
        lambda d, c: ref.drm_vertical(d, 0.0, c),
        (*COMMON, "disjoint"),
    ),
    Method(
        "drm_h_no_prune",
        lambda d, c, **k: F.drm(d, "horizontal", 0.0, c, **k),
        lambda d, c: ref.drm_horizontal(d, 0.0, c),
        (*COMMON, "disjoint"),
    ),
    Method("iso_c", lambda d, c, **k: F.iso_c(d, c, **k), ref.iso_c, CLUSTER_SAFE),
    Method("iso_cts", lambda d, c, **k: F.iso_cts(d, 0.8, c, **k), lambda d, c: ref.iso_cts(d, 0.8, c), CLUSTER_SAFE),
    Method("tsv_m", lambda d, c, **k: F.tsv_m(d, c, **k), ref.tsv_m, COMMON),
    Method(
        "drm_iso_v",
        lambda d, c, **k: F.drm_iso(d, "vertical", 0.8, c, **k),
        lambda d, c: ref.drm_iso(d, "vertical", 0.8, c),
        COMMON,
    ),
    Method(
        "drm_iso_h",
        lambda d, c, **k: F.drm_iso(d, "horizontal", 0.8, c, **k),
        lambda d, c: ref.drm_iso(d, "horizontal", 0.8, c),
        COMMON,
    ),
    Method("model_stock", lambda d, c, **k: F.model_stock(d, c, **k), ref.model_stock, CLUSTER_SAFE),
    Method(
        "regmean",
        lambda d, c, **k: regmean(d, 0.9, coefficients=c, statistics=_grams(d), **k),
        lambda d, c: ref.regmean(d, _grams(d), 0.9, c),
        CLUSTER_SAFE,
    ),
    # RegMean++'s per-layer solve is RegMean's on the Grams the merged model gives (tests/evaluation/test_block_merge.py
    # checks those Grams against the equations on a two-layer model)
    Method(
        "regmean_plusplus",
        lambda d, c, **k: regmean_plusplus(d, coefficients=c, statistics=_grams(d), **k),
        lambda d, c: ref.regmean(d, _grams(d), 0.95, c),
        CLUSTER_SAFE,
    ),
    # O(1) deltas: lr 1e-2 moves the result as far from the sum as the default 1e-5 does on fine-tuning deltas
    Method(
        "wudi",
        lambda d, c, **k: F.wudi(d, 40, 1e-2, c, **k),
        lambda d, c: ref.wudi(d, 40, 1e-2, c),
        CLUSTER_SAFE,
    ),
    Method(
        "wudi_closed",
        lambda d, c, **k: F.wudi_closed(d, 0.01, c, **k),
        lambda d, c: ref.wudi_closed(d, 0.01, c),
        CLUSTER_SAFE,
    ),
    Method(
        "wudi_closed_small_ridge",
        lambda d, c, **k: F.wudi_closed(d, 1e-6, c, **k),
        lambda d, c: ref.wudi_closed(d, 1e-6, c),
        CLUSTER_SAFE,
    ),
]
"""One row (or more, named ``<registry name>_<variant>``) per registered method: a new method adds its row here."""
CASES = [(m, case) for m in METHODS for case in m.cases]
SHAPES = [(48, 32), (32, 80)]


def _inputs(case: str, shape: tuple[int, int], dtype: torch.dtype, tasks: int = 4) -> tuple[list[Tensor], list[float]]:
    deltas = [
        d.to(dtype)
        for d in delta_cases.make_deltas(case, shape, tasks, seed=zlib.crc32(f"{case}{shape}".encode()) % 1000)
    ]
    return deltas, COEFFS[:tasks]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("method", "case"), CASES, ids=[f"{m.name}-{c}" for m, c in CASES])
def test_float32_matches_reference(method: Method, case: str, shape: tuple[int, int]) -> None:
    deltas, coeffs = _inputs(case, shape, torch.float32)
    out = method.impl(deltas, coeffs)
    expected = method.ref(deltas, coeffs)
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.isfinite(out).all()
    assert ref.relative_error(out, expected) <= TOL_F32
    if case == "all_zero":
        assert not out.any()


@pytest.mark.parametrize(("method", "case"), CASES, ids=[f"{m.name}-{c}" for m, c in CASES])
def test_bfloat16_adds_only_the_final_rounding(method: Method, case: str) -> None:
    deltas, coeffs = _inputs(case, (48, 32), torch.bfloat16)
    expected = method.ref(deltas, coeffs)
    out = method.impl(deltas, coeffs)
    assert out.dtype == torch.bfloat16
    assert ref.relative_error(out, expected.to(torch.bfloat16)) <= CONTRACT_TOL
    wide = method.impl(deltas, coeffs, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    assert ref.relative_error(wide, expected) <= TOL_F32


def test_every_registered_method_has_a_reference_row() -> None:
    """The registry collects methods from their modules (merging/methods/registry.py); the contract test must not
    miss one."""
    rows = {m.name for m in METHODS}
    missing = [name for name in REGISTRY if not any(row == name or row.startswith(name + "_") for row in rows)]
    assert not missing, f"registered methods without a row in METHODS above (float64 reference): {missing}"


@pytest.mark.parametrize("shape", [(12, 80), (80, 12)], ids=["12x80", "80x12"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_float64_inputs_are_exact(method: Method, shape: tuple[int, int]) -> None:
    """Shapes where one Gram side is the ``T·n`` row side (DRM-V on 12x80, DRM-H on 80x12)."""
    deltas, coeffs = _inputs("random", shape, torch.float64, tasks=3)
    assert ref.relative_error(method.impl(deltas, coeffs), method.ref(deltas, coeffs)) <= 1e-9


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_one_task(method: Method) -> None:
    deltas, _ = _inputs("random", (32, 24), torch.float32, tasks=1)
    assert ref.relative_error(method.impl(deltas, [1.5]), method.ref(deltas, [1.5])) <= TOL_F32


def test_drm_precision_beats_float32_svd_of_the_stack() -> None:
    """Pairs of singular values 1e-4 apart: float32 SVD (the authors' code) mixes each pair, float64 does not.

    The problem is well posed (a 1e-7 relative perturbation of the input moves the float64 result by ~1e-3), yet
    the float32 evaluation of the very same equations lands several percent away.
    """
    gen = torch.Generator().manual_seed(0)
    n, m, tasks = 256, 192, 4
    base = torch.logspace(0, -1.5, m // 2, dtype=torch.float64)
    spectrum = torch.stack([base, base * (1 + 1e-4)], dim=1).reshape(-1)
    stacked = (delta_cases.orthonormal(tasks * n, m, gen) * spectrum) @ delta_cases.orthonormal(m, m, gen).T
    deltas = [x.float() for x in stacked.split(n)]
    expected = ref.drm_vertical(deltas)
    authors = ref.drm_vertical(deltas, dtype=torch.float32)
    ours = F.drm(deltas, out_dtype=torch.float64)
    assert ref.relative_error(ours, expected) <= 1e-8
    assert ref.relative_error(F.drm(deltas), expected) <= TOL_F32
    assert ref.relative_error(authors, expected) > 1e-2


def test_tsv_m_polar_factor_svd_fallback_when_ill_conditioned() -> None:
    """Tasks whose top right singular vectors nearly coincide make ``V`` nearly singular (σ_min ~ 5e-8): the Gram
    route alone would be far off there, so ``polar_factor`` must notice and use the SVD."""
    gen = torch.Generator().manual_seed(0)
    n, m, tasks = 96, 64, 4
    shared_v = delta_cases.orthonormal(m, m, gen)
    spectrum = torch.logspace(0, -4, m, dtype=torch.float64)
    deltas = []
    for _ in range(tasks):
        skew = torch.randn(m, m, generator=gen, dtype=torch.float64)
        rotation = torch.linalg.matrix_exp(1e-6 * (skew - skew.T))
        deltas.append((delta_cases.orthonormal(n, m, gen) * spectrum) @ (shared_v @ rotation).T)
    assert ref.relative_error(F.tsv_m(deltas), ref.tsv_m(deltas)) <= 1e-6


def test_iso_c_svd_fallback_for_tiny_kept_singular_values() -> None:
    """Kept singular values down to 3e-8·σ_max, which the Gram route cannot resolve (their squares are at eps64):
    ``thin_svd`` must notice and use the SVD."""
    gen = torch.Generator().manual_seed(1)
    n, m = 40, 30
    spectrum = torch.logspace(0, -7.5, m, dtype=torch.float64)
    total = (delta_cases.orthonormal(n, m, gen) * spectrum) @ delta_cases.orthonormal(m, m, gen).T
    deltas = [0.25 * total, 0.75 * total]
    expected = ref.iso_c(deltas, rank_tol=1e-8)
    assert ref.relative_error(F.iso_c(deltas, rank_tol=1e-8), expected) <= 1e-6


# --------------------------------------------------------------------------------------------------------------------
# rank_tol of Iso-C, Iso-CTS, TSV-M
# --------------------------------------------------------------------------------------------------------------------

SVD_METHODS = [
    pytest.param(F.iso_c, ref.iso_c, id="iso_c"),
    pytest.param(F.iso_cts, ref.iso_cts, id="iso_cts"),
    pytest.param(F.tsv_m, ref.tsv_m, id="tsv_m"),
]


@pytest.mark.parametrize(("fn", "reference"), SVD_METHODS)
def test_default_rank_tol_changes_nothing_on_full_rank_deltas(fn: Callable, reference: Callable) -> None:
    """No component of a full-rank delta falls under the default cut. A tolerance, not bit-identity: ``rank_tol``
    also picks the SVD route (Gram or direct, ``linalg.thin_svd``), so the two calls need not be one computation."""
    deltas, coeffs = _inputs("random", (48, 32), torch.float32)
    assert ref.relative_error(fn(deltas, coefficients=coeffs), fn(deltas, coefficients=coeffs, rank_tol=0.0)) <= 1e-6


@pytest.mark.parametrize(("fn", "reference"), SVD_METHODS)
def test_default_rank_tol_removes_the_noise_directions_of_lora_deltas(fn: Callable, reference: Callable) -> None:
    """Dense float32 LoRA deltas: the default equals the exact (factored) result; ``rank_tol=0`` turns the rounding
    noise of the zero singular values into full-rank garbage."""
    factors = delta_cases.low_rank_factors((48, 32), [2, 3, 2, 4])
    exact = fn([LowRankDelta(b, a, s) for b, a, s in factors])
    dense = [(s * b @ a).float() for b, a, s in factors]
    assert ref.relative_error(fn(dense), exact) <= TOL_F32
    assert ref.relative_error(fn(dense, rank_tol=0.0), exact) > 0.1


# --------------------------------------------------------------------------------------------------------------------
# LowRankDelta inputs
# --------------------------------------------------------------------------------------------------------------------

FACTORED = [
    pytest.param(lambda d: F.drm(d, "vertical"), id="drm_v"),
    pytest.param(lambda d: F.drm(d, "horizontal"), id="drm_h"),
    pytest.param(lambda d: F.drm(d, "vertical", drop_rate=0.0), id="drm_v_no_prune"),
    pytest.param(F.iso_c, id="iso_c"),
    pytest.param(F.iso_cts, id="iso_cts"),
    pytest.param(F.tsv_m, id="tsv_m"),
    pytest.param(F.task_arithmetic, id="task_arithmetic"),
    pytest.param(lambda d: F.ties(d, 0.4), id="ties"),
    pytest.param(lambda d: F.dare(d, 0.5, merge="ties"), id="dare"),
    pytest.param(F.wudi_closed, id="wudi_closed"),
    pytest.param(lambda d: F.wudi(d, 20, 1e-2), id="wudi"),
]


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((48, 32), [2, 3, 2, 4]), ((32, 80), [4, 4, 4]), ((40, 24), [8, 8, 8, 8])],
    ids=["tall-mixed-ranks", "wide", "joint-rank-exceeds-width"],
)
@pytest.mark.parametrize("fn", FACTORED)
def test_low_rank_factors_match_the_dense_path(fn: Callable, shape: tuple[int, int], ranks: list[int]) -> None:
    factors = delta_cases.low_rank_factors(shape, ranks)
    low_rank = [LowRankDelta(b.float(), a.float(), s) for b, a, s in factors]
    dense = [(s * b.float().double() @ a.float().double()) for b, a, s in factors]  # exact products, float64
    out = fn(low_rank)
    assert out.dtype == torch.float32 and out.shape == shape
    assert ref.relative_error(out, fn(dense)) <= TOL_F32
    mixed = fn([dense[0].float(), *low_rank[1:]])  # a mix is densified
    assert ref.relative_error(mixed, fn(dense)) <= TOL_F32


def test_low_rank_coefficients_and_scale() -> None:
    factors = delta_cases.low_rank_factors((30, 20), [3, 2, 3])
    low_rank = [LowRankDelta(b, a, s) for b, a, s in factors]
    dense = [lr.dense() for lr in low_rank]
    coeffs = [0.7, -1.2, 0.4]
    for fn in (
        F.iso_c,
        F.iso_cts,
        F.tsv_m,
        F.wudi_closed,
        lambda d, coefficients: F.drm(d, "horizontal", 0.5, coefficients),
    ):
        assert ref.relative_error(fn(low_rank, coefficients=coeffs), fn(dense, coefficients=coeffs)) <= 1e-9


# --------------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_cuda_matches_reference(method: Method, dtype: torch.dtype) -> None:
    deltas, coeffs = _inputs("random", (96, 64), dtype)
    cuda = [d.cuda() for d in deltas]
    out = method.impl(cuda, coeffs, out_dtype=torch.float32)
    assert out.device.type == "cuda"
    expected = method.ref(cuda, coeffs).cpu() if method.name.startswith("dare") else method.ref(deltas, coeffs)
    assert ref.relative_error(out.cpu(), expected) <= TOL_F32
    assert torch.equal(out, method.impl(cuda, coeffs, out_dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------------------
# Iso-CTS: every route of the implementation against the reference
# --------------------------------------------------------------------------------------------------------------------
# n > m: residuals formed and decomposed on their m side; n <= m: decomposed inside the complement of the common
# subspace, taken from the eigenbasis of the sum (or its full SVD); LowRankDelta: factored residuals. min(n, m) = 30
# is divisible by every T below, so common_fraction 0.01 gives k_c = 0 and 1.0 gives k_c = d (no residuals at all).

ISO_CTS_SHAPES = [(50, 30), (30, 50), (30, 30)]
ISO_CTS_FRACTIONS = [0.01, 0.5, 0.8, 1.0]
ISO_CTS_COEFFS = [0.7, -1.5, 2.0, 0.0, 0.4]  # a negative and a zero coefficient at T = 5


def _cancelling(shape: tuple[int, int], seed: int) -> list[Tensor]:
    """Three full-rank deltas whose sum has rank 3: ``rank_tol`` drops most of the top ``k_c`` common components, so
    the residuals must be taken in the complement of the *kept* ones (the dropped directions included)."""
    gen = torch.Generator().manual_seed(seed)
    n, m = shape
    a, b = (torch.randn(n, m, generator=gen, dtype=torch.float64) for _ in range(2))
    low = torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, m, generator=gen, dtype=torch.float64)
    return [a, b, low - a - b]


def _iso_cts_rows() -> list:
    """Every shape x T x common fraction on generic deltas; the special inputs on a few of those combinations."""
    special = [
        ("zero_task", 5, ISO_CTS_FRACTIONS),  # plus the zero coefficient: two tasks that contribute nothing
        # well defined only where k_c covers the joint rank 1 + 2T (zero residuals); otherwise more task vectors
        # than dimensions left, linearly dependent (see reference.make_deltas)
        ("rank_deficient", 5, [0.5, 0.8, 1.0]),
        ("all_zero", 2, [0.01, 1.0]),
        ("cancelling", 3, [0.5, 0.8]),
    ]
    rows = []
    for shape in ISO_CTS_SHAPES:
        name = f"{shape[0]}x{shape[1]}"
        for tasks in (2, 3, 5):
            rows += [
                pytest.param(shape, tasks, f, "random", id=f"{name}-T{tasks}-f{f}-random") for f in ISO_CTS_FRACTIONS
            ]
        for case, tasks, fractions in special:
            rows += [pytest.param(shape, tasks, f, case, id=f"{name}-T{tasks}-f{f}-{case}") for f in fractions]
    return rows


@pytest.mark.parametrize(("shape", "tasks", "fraction", "case"), _iso_cts_rows())
def test_iso_cts_routes_match_reference(shape: tuple[int, int], tasks: int, fraction: float, case: str) -> None:
    seed = zlib.crc32(f"{case}{shape}{tasks}".encode()) % 1000
    deltas = (
        _cancelling(shape, seed) if case == "cancelling" else delta_cases.make_deltas(case, shape, tasks, seed=seed)
    )
    for coeffs in (None, ISO_CTS_COEFFS[:tasks]):
        out = F.iso_cts(deltas, fraction, coeffs)
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
        if case == "all_zero":
            assert not out.any()
        else:
            assert ref.relative_error(out, ref.iso_cts(deltas, fraction, coeffs)) <= 1e-9


@pytest.mark.parametrize("fraction", ISO_CTS_FRACTIONS)
@pytest.mark.parametrize("ranks", [[2, 3], [2, 3, 1], [2, 1, 3, 2, 1]], ids=["T2", "T3", "T5"])
@pytest.mark.parametrize("shape", ISO_CTS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_iso_cts_low_rank_factors_match_reference(shape: tuple[int, int], ranks: list[int], fraction: float) -> None:
    """Independent factors: with k_c = 0 every task keeps all its components, otherwise the common subspace holds the
    joint rank and the residuals vanish; either way the method is well defined. At T = 5 one task's ``B`` is zero
    (LoRA's initialisation): it contributes nothing."""
    factors = delta_cases.low_rank_factors(shape, ranks, seed=len(ranks))
    low_rank = [LowRankDelta(b * (i != 4), a, s) for i, (b, a, s) in enumerate(factors)]
    dense = [lr.dense(torch.float64) for lr in low_rank]
    for coeffs in (None, ISO_CTS_COEFFS[: len(ranks)]):
        out = F.iso_cts(low_rank, fraction, coeffs)
        assert ref.relative_error(out, ref.iso_cts(dense, fraction, coeffs)) <= 1e-9


@pytest.mark.parametrize("shape", ISO_CTS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_iso_cts_svd_fallback_for_tiny_kept_common_values(shape: tuple[int, int]) -> None:
    """The sum's kept singular values reach 3e-8·σ_max, below what the Gram route resolves: the common subspace (and,
    for n <= m, its complement) must come from the float64 SVD. The per-task parts ``X_i`` cancel in the sum."""
    gen = torch.Generator().manual_seed(2)
    n, m = shape
    d = min(n, m)
    total = (
        delta_cases.orthonormal(n, d, gen) * torch.logspace(0, -7.5, d, dtype=torch.float64)
    ) @ delta_cases.orthonormal(m, d, gen).T
    x_1, x_2 = (0.1 * torch.randn(n, m, generator=gen, dtype=torch.float64) for _ in range(2))
    deltas = [total / 3 + x_1, total / 3 + x_2, total / 3 - x_1 - x_2]
    expected = ref.iso_cts(deltas, rank_tol=1e-8)
    assert ref.relative_error(F.iso_cts(deltas, rank_tol=1e-8), expected) <= 1e-6
