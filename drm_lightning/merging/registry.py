"""Name → merge method: the one interface the merger uses (mergekit-style: name, reference, parameters, function).

The merger knows nothing of the math beyond this: ``get_method(name)``, ``check(params)`` once up front (no tensors
needed, so a typo fails before any model is loaded), then per parameter ``merge_matrix`` (2-D weights the merge plan
selects, for ``matrix_only`` methods) or ``merge_elementwise`` (everything else).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging.functional import Coefficients, Delta


@dataclass(frozen=True)
class MergeMethod:
    """One merge method of ALGORITHMS.md.

    Attributes:
        name: Registry key, e.g. ``"drm_v"``.
        label: Name for reports, e.g. ``"DRM-V"``.
        reference: Paper URL.
        fn: The ``functional`` function.
        matrix_only: True for the SVD methods: they apply to the 2-D matrices the merge plan selects, and every
            other parameter gets ``merge_elementwise``.
        defaults: Every keyword parameter with its default; these names are the only ones ``check`` accepts.
        fixed: Parameters fixed by the method's identity (``direction`` of ``drm_v``/``drm_h``); passing another
            value is an error.
    """

    name: str
    label: str
    reference: str
    fn: Callable[..., Tensor]
    matrix_only: bool
    defaults: Mapping[str, Any]
    fixed: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def check(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults merged with ``params``, every value validated; idempotent (``check(check(p)) == check(p)``).

        Raises:
            ValueError: an unknown parameter (the message lists the allowed ones), a value out of range, or a
                different value for a fixed parameter.
        """
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; allowed: {sorted(self.defaults) or 'none'}")
        for name in self.fixed:
            if name in params and params[name] != self.defaults[name]:
                raise ValueError(
                    f"{self.name}: {name} is fixed to {self.defaults[name]!r} by the method, got {params[name]!r}"
                )
        merged = {**self.defaults, **params}
        try:
            return {name: F.PARAM_CHECKS[name](value) for name, value in merged.items()}
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None

    def merge_matrix(self, deltas: Sequence[Delta], coefficients: Coefficients = None, **params: Any) -> Tensor:
        """The method itself on one parameter's deltas.

        ``params`` are the method's parameters (checked here) plus the runtime keyword ``out_dtype``.
        """
        out_dtype = params.pop("out_dtype", None)
        return self.fn(deltas, coefficients=coefficients, out_dtype=out_dtype, **self.check(params))

    def merge_elementwise(self, deltas: Sequence[Delta], coefficients: Coefficients = None, **params: Any) -> Tensor:
        """The rule for non-matrix parameters and excluded matrices.

        The SVD methods elect and merge the raw deltas (ALGORITHMS.md, "Non-matrix parameters"), densifying
        factors; their matrix parameters (``drop_rate``, ``rank_tol``, ...) are checked and otherwise unused. Task
        Arithmetic, TIES and DARE are elementwise already and run themselves.
        """
        out_dtype = params.pop("out_dtype", None)
        checked = self.check(params)
        if self.matrix_only:
            return F.elect_and_merge(deltas, coefficients, out_dtype=out_dtype)
        return self.fn(deltas, coefficients=coefficients, out_dtype=out_dtype, **checked)


_ARXIV = "https://arxiv.org/abs/"
METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("task_arithmetic", "Task Arithmetic", _ARXIV + "2212.04089", F.task_arithmetic, False, {}),
        MergeMethod("ties", "TIES", _ARXIV + "2306.01708", F.ties, False, {"density": 0.2}),
        MergeMethod(
            "dare",
            "DARE",
            _ARXIV + "2311.03099",
            F.dare,
            False,
            {"drop_rate": 0.9, "seed": 0, "merge": "task_arithmetic", "density": 0.2},
        ),
        MergeMethod(
            "drm_v",
            "DRM-V",
            _ARXIV + "2505.23117",
            F.drm,
            True,
            {"direction": "vertical", "drop_rate": 0.8, "rank_tol": F.DRM_RANK_TOL},
            frozenset({"direction"}),
        ),
        MergeMethod(
            "drm_h",
            "DRM-H",
            _ARXIV + "2505.23117",
            F.drm,
            True,
            {"direction": "horizontal", "drop_rate": 0.8, "rank_tol": F.DRM_RANK_TOL},
            frozenset({"direction"}),
        ),
        MergeMethod("iso_c", "Iso-C", _ARXIV + "2502.04959", F.iso_c, True, {"rank_tol": F.RANK_TOL}),
        MergeMethod(
            "iso_cts",
            "Iso-CTS",
            _ARXIV + "2502.04959",
            F.iso_cts,
            True,
            {"common_fraction": 0.8, "rank_tol": F.RANK_TOL},
        ),
        MergeMethod("tsv_m", "TSV-M", _ARXIV + "2412.00081", F.tsv_m, True, {"rank_tol": F.RANK_TOL}),
    )
}
"""Every method, by registry name."""


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None
