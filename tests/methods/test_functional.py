"""The contract every merge method keeps, run over the registry as one table; argument checking; building blocks.

Which identities hold for which method (and why the others do not):

* one task under Task Arithmetic returns its delta (bit for bit).
* coefficient 0 removes a task: Task Arithmetic and Iso-C only (they see ``Σ c_i Δ_i``). TIES, DARE-TIES and DRM
  elect on the *unweighted* sum, so a zero-coefficient task still votes; DRM, Iso-CTS and TSV-M also let it shape
  the joint basis or the per-task budget ``min(n, m) // T``; DARE draws its masks by task position.
* permuting the tasks (with their coefficients) changes nothing: every method but DARE, whose masks are drawn by
  task position.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods.drm_iso import DRM_ISO_REFERENCE, drm_iso
from drm_lightning.merging.methods.registry import METHODS, get_method
from drm_lightning.merging.methods.regmean import regmean, regmean_plusplus
from drm_lightning.merging.methods.spec import MergeMethod
from drm_lightning.merging.ops import linalg
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
SYMMETRIC = [name for name in METHODS if name != "dare"]


def same_bytes(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def deltas(shape: tuple[int, int] = (24, 16), tasks: int = 4, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    return [d.to(dtype) for d in delta_cases.make_deltas("random", shape, tasks, seed=5)]


# --------------------------------------------------------------------------------------------------------------------
# Contract over the registry
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(24, 16), (12, 40)], ids=["tall", "wide"])
@pytest.mark.parametrize("name", list(METHODS))
def test_shape_dtype_device_and_determinism(name: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    method = get_method(name)
    params = method.check({})
    inputs = deltas(shape, dtype=dtype)
    first = method.merge_matrix(inputs, coefficients=[1.0, 0.5, 2.0, 0.7], **params)
    again = method.merge_matrix(inputs, coefficients=[1.0, 0.5, 2.0, 0.7], **params)
    assert first.shape == shape and first.dtype == dtype and first.device == inputs[0].device
    assert same_bytes(first, again)
    assert torch.isfinite(first).all() and first.any()
    wide = method.merge_matrix(inputs, out_dtype=torch.float64, **params)
    assert wide.dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(METHODS))
def test_cuda_device_preserved_and_deterministic(name: str) -> None:
    method = get_method(name)
    inputs = [d.cuda() for d in deltas()]
    first = method.merge_matrix(inputs, **method.check({}))
    assert first.device == inputs[0].device
    assert same_bytes(first, method.merge_matrix(inputs, **method.check({})))


@pytest.mark.parametrize("name", list(METHODS))
def test_elementwise_rule_shape_and_values(name: str) -> None:
    """Non-matrix parameters: each SVD method's own rule (values: tests/methods/test_method_rules.py); TA/TIES/DARE run
    themselves."""
    method = get_method(name)
    params = method.check({})
    bias = [torch.randn(7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = method.merge_elementwise(bias, coefficients=[1.0, 2.0, 0.5], **params)
    assert out.shape == (7,) and out.dtype == torch.float32
    if method.matrix_only:
        rule = method.elementwise(bias, coefficients=[1.0, 2.0, 0.5], **method.elementwise_params(params))
        assert torch.equal(out, rule)
        with pytest.raises(ValueError, match="2-D"):
            method.merge_matrix(bias, **params)
    else:
        assert torch.equal(out, method.fn(bias, coefficients=[1.0, 2.0, 0.5], **params))
    factored = [LowRankDelta(torch.randn(5, 2), torch.randn(2, 4), 0.5) for _ in range(2)]
    assert torch.allclose(
        method.merge_elementwise(factored, **params),
        method.merge_elementwise([d.dense() for d in factored], **params),
        atol=1e-6,
    )


def test_one_task_task_arithmetic_returns_its_delta() -> None:
    for dtype in INT_VIEW:
        delta = deltas(tasks=1, dtype=dtype)
        assert same_bytes(F.task_arithmetic(delta), delta[0])


@pytest.mark.parametrize("fn", [F.task_arithmetic, F.iso_c], ids=["task_arithmetic", "iso_c"])
def test_zero_coefficient_removes_a_task(fn: Callable[..., Tensor]) -> None:
    inputs = deltas(dtype=torch.float64)
    with_zero = fn(inputs, coefficients=[1.0, 0.0, 0.5, 2.0])
    without = fn([inputs[0], *inputs[2:]], coefficients=[1.0, 0.5, 2.0])
    assert ref.relative_error(with_zero, without) <= 1e-12


@pytest.mark.parametrize(
    "fn",
    [lambda d, c: F.ties(d, 0.5, c), lambda d, c: F.drm(d, coefficients=c)],
    ids=["ties", "drm"],
)
def test_zero_coefficient_task_still_votes(fn: Callable[..., Tensor]) -> None:
    """The election is unweighted (docs/methods.md): a task with c = 0 is not the same as no task."""
    inputs = deltas(dtype=torch.float64)
    assert ref.relative_error(fn(inputs, [1.0, 0.0, 0.5, 2.0]), fn([inputs[0], *inputs[2:]], [1.0, 0.5, 2.0])) > 1e-3


@pytest.mark.parametrize("name", SYMMETRIC)
def test_permuting_tasks_changes_nothing(name: str) -> None:
    method = get_method(name)
    inputs, coeffs, order = deltas(dtype=torch.float64), [1.0, 0.5, 2.0, 0.7], [2, 0, 3, 1]
    merged = method.merge_matrix(inputs, coefficients=coeffs, **method.check({}))
    permuted = method.merge_matrix([inputs[i] for i in order], coefficients=[coeffs[i] for i in order])
    assert ref.relative_error(permuted, merged) <= 1e-10


def test_dare_depends_on_task_order_and_seed() -> None:
    inputs = deltas(dtype=torch.float64)
    merged = F.dare(inputs, seed=1)
    assert same_bytes(merged, F.dare(inputs, seed=1))
    assert not torch.equal(merged, F.dare(inputs, seed=2))
    assert not torch.equal(merged, F.dare(inputs[::-1], seed=1))


def test_dare_drops_the_right_fraction_and_is_unbiased() -> None:
    ones = [torch.ones(200, 100, dtype=torch.float64)]
    merged = F.dare(ones, drop_rate=0.9, seed=3)
    kept = merged != 0
    assert abs(kept.double().mean().item() - 0.1) < 0.01
    assert torch.allclose(merged[kept], torch.full_like(merged[kept], 10.0))
    assert same_bytes(F.dare(ones, drop_rate=0.0), ones[0])


# --------------------------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------------------------

GOOD = deltas((6, 5), tasks=3)
NAN = [GOOD[0], GOOD[1].clone().index_fill_(0, torch.tensor([2]), math.nan), GOOD[2]]
INF = [GOOD[0], GOOD[1], GOOD[2].clone().index_fill_(1, torch.tensor([0]), math.inf)]
NEG_INF = [GOOD[0].clone().index_fill_(0, torch.tensor([5]), -math.inf), GOOD[1]]
BAD_ARGS: list[tuple[str, Callable[[], Any], str]] = [
    ("direction", lambda: F.drm(GOOD, direction="diagonal"), "direction.*'diagonal'"),
    ("merge", lambda: F.dare(GOOD, merge="mean"), "merge.*'mean'"),
    ("drop_rate=1", lambda: F.drm(GOOD, drop_rate=1.0), r"drop_rate must lie in \[0, 1\), got 1.0"),
    ("drop_rate<0", lambda: F.dare(GOOD, drop_rate=-0.1), "drop_rate.*-0.1"),
    ("drop_rate str", lambda: F.dare(GOOD, drop_rate="0.5"), "drop_rate.*'0.5'"),
    ("density=0", lambda: F.ties(GOOD, density=0.0), r"density must lie in \(0, 1\], got 0.0"),
    ("density>1", lambda: F.dare(GOOD, merge="ties", density=1.5), "density.*1.5"),
    ("density nan", lambda: F.ties(GOOD, density=math.nan), "density.*nan"),
    ("rank_tol", lambda: F.iso_c(GOOD, rank_tol=1.0), "rank_tol.*1.0"),
    ("common_fraction", lambda: F.iso_cts(GOOD, common_fraction=0.0), "common_fraction.*0.0"),
    ("seed", lambda: F.dare(GOOD, seed=-1), "seed.*-1"),
    ("seed float", lambda: F.dare(GOOD, seed=1.5), "seed.*1.5"),
    ("out_dtype", lambda: F.task_arithmetic(GOOD, out_dtype=torch.int32), "out_dtype.*int32"),
    ("shapes", lambda: F.ties([GOOD[0], GOOD[1][:, :4]]), r"deltas\[1\] has shape \(6, 4\)"),
    ("nan", lambda: F.drm(NAN), r"deltas\[1\] contains NaN or Inf"),
    ("inf", lambda: F.task_arithmetic(INF), r"deltas\[2\] contains NaN or Inf"),
    ("-inf", lambda: F.iso_cts(NEG_INF), r"deltas\[0\] contains NaN or Inf"),
    ("nan bfloat16", lambda: F.ties([x.bfloat16() for x in NAN]), r"deltas\[1\] contains NaN or Inf"),
    ("inf and -inf", lambda: F.task_arithmetic([torch.tensor([math.inf, -math.inf])]), r"deltas\[0\].*NaN or Inf"),
    (
        "inf factor",
        lambda: F.iso_c([LowRankDelta(torch.full((6, 1), math.inf), torch.ones(1, 5))]),
        r"deltas\[0\].*NaN or Inf",
    ),
    ("empty", lambda: F.iso_c([]), "deltas is empty"),
    ("tensor", lambda: F.task_arithmetic(GOOD[0]), "deltas must be a sequence.*Tensor"),
    ("element", lambda: F.ties([GOOD[0], [1.0]]), r"deltas\[1\] must be a torch.Tensor"),
    ("int dtype", lambda: F.task_arithmetic([torch.ones(2, dtype=torch.int64)]), r"deltas\[0\].*int64"),
    ("coefficients length", lambda: F.task_arithmetic(GOOD, [1.0, 2.0]), "coefficients has 2 entries for 3"),
    ("coefficients nan", lambda: F.drm(GOOD, coefficients=[1.0, math.nan, 1.0]), r"coefficients\[1\].*nan"),
    ("coefficients 2-D", lambda: F.iso_c(GOOD, coefficients=torch.ones(3, 1)), r"coefficients must be 1-D"),
    ("coefficients str", lambda: F.iso_c(GOOD, coefficients="abc"), "coefficients must be a sequence"),
    ("1-D drm", lambda: F.drm([torch.ones(5)]), r"drm merges 2-D matrices only.*\(5,\)"),
    ("3-D tsv_m", lambda: F.tsv_m([torch.ones(2, 3, 4)]), r"tsv_m merges 2-D.*\(2, 3, 4\)"),
    ("tsv_m budget", lambda: F.tsv_m(deltas((3, 8), tasks=4)), "T=4 deltas of shape \\(3, 8\\)"),
    ("iso_cts k_c", lambda: F.iso_cts(deltas((7, 9), tasks=2), common_fraction=0.1), "common_fraction=0.1.*k_c=-1"),
    ("keep_top q", lambda: F.keep_top_fraction(torch.ones(3), 1.5), "q must lie in"),
    ("ridge=0", lambda: F.wudi_closed(GOOD, ridge=0.0), r"ridge must be > 0, got 0.0: without a ridge"),
    ("ridge<0", lambda: F.wudi_closed(GOOD, ridge=-0.1), r"ridge must be > 0, got -0.1"),
    ("ridge nan", lambda: F.wudi_closed(GOOD, ridge=math.nan), r"ridge must be a finite real number, got nan"),
    ("steps<0", lambda: F.wudi(GOOD, steps=-1), r"steps must be an integer >= 0, got -1"),
    ("steps float", lambda: F.wudi(GOOD, steps=2.5), r"steps must be an integer >= 0, got 2.5"),
    ("lr=0", lambda: F.wudi(GOOD, lr=0.0), r"lr must lie in \(0, inf\), got 0.0"),
    ("1-D wudi_closed", lambda: F.wudi_closed([torch.ones(5)]), r"wudi_closed merges 2-D matrices only"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_raise_value_error_naming_them(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_finite_deltas_whose_sum_overflows_are_not_mistaken_for_inf(method: str) -> None:
    """The finiteness check sums first (one cheap reduction); a float32 sum that overflows on finite values must fall
    back to the exact test, not refuse the deltas."""
    big = torch.full((4,), 3e38)
    merged = getattr(F, method)([big, -big], density=1.0) if method == "ties" else getattr(F, method)([big, -big])
    assert torch.isfinite(merged).all()


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


def test_registry_lists_every_method_once() -> None:
    papers = ["task_arithmetic", "ties", "dare", "drm_v", "drm_h", "iso_c", "iso_cts", "tsv_m", "regmean"]
    papers += ["wudi", "wudi_closed", "regmean_plusplus", "model_stock"]
    assert sorted(METHODS) == sorted([*papers, "drm_iso_v", "drm_iso_h"])
    for name, method in METHODS.items():
        assert method.name == name and method.label
        if name in papers:
            assert method.reference.startswith("https://arxiv.org/abs/")
        else:  # this project's variant: its study is the reference
            assert method.reference == DRM_ISO_REFERENCE and (Path(__file__).parents[2] / method.reference).is_file()
        matrix_fns = (F.drm, F.iso_c, F.iso_cts, F.tsv_m, drm_iso, regmean, regmean_plusplus, F.wudi, F.wudi_closed)
        assert method.matrix_only == (method.fn in matrix_fns)
        assert method.needs_statistics == (method.fn in (regmean, regmean_plusplus))
        assert method.block_by_block == (method.fn is regmean_plusplus)


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_defaults_are_the_function_defaults(name: str) -> None:
    """One source of truth: every registered parameter is a keyword of the function with the same default."""
    method = get_method(name)
    signature = inspect.signature(method.fn).parameters
    for key in method.elementwise_keys:
        rule = inspect.signature(method.elementwise).parameters
        assert rule[key].default == method.defaults[key]
    for key, value in method.matrix_params(method.defaults).items():
        assert key in signature
        if key not in method.fixed:
            assert signature[key].default == value
    assert method.check(method.check({})) == method.check({})


def test_get_method_unknown_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown merge method 'drm'.*'drm_h'.*'tsv_m'"):
        get_method("drm")


CHECK_ERRORS = [
    ("ties", {"densty": 0.5}, r"ties: unknown parameter\(s\) \['densty'\]; allowed: \['density'\]"),
    ("task_arithmetic", {"density": 0.5}, "allowed: none"),
    ("drm_v", {"direction": "horizontal"}, "drm_v: direction is fixed to 'vertical'"),
    ("drm_h", {"drop_rate": 1.2}, r"drm_h: drop_rate must lie in \[0, 1\), got 1.2"),
    ("iso_cts", {"common_fraction": -1}, "iso_cts: common_fraction"),
    ("dare", {"merge": "avg"}, "dare: merge must be one of"),
]


@pytest.mark.parametrize(("name", "params", "message"), CHECK_ERRORS, ids=[c[0] for c in CHECK_ERRORS])
def test_check_rejects_bad_parameters_up_front(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_method(name).check(params)


def test_check_normalises_and_merge_matrix_uses_checked_params() -> None:
    method: MergeMethod = get_method("drm_h")
    assert method.check({"drop_rate": 1 / 2, "direction": "horizontal"}) == {
        "direction": "horizontal",
        "drop_rate": 0.5,
        "rank_tol": 1e-2,
        "nonmatrix_drop_rate": 0.0,
        "renormalise": True,
        "elect_sign": True,
        "disjoint_mean": True,
    }
    inputs = deltas()
    assert torch.equal(method.merge_matrix(inputs, drop_rate=0.5), F.drm(inputs, "horizontal", 0.5))
    with pytest.raises(ValueError, match="unknown parameter"):
        method.merge_matrix(inputs, density=0.5)


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.1, 0.37, 0.5, 0.8, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keep_top_fraction_keeps_exactly_round_q_numel(q: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (90,), generator=gen) * 2 - 1
    x = ((torch.randperm(90, generator=gen) + 1) * signs).to(dtype).reshape(9, 10)  # distinct magnitudes
    out = F.keep_top_fraction(x, q)
    k = round(q * x.numel())
    assert out.dtype == dtype and int((out != 0).sum()) == k
    assert torch.equal(out[out != 0], x[out != 0])
    if 0 < k < x.numel():
        assert out.abs().amax() == x.abs().amax() and x.abs()[out == 0].amax() < out.abs()[out != 0].amin()


def test_keep_top_fraction_keeps_ties_at_the_threshold() -> None:
    x = torch.tensor([5.0, -3.0, 3.0, 3.0, 1.0])
    assert torch.equal(F.keep_top_fraction(x, 0.4), torch.tensor([5.0, -3.0, 3.0, 3.0, 0.0]))


def test_elect_and_merge_by_hand() -> None:
    blocks = [
        torch.tensor([2.0, -1.0, 3.0, 0.0, 1.0]),
        torch.tensor([4.0, 3.0, -3.0, 0.0, -5.0]),
        torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0]),
    ]
    # sums: 5 (+), 2 (+), 0 (zero elects +), 0, -4 (-); survivors: {0,1}, {1}, {0}, none, {1}
    expected = torch.tensor([(2.0 * 1 + 4.0 * 10) / 2, 3.0 * 10, 3.0, 0.0, -5.0 * 10])
    assert torch.equal(F.elect_and_merge(blocks, [1.0, 10.0, 100.0]), expected)
    # the election is unweighted: a huge coefficient does not flip the sign of entry 0
    assert F.elect_and_merge(blocks, [1.0, 1.0, 1000.0])[0] == 3.0


def test_drm_share_rule_treats_a_tiny_share_as_none() -> None:
    """Without the 1e-6 rule the 1e-9 task's renormalised vectors would be unit size, take pruning slots and count
    as survivors; with it the tiny task is merged exactly like a zero one."""
    inputs = deltas(dtype=torch.float64)
    tiny = F.drm([*inputs[:3], 1e-9 * inputs[3]])
    zero = F.drm([*inputs[:3], torch.zeros_like(inputs[3])])
    assert ref.relative_error(tiny, zero) <= 1e-8


@pytest.mark.parametrize(
    ("dim", "tasks", "fraction", "expected"),
    [
        (32, 4, 0.8, (24, 2)),
        (32, 3, 0.8, (26, 2)),
        (10, 4, 0.8, (10, 0)),
        (768, 8, 0.8, (616, 19)),
        (5, 1, 1.0, (5, 0)),
    ],
)
def test_iso_cts_split(dim: int, tasks: int, fraction: float, expected: tuple[int, int]) -> None:
    assert F.iso_cts_split(dim, tasks, fraction) == expected


@pytest.mark.parametrize("name", list(METHODS))
def test_zero_and_rank_zero_factors_merge_to_zero(name: str) -> None:
    """LoRA's initial ``B = 0`` and an empty rank give an exactly zero merge, never NaN or an error."""
    method = get_method(name)
    for rank, b in [(2, torch.zeros(6, 2)), (0, torch.zeros(6, 0))]:
        factored = [LowRankDelta(b, torch.randn(rank, 5), 1.0) for _ in range(3)]
        out = method.merge_matrix(factored, **method.check({}))
        assert out.shape == (6, 5) and not out.any()


