"""One merge method's registry entry: its name, paper, parameters and rules, and the calls the merger makes on it.

Each method module of ``drm_lightning.merging.methods`` lists its entries in a ``METHODS`` tuple of ``MergeMethod``
next to the functions they name; ``drm_lightning.merging.methods.registry`` collects them. The merger knows nothing of
the math beyond this record: ``check(params)`` once up front (no tensors needed, so a typo fails before any model is
loaded), then per parameter ``merge_matrix`` or ``merge_elementwise``, or ``merge_many`` for a search. A method
that weighs the deltas by data (``needs_statistics``: RegMean) also gets each task's input Gram of the parameter;
one whose Grams depend on the merge itself (``block_by_block``: RegMean++) is run by ``evaluation/block_merge.py``.
``lora_span`` says whether a merge of LoRA experts can be written back as an exact adapter (``export/adapter.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merging.methods.checks import PARAM_CHECKS
from drm_lightning.merging.methods.inputs import Coefficients, Delta

LORA_SPANS = ("both", "columns", "rows", None)
"""The values of ``MergeMethod.lora_span``."""


@dataclass(frozen=True)
class MergeMethod:
    """One merge method of docs/methods.md.

    Attributes:
        name: Registry key, e.g. ``"drm_v"``.
        label: Name for reports, e.g. ``"DRM-V"``.
        reference: Paper URL.
        fn: The method's function (its module in ``merging/methods/``).
        matrix_only: True for the SVD methods: they apply to the 2-D matrices the merge plan selects, and every
            other parameter gets ``merge_elementwise``.
        defaults: Every keyword parameter with its default; these names are the only ones ``check`` accepts.
        fixed: Parameters fixed by the method's identity (``direction`` of ``drm_v``/``drm_h``); passing another
            value is an error.
        elementwise: ``matrix_only`` methods: their own rule for non-matrix parameters and excluded matrices
            (docs/methods.md, "Non-matrix parameters"), called with the parameters in ``elementwise_keys``.
        elementwise_keys: The parameters ``elementwise`` takes.
        elementwise_only: Parameters only ``elementwise`` takes (not passed to ``fn``).
        prepare: Where part of the matrix rule can be shared between parameter values (a search): a function of
            the deltas, ``coefficients`` and the ``prepare_keys`` parameters returning an object whose
            ``merge(**other matrix parameters, out_dtype=...)`` gives what ``fn`` would.
        prepare_keys: The parameters ``prepare`` takes.
        param_checks: Validators of parameters that ``checks.PARAM_CHECKS`` does not know (a new method's own
            parameters, kept in its module), or that this method checks differently; each returns the normalised
            value or raises ``ValueError``.
        needs_statistics: The matrix rule takes ``statistics=``: per task, the input Gram of the parameter's layer
            (``[in, in]``, ``io/statistics.py``), or ``None`` for a parameter without recorded Grams.
            The merge refuses task vectors without statistics up front (``setup.prepare_merge``).
        task_terms: ``matrix_only`` methods whose matrix rule is a sum of per-task terms ``D_i`` that scale with
            their own coefficient alone (``Σ_i λ_i D_i`` is the rule at coefficients ``λ_i c_i``: RegMean,
            ``wudi_closed``): a function with ``fn``'s arguments returning the stacked ``[T, *shape]`` terms
            (``matrix_terms``), what learned per-task coefficients weigh (``evaluation/coefficients.py``).
        block_by_block: The statistics are not the ones the task vectors record but Grams taken on the inputs the
            *merged* model's earlier blocks produce (RegMean++), so they exist only while the model is merged, block
            after block, with each task's data: the streaming merge refuses the method (``setup.prepare_merge``)
            and ``evaluation/block_merge.py`` runs it. Implies ``needs_statistics``.
        lora_span: Where the merged delta of LoRA experts ``Δ_i = B_i A_i`` lies, for every parameter value:
            ``"both"`` (in the joint column space ``span[B_1 … B_T]`` and the joint row space ``span[A_1ᵀ … A_Tᵀ]``),
            ``"columns"`` or ``"rows"`` (in that one), or ``None`` (in neither: TIES and DARE trim single entries,
            WUDI's Adam steps are elementwise). Any span bounds the rank by ``Σ r_i``, so ``save_as=adapter``
            writes the merge exactly for the methods that name one and refuses the others without ``max_rank``;
            docs/interop.md ("Which merges are exact adapters") proves each method's value.
    """

    name: str
    label: str
    reference: str
    fn: Callable[..., Tensor]
    matrix_only: bool
    defaults: Mapping[str, Any]
    fixed: frozenset[str] = field(default_factory=frozenset)
    elementwise: Callable[..., Tensor] | None = None
    elementwise_keys: frozenset[str] = field(default_factory=frozenset)
    elementwise_only: frozenset[str] = field(default_factory=frozenset)
    prepare: Callable[..., Any] | None = None
    prepare_keys: frozenset[str] = field(default_factory=frozenset)
    param_checks: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict, repr=False)
    needs_statistics: bool = False
    task_terms: Callable[..., Tensor] | None = None
    block_by_block: bool = False
    lora_span: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        if self.matrix_only and self.elementwise is None:
            raise ValueError(f"{self.name}: a matrix_only method needs its elementwise rule")
        if self.needs_statistics and (not self.matrix_only or self.prepare is not None):
            raise ValueError(f"{self.name}: statistics go to a matrix_only method's matrix rule, without prepare")
        if self.task_terms is not None and not self.matrix_only:
            raise ValueError(f"{self.name}: task_terms are a matrix_only method's (the matrix rule's terms)")
        if self.block_by_block and not self.needs_statistics:
            raise ValueError(f"{self.name}: a block_by_block method takes the Grams it computes: needs_statistics")
        if self.lora_span not in LORA_SPANS:
            raise ValueError(f"{self.name}: lora_span={self.lora_span!r}, expected one of {LORA_SPANS}")
        stray = (self.elementwise_keys | self.elementwise_only | self.prepare_keys) - set(self.defaults)
        if stray:
            raise ValueError(f"{self.name}: parameter(s) {sorted(stray)} have no default")
        object.__setattr__(self, "param_checks", MappingProxyType({**PARAM_CHECKS, **self.param_checks}))
        unchecked = sorted(set(self.defaults) - set(self.param_checks))
        if unchecked:
            raise ValueError(
                f"{self.name}: parameter(s) {unchecked} have no check; add one to param_checks (or checks.PARAM_CHECKS)"
            )

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
            return {name: self.param_checks[name](value) for name, value in merged.items()}
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None

    def matrix_params(self, checked: Mapping[str, Any]) -> dict[str, Any]:
        """The checked parameters the matrix rule takes."""
        return {k: v for k, v in checked.items() if k not in self.elementwise_only}

    def elementwise_params(self, checked: Mapping[str, Any]) -> dict[str, Any]:
        """The checked parameters the elementwise rule takes (all of them for the elementwise methods)."""
        if not self.matrix_only:
            return dict(checked)
        return {k: v for k, v in checked.items() if k in self.elementwise_keys}

    def merge_matrix(
        self,
        deltas: Sequence[Delta],
        coefficients: Coefficients = None,
        statistics: Sequence[Tensor] | None = None,
        **params: Any,
    ) -> Tensor:
        """The method itself on one parameter's deltas.

        ``params`` are the method's parameters (checked here) plus the runtime keyword ``out_dtype``;
        ``statistics`` the per-task Grams, for a method that ``needs_statistics`` (refused by the others).
        """
        out_dtype = params.pop("out_dtype", None)
        checked = {**self._statistics(statistics), **self.matrix_params(self.check(params))}
        return self.fn(deltas, coefficients=coefficients, out_dtype=out_dtype, **checked)

    def matrix_terms(
        self,
        deltas: Sequence[Delta],
        coefficients: Coefficients = None,
        statistics: Sequence[Tensor] | None = None,
        **params: Any,
    ) -> Tensor:
        """The matrix rule's per-task terms ``[T, *shape]`` (``task_terms``), with ``merge_matrix``'s arguments.

        Raises:
            ValueError: a method without per-task terms.
        """
        if self.task_terms is None:
            raise ValueError(f"{self.name}: its matrix rule has no per-task terms")
        out_dtype = params.pop("out_dtype", None)
        checked = {**self._statistics(statistics), **self.matrix_params(self.check(params))}
        return self.task_terms(deltas, coefficients=coefficients, out_dtype=out_dtype, **checked)

    def _statistics(self, statistics: Sequence[Tensor] | None) -> dict[str, Any]:
        if self.needs_statistics:
            return {"statistics": statistics}
        if statistics is not None:
            raise ValueError(f"{self.name} takes no statistics")
        return {}

    def merge_elementwise(self, deltas: Sequence[Delta], coefficients: Coefficients = None, **params: Any) -> Tensor:
        """The method's rule for non-matrix parameters and excluded matrices (docs/methods.md, "Non-matrix parameters").

        Iso-C, Iso-CTS and TSV-M take the plain mean, DRM trims (``nonmatrix_drop_rate``), elects and merges;
        Task Arithmetic, TIES and DARE are elementwise already and run themselves. Factors are densified.
        """
        out_dtype = params.pop("out_dtype", None)
        checked = self.elementwise_params(self.check(params))
        fn = self.elementwise if self.matrix_only else self.fn
        return fn(deltas, coefficients=coefficients, out_dtype=out_dtype, **checked)

    def merge_many(
        self,
        rule: str,
        deltas: Sequence[Delta],
        param_sets: Sequence[Mapping[str, Any]],
        coefficients: Coefficients = None,
        *,
        out_dtype: torch.dtype | None = None,
        statistics: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """``rule`` (``"matrix"`` or ``"elementwise"``) at every parameter set, sharing the work they have in common.

        Why: a search over a method's parameters merges every parameter of a model at every value. Sets that agree
        on the parameters a rule takes get one result (the same tensor object): a DRM drop-rate search computes
        each non-matrix parameter once. Matrix rules with ``prepare`` compute it once per distinct ``prepare_keys``
        values and finish each set from it (DRM's joint basis serves every drop rate).

        ``statistics``: the per-task Grams of the matrix rule (``merge_matrix``).

        Returns:
            One merged delta per parameter set, in order.
        """
        if rule not in ("matrix", "elementwise"):
            raise ValueError(f"rule={rule!r}: expected 'matrix' or 'elementwise'")
        checked = [self.check(p) for p in param_sets]
        used = [self.matrix_params(p) if rule == "matrix" else self.elementwise_params(p) for p in checked]
        keys = [tuple(sorted(params.items())) for params in used]
        done: dict[tuple[tuple[str, Any], ...], Tensor] = {}
        distinct = {key: params for key, params in zip(keys, used, strict=True)}
        if rule == "elementwise":
            for key, params in distinct.items():
                done[key] = self.merge_elementwise(deltas, coefficients, out_dtype=out_dtype, **params)
        elif self.prepare is None:
            extra = self._statistics(statistics)
            for key, params in distinct.items():
                done[key] = self.fn(deltas, coefficients=coefficients, out_dtype=out_dtype, **extra, **params)
        else:
            groups: dict[tuple[tuple[str, Any], ...], list[tuple[tuple[tuple[str, Any], ...], dict[str, Any]]]] = {}
            for key, params in distinct.items():
                shared = tuple(sorted((k, v) for k, v in params.items() if k in self.prepare_keys))
                rest = {k: v for k, v in params.items() if k not in self.prepare_keys}
                groups.setdefault(shared, []).append((key, rest))
            for shared, members in groups.items():
                prepared = self.prepare(deltas, coefficients=coefficients, **dict(shared))
                if hasattr(prepared, "merge_all"):
                    merged = prepared.merge_all([rest for _, rest in members], out_dtype=out_dtype)
                else:
                    merged = [prepared.merge(**rest, out_dtype=out_dtype) for _, rest in members]
                done.update({key: tensor for (key, _), tensor in zip(members, merged, strict=True)})
                del prepared
        out = [done[key] for key in keys]
        return out
