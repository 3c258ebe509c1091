"""Parameter checks of the merge methods: each keyword value validated and normalised before any tensor is read.

Shared by every method module of ``drm_lightning.merging.methods`` and by the registry, whose ``MergeMethod.check``
runs ``PARAM_CHECKS`` up front so that a typo fails before any model is loaded (docs/methods.md names the ranges).
Bad values raise ``ValueError`` naming the parameter and the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import torch

RANK_TOL = 1e-6
"""Default rank tolerance of Iso-C, Iso-CTS and TSV-M; see ``iso.iso_c`` for why this value."""
MERGES = ("task_arithmetic", "ties")
DIRECTIONS = ("vertical", "horizontal")


def real_in(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def check_density(value: Any) -> float:
    """TIES density ``ρ``: the kept fraction, in ``(0, 1]``."""
    return real_in("density", value, 0.0, 1.0, low_open=True, high_open=False)


def check_drop_rate(value: Any, name: str = "drop_rate") -> float:
    """DARE/DRM drop rate ``p`` in ``[0, 1)`` (``p = 1`` would drop everything and divide by zero)."""
    return real_in(name, value, 0.0, 1.0, low_open=False, high_open=True)


def check_nonmatrix_drop_rate(value: Any) -> float:
    """DRM's trim rate ``p_nl`` of non-matrix parameters, in ``[0, 1)``."""
    return check_drop_rate(value, "nonmatrix_drop_rate")


def check_switch(name: str, value: Any) -> bool:
    """A step switched on or off (DRM's ablations): a real ``bool``, so that ``"false"`` is not taken for on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_rank_tol(value: Any) -> float:
    """Relative rank tolerance in ``[0, 1)``."""
    return real_in("rank_tol", value, 0.0, 1.0, low_open=False, high_open=True)


def check_common_fraction(value: Any) -> float:
    """Iso-CTS common-subspace fraction ``f`` in ``(0, 1]``."""
    return real_in("common_fraction", value, 0.0, 1.0, low_open=True, high_open=False)


def check_seed(value: Any) -> int:
    """A DARE seed: an integer in ``[0, 2**63)``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= int(value) < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def check_merge(value: Any) -> str:
    """What DARE merges with after dropping: ``task_arithmetic`` or ``ties``."""
    if value not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {value!r}")
    return value


def check_direction(value: Any) -> str:
    """DRM direction: ``vertical`` (stack rows) or ``horizontal`` (stack columns)."""
    if value not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {value!r}")
    return value


PARAM_CHECKS: dict[str, Callable[[Any], Any]] = {
    "density": check_density,
    "drop_rate": check_drop_rate,
    "rank_tol": check_rank_tol,
    "common_fraction": check_common_fraction,
    "seed": check_seed,
    "merge": check_merge,
    "direction": check_direction,
    "nonmatrix_drop_rate": check_nonmatrix_drop_rate,
    "renormalise": lambda value: check_switch("renormalise", value),
    "elect_sign": lambda value: check_switch("elect_sign", value),
    "disjoint_mean": lambda value: check_switch("disjoint_mean", value),
}
"""Validator (returning the normalised value) for every keyword parameter of the methods below."""


def check_out_dtype(out_dtype: Any) -> torch.dtype | None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    return out_dtype