def test_low_rank_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 2, generator=gen).bfloat16(), torch.randn(2, 4, generator=gen)
    delta = LowRankDelta(b, a, 3)
    assert delta.shape == (6, 4) and delta.rank == 2 and delta.dtype == torch.float32 and delta.scale == 3.0
    # the scale is folded in before the float32 product, not after: equal up to the rounding of products of size up to
    # ~30 (3.8e-6 at most over 20,000 draws), which an entry that cancels to ~1e-2 cannot meet at allclose's default
    # relative 1e-5 (it failed on unseeded inputs in CI)
    torch.testing.assert_close(delta.dense(), 3 * b.float() @ a, rtol=1e-6, atol=1e-5)
    # Aᵀ·Bᵀ and (B·A)ᵀ are two float32 products: equal up to rounding, not bit for bit (MKL and OpenBLAS kernels differ)
    torch.testing.assert_close(delta.transpose().dense(), delta.dense().T, rtol=1e-6, atol=1e-6)
    assert delta.dense(torch.float64).dtype == torch.float64
    for args, message in [
        ((torch.randn(6, 2), torch.randn(3, 4)), "B.shape\\[1\\] must equal A.shape\\[0\\]"),
        ((torch.randn(6), torch.randn(1, 4)), "LowRankDelta.B must be 2-D"),
        ((torch.randn(6, 1), torch.ones(1, 4, dtype=torch.int32)), "LowRankDelta.A must be a floating"),
        ((torch.randn(6, 1), torch.randn(1, 4), math.inf), "scale must be a finite real number, got inf"),
        ((torch.randn(6, 1), torch.randn(1, 4), True), "scale.*True"),
    ]:
        with pytest.raises(ValueError, match=message):
            LowRankDelta(*args)


