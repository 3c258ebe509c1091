"""Model Stock's ratio ``t = T·cos θ / (1 + (T − 1)·cos θ)`` on deltas whose angles are known in closed form, and the
conventions docs/methods.md fixes where the paper is silent (a zero delta, angles past 90°, one task, the
coefficients). The float64 reference comparison over every delta case is
``tests/methods/test_functional_reference.py``; these hold the equation itself, by numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging.methods.model_stock import stock_ratio
from drm_lightning.merging.methods.registry import get_method

F64 = torch.float64


def _unit(angle_deg: float) -> Tensor:
    a = math.radians(angle_deg)
    return torch.tensor([math.cos(a), math.sin(a), 0.0], dtype=F64)


def _equiangular(tasks: int, cos: float) -> list[Tensor]:
    """``tasks`` unit vectors with every pairwise cosine ``cos`` (a shared part plus orthogonal parts)."""
    shared, own = math.sqrt(cos), math.sqrt(1 - cos)
    return [shared * torch.eye(tasks + 1, dtype=F64)[0] + own * torch.eye(tasks + 1, dtype=F64)[i + 1]
            for i in range(tasks)]  # fmt: skip


# (deltas, t): t worked by hand from the paper's formula and the conventions
CASES = {
    "two at 60 degrees: cos 1/2, t = 2/3": ([_unit(0), _unit(60)], 2 / 3),
    "two at 60 degrees, lengths 2 and 0.5: the angle alone counts": ([2 * _unit(0), 0.5 * _unit(60)], 2 / 3),
    "three pairwise cos 1/2: t = 1.5/2 = 3/4": (_equiangular(3, 0.5), 0.75),
    "four pairwise cos 0.1: t = 0.4/1.3": (_equiangular(4, 0.1), 0.4 / 1.3),
    "identical: cos 1, t = 1 (the mean)": ([_unit(30)] * 3, 1.0),
    "orthogonal: cos 0, t = 0 (the base)": ([_unit(0), _unit(90)], 0.0),
    "opposite: mean cos below 0 is held at 0": ([_unit(0), _unit(180)], 0.0),
    "120 degrees: cos -1/2 is held at 0": ([_unit(0), _unit(120)], 0.0),
    "a zero delta has cosine 0 with each other: mean (1 + 0 + 0)/3": (
        [_unit(0), _unit(0), torch.zeros(3, dtype=F64)],
        3 * (1 / 3) / (1 + 2 / 3),
    ),  # fmt: skip
    "one task: t = 1": ([_unit(10)], 1.0),
}


@pytest.mark.parametrize(("deltas", "t"), CASES.values(), ids=CASES.keys())
def test_the_merge_is_t_times_the_mean(deltas: list[Tensor], t: float) -> None:
    mean = torch.stack(deltas).mean(0)
    assert torch.allclose(F.model_stock(deltas), t * mean, rtol=1e-12, atol=1e-15)
    gram = torch.stack(deltas) @ torch.stack(deltas).T
    assert float(stock_ratio(gram)) == pytest.approx(t, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1.0, 1e150], ids=lambda s: f"{s:g}")
def test_the_ratio_does_not_depend_on_the_deltas_scale(scale: float) -> None:
    """The Grams are taken on each delta over its largest magnitude: no underflow at 1e-300 or overflow at 1e150."""
    deltas = [scale * x for x in _equiangular(3, 0.5)]
    expected = 0.75 * torch.stack(deltas).mean(0)
    assert torch.allclose(F.model_stock(deltas), expected, rtol=1e-12, atol=0.0)


def test_the_coefficients_weigh_the_mean_not_the_angle() -> None:
    deltas, c = [_unit(0), _unit(60)], [2.0, -0.5]
    expected = (2 / 3) * (2.0 * deltas[0] - 0.5 * deltas[1]) / 2
    assert torch.allclose(F.model_stock(deltas, coefficients=c), expected, rtol=1e-12)


def test_mergekits_filter_wise_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"model_stock: unknown parameter\(s\) \['filter_wise'\]"):
        get_method("model_stock").check({"filter_wise": True})
