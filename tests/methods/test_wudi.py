"""WUDI (docs/methods.md, "WUDI"): the closed form's routes and optimality, the Adam loop's objective, against the
float64 equations of ``merging.reference`` (the case table and the LoRA table are in test_functional_reference.py).

``wudi_closed`` solves ``Δ (G + μ I) = R`` on the cheaper side: the ``m``-sized ``G`` (``T n >= m``) or the
``T n``-sized Gram of the stacked deltas (``T n < m``), and for ``LowRankDelta`` factors in their joint spaces; each
route is held to the plain linear solve. ``wudi`` is held to the authors' autograd loop in the case table; here to
what it is for: a lower objective than the Task Arithmetic sum it starts from.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging import reference as ref
from drm_lightning.merging.methods.registry import get_method
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases

# (shape, tasks): n side (T n < m), m side (T n >= m, tall and wide), square
ROUTES = [((12, 80), 3), ((20, 50), 2), ((80, 12), 3), ((24, 40), 4), ((30, 30), 2)]
ROUTE_IDS = [f"{n}x{m}-T{t}" for (n, m), t in ROUTES]
COEFFS = [0.7, -1.5, 0.0, 2.0]


def _deltas(shape: tuple[int, int], tasks: int, scale: float = 1.0) -> list[Tensor]:
    seed = zlib.crc32(f"{shape}{tasks}".encode()) % 1000
    return [scale * d for d in delta_cases.make_deltas("random", shape, tasks, seed=seed)]


@pytest.mark.parametrize("ridge", [1e-6, 0.01, 1.0])
@pytest.mark.parametrize(("shape", "tasks"), ROUTES, ids=ROUTE_IDS)
def test_wudi_closed_routes_match_the_linear_solve(shape: tuple[int, int], tasks: int, ridge: float) -> None:
    deltas = _deltas(shape, tasks)
    for coeffs in (None, COEFFS[:tasks]):  # a zero coefficient: that task drops out of G, R and tr G
        out = F.wudi_closed(deltas, ridge, coeffs)
        assert ref.relative_error(out, ref.wudi_closed(deltas, ridge, coeffs)) <= 1e-9


@pytest.mark.parametrize("ridge", [1e-4, 0.01, 1.0])
@pytest.mark.parametrize(("shape", "tasks"), ROUTES, ids=ROUTE_IDS)
def test_wudi_closed_zeroes_the_gradient_of_its_objective(shape: tuple[int, int], tasks: int, ridge: float) -> None:
    """The solution is the minimiser of ``L(Δ) + ρ (tr G / m) ‖Δ‖²_F``: its gradient (autograd through the objective
    as written) vanishes there, relative to the gradient at the Task Arithmetic sum."""
    deltas = _deltas(shape, tasks)

    def gradient(at: Tensor) -> Tensor:
        point = at.clone().requires_grad_(True)
        ref.wudi_objective(point, deltas, COEFFS[:tasks], ridge).backward()
        return point.grad

    at_sum = gradient(ref.task_arithmetic(deltas, COEFFS[:tasks]))
    at_solution = gradient(F.wudi_closed(deltas, ridge, COEFFS[:tasks]))
    assert float(at_solution.norm()) <= 1e-9 * float(at_sum.norm())


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared-row"])
@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((40, 64), [2, 3, 2]), ((64, 40), [4, 4, 4]), ((24, 20), [8, 8, 8])],
    ids=["n-side", "m-side", "joint-rank-exceeds-width"],
)
def test_wudi_closed_low_rank_factors_match_the_dense_solve(
    shape: tuple[int, int], ranks: list[int], shared: bool
) -> None:
    """Factored deltas are solved in the factors' joint spaces (exact: the ridge keeps the complement at zero); a
    zero ``B`` (LoRA's initialisation) drops out like a zero delta."""
    factors = delta_cases.low_rank_factors(shape, ranks, seed=len(ranks), shared=shared)
    low_rank = [LowRankDelta(b * (i != 1), a, s) for i, (b, a, s) in enumerate(factors)]
    dense = [lr.dense(torch.float64) for lr in low_rank]
    for coeffs in (None, [0.5, 1.0, -2.0]):
        out = F.wudi_closed(low_rank, 0.01, coeffs)
        assert ref.relative_error(out, ref.wudi_closed(dense, 0.01, coeffs)) <= 1e-9


@pytest.mark.parametrize(("shape", "tasks"), [((24, 40), 4), ((40, 24), 3)], ids=["wide", "tall"])
def test_wudi_lowers_the_objective_from_the_sum(shape: tuple[int, int], tasks: int) -> None:
    """On deltas the size of fine-tuning updates, the authors' defaults (300 Adam steps at lr 1e-5) lower WUDI's
    objective well below its value at the sum, and the closed form at a vanishing ridge lower still (it is the
    minimiser); ``steps=0`` is the sum."""
    deltas = _deltas(shape, tasks, scale=1e-3)
    start = ref.task_arithmetic(deltas)
    merged = F.wudi(deltas)
    assert torch.equal(F.wudi(deltas, steps=0), start)
    at_sum, at_wudi = float(ref.wudi_objective(start, deltas)), float(ref.wudi_objective(merged, deltas))
    at_closed = float(ref.wudi_objective(F.wudi_closed(deltas, 1e-8), deltas))
    assert at_wudi < 0.5 * at_sum
    assert at_closed < at_wudi


def test_wudi_one_task_returns_its_delta() -> None:
    """With one task the sum is already the minimiser: the gradient is exactly zero, as in the authors' autograd
    (``(Δ − Δ_1) Δ_1ᵀ = 0``), so Adam never moves; rounding noise there would, as its normalised step turns any
    nonzero gradient into a move of about ``lr``."""
    for scale in (1.0, 1e-3):
        delta = _deltas((20, 12), 1, scale)
        assert torch.equal(F.wudi(delta, coefficients=[1.5]), ref.task_arithmetic(delta, [1.5]))


@pytest.mark.parametrize("name", ["wudi", "wudi_closed"])
def test_zero_coefficient_removes_a_task(name: str) -> None:
    """``w_i = 0`` for a zero delta: it adds nothing to the sum, ``G``, ``R`` or ``tr G``."""
    method = get_method(name)
    deltas = _deltas((16, 24), 4)
    with_zero = method.merge_matrix(deltas, [1.0, 0.0, 0.5, 2.0])
    without = method.merge_matrix([deltas[0], *deltas[2:]], [1.0, 0.5, 2.0])
    assert ref.relative_error(with_zero, without) <= 1e-12


@pytest.mark.parametrize("ridge", [0, 0.0, -1e-3])
def test_registry_refuses_a_ridge_at_or_below_zero(ridge: float) -> None:
    """Before any tensor is read (a recipe's ``params``), in one line naming the value."""
    with pytest.raises(ValueError, match=rf"^wudi_closed: ridge must be > 0, got {ridge!r}: [^\n]*$"):
        get_method("wudi_closed").check({"ridge": ridge})