@pytest.mark.parametrize("name", list(METHODS))
def test_empty_parameter_merges_to_empty(name: str) -> None:
    """A parameter with no entries passes the input checks (nothing to be non-finite) and keeps its shape."""
    method = get_method(name)
    out = method.merge_elementwise([torch.zeros(0, 3), torch.zeros(0, 3)], **method.check({}))
    assert out.shape == (0, 3)


# --------------------------------------------------------------------------------------------------------------------
# linalg building blocks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "top"), [((9, 6), 4), ((6, 9), 6), ((6, 9), 0), ((7, 7), None)])
def test_thin_svd_top_returns_the_leading_components(shape: tuple[int, int], top: int | None) -> None:
    a = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, v = linalg.thin_svd(a, top=top)
    k = min(shape) if top is None else top
    assert u.shape == (3, shape[0], k) and s.shape == (3, k) and v.shape == (3, shape[1], k)
    assert torch.allclose(s, torch.linalg.svdvals(a)[:, :k], rtol=1e-12, atol=0)
    assert torch.allclose(a @ v, u * s.unsqueeze(1), atol=1e-12)


@pytest.mark.parametrize("spread", [1.0, 1e-7], ids=["gram", "svd-fallback"])
@pytest.mark.parametrize(("shape", "top"), [((6, 9), 4), ((6, 9), 0), ((8, 8), 8), ((6, 9), 6)])
def test_left_basis_svd(shape: tuple[int, int], top: int, spread: float) -> None:
    """``W`` is orthogonal, its first ``top`` columns are the leading left singular vectors; the fallback (values down
    to 1e-7·σ_max, below the Gram route's reach) is as exact."""
    gen = torch.Generator().manual_seed(1)
    n, m = shape
    d = min(n, m)
    spectrum = torch.logspace(0, math.log10(spread), d, dtype=torch.float64)
    a = (delta_cases.orthonormal(n, d, gen) * spectrum) @ delta_cases.orthonormal(m, d, gen).T
    w, s, v = linalg.left_basis_svd(a, rank_tol=1e-9, top=top)
    assert w.shape == (n, n) and s.shape == (top,) and v.shape == (m, top)
    assert torch.allclose(w.T @ w, torch.eye(n, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(s, spectrum[:top], rtol=1e-9, atol=0)
    assert torch.allclose(a @ v, w[:, :top] * s, atol=1e-13)


def _polar_case(case: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(basis, extra)`` with orthonormal ``basis``, for ``polar_factor_extend``."""
    sizes = {"k>r": (20, 8, 5), "k<r": (20, 3, 8), "k=0": (20, 0, 6), "r=0": (20, 6, 0), "square": (12, 7, 5)}
    n, k, r = sizes.get(case, (20, 6, 4))
    basis = delta_cases.orthonormal(n, k, gen)
    extra = torch.randn(n, r, generator=gen, dtype=torch.float64)
    if case == "ill-conditioned":  # an extra column 1e-7 away from a basis column: sigma_min ~ 1e-7
        extra[:, 0] = basis[:, 0] + 1e-7 * torch.randn(n, generator=gen, dtype=torch.float64)
    return basis, extra


@pytest.mark.parametrize("case", ["k>r", "k<r", "k=0", "r=0", "square", "ill-conditioned"])
def test_polar_factor_extend_matches_the_polar_factor(case: str) -> None:
    basis, extra = _polar_case(case, torch.Generator().manual_seed(3))
    out = linalg.polar_factor_extend(basis, extra)
    expected = ref.polar(torch.cat([basis, extra], dim=1))
    assert out.shape == expected.shape
    assert ref.relative_error(out, expected) <= (1e-7 if case == "ill-conditioned" else 1e-13)


def test_polar_factor_extend_rank_deficient_and_too_wide_fall_back_to_polar_factor() -> None:
    """Dependent columns (no unique polar factor) and more columns than rows: the same finite answer as
    ``polar_factor``, which leaves the null directions out."""
    gen = torch.Generator().manual_seed(4)
    basis = delta_cases.orthonormal(10, 4, gen)
    dependent = torch.cat([basis[:, :2] @ torch.randn(2, 3, generator=gen, dtype=torch.float64)], dim=1)
    wide = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    for extra in (dependent, wide):
        expected = linalg.polar_factor(torch.cat([basis, extra], dim=1))
        out = linalg.polar_factor_extend(basis, extra)
        assert torch.isfinite(out).all() and ref.relative_error(out, expected) <= 1e-12
