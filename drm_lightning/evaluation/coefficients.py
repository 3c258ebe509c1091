"""Learned merging coefficients: the settings, which coefficient scales which delta, and the deltas themselves.

Two forms (docs/methods.md, "Learned coefficients"):

``layer``
    ``W = W_0 + λ_g·Δ^{method}`` for every parameter of group g: one coefficient per layer (or block) over any
    method's merged delta (DRM, Iso-C/CTS, TSV-M, TIES, ...), read from the merged folder as the λ search reads it.
``task``
    ``W = W_0 + Σ_i λ_{g,i}·D_i`` (AdaMerging, arXiv 2310.02575): one coefficient per layer (or block) and task,
    over Task Arithmetic's deltas ``D_i = c_i·Δ_i`` or TIES's per-task contributions ``D_i = c_i·s_i/n`` (``s_i``
    the entries of the trimmed ``Δ_i`` that agree with the elected sign, ``n`` their count per entry), so that
    ``Σ_i D_i`` is exactly the merged delta of ``task_arithmetic`` / ``ties`` and all coefficients at the chosen λ
    reproduce the fixed-λ merge. (AdaMerging++ sums the trimmed, sign-elected deltas without dividing by ``n``.)
    Also over RegMean's and ``wudi_closed``'s per-task terms (``MergeMethod.task_terms``: ``D_i = c_i Δ_i (G̃_i +
    ρ̄ I) S⁻¹``, ``D_i = w_i P_i P_iᵀ P_i M⁻¹``), where ``Σ_i λ_i D_i`` is the method's own merge with coefficients
    ``λ_i c_i``: per layer, each task's weight in the method's solution.

A group is one parameter tensor (``granularity: tensor``) or one transformer block (``block``: every parameter whose
name shares the prefix up to its first number, ``encoder.layer.3``; parameters outside blocks group by their first
name part, ``embeddings``, ``pooler``).

Memory: the coefficient learner holds, for every parameter of the merged delta, ``K`` float32 deltas (``K = 1`` for
``layer``, ``T`` for ``task``) beside the base weights, plus one merged copy of the weights per step and its
autograd graph.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

OBJECTIVES = ("entropy", "cross_entropy")
FORMS = ("layer", "task")
GRANULARITIES = ("tensor", "block")
SPLITS = ("validation", "train", "test")
#: Elementwise methods whose merged delta is a sum of per-task terms the ``task`` form can weight one by one (the
#: matrix methods with ``task_terms`` join them: ``task_form_methods``).
ELEMENTWISE_TASK_FORM = ("task_arithmetic", "ties")


@dataclass
class LearnSettings:
    """How merging coefficients are learned on top of a method (a recipe method's ``learn`` block).

    Args:
        objective: ``entropy``: the Shannon entropy of the merged model's predictions on unlabelled inputs (labels
            never read; AdaMerging); ``cross_entropy``: the loss on the labelled ``split``.
        form: ``layer``: one coefficient per group over the method's merged delta; ``task``: one per group and task
            over the task vectors (``task_arithmetic``: AdaMerging; ``ties``: AdaMerging++-style).
        granularity: a group is one parameter ``tensor`` or one transformer ``block``.
        epochs: passes over the data (one pass: every batch of the largest task's split, smaller splits cycled).
        lr: Adam's learning rate (0 leaves the coefficients at their initial value).
        max_steps: stop after this many optimiser steps (None: ``epochs`` decide).
        split: the data learned on: ``validation`` (the λ search's split), ``train``, or ``test`` (only with
            ``transductive: true``: AdaMerging's transductive setting, marked in the report).
        transductive: allow ``split: test``.
        init: the initial coefficient; None: the λ the method's search chose (or its fixed λ).
        seed: ``seed_everything`` before the fit (data order and anything random).
        include: a regular expression searched in parameter names: only those get learned coefficients (and only
            their deltas are held); the others stay at the initial coefficient. None: every parameter.
        batch_size: examples per task and step (None: the datamodule's batch size of ``split``); fewer examples
            per step cost less memory and time per step.
    """

    objective: Literal["entropy", "cross_entropy"] = "entropy"
    form: Literal["layer", "task"] = "layer"
    granularity: Literal["tensor", "block"] = "tensor"
    epochs: int = 5
    lr: float = 0.01
    max_steps: int | None = None
    split: Literal["validation", "train", "test"] = "validation"
    transductive: bool = False
    init: float | None = None
    seed: int = 0
    include: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "learn") -> LearnSettings:
        """Refuse a bad value with one line naming the key (``where.<key>``)."""
        for key, allowed in (
            ("objective", OBJECTIVES),
            ("form", FORMS),
            ("granularity", GRANULARITIES),
            ("split", SPLITS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{where}.{key}={getattr(self, key)!r}: expected one of {list(allowed)}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"{where}.epochs={self.epochs!r}: expected an integer >= 1")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"{where}.batch_size={self.batch_size!r}: expected an integer >= 1 or null")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"{where}.max_steps={self.max_steps!r}: expected an integer >= 1 or null")
        for key in ("lr",) + (("init",) if self.init is not None else ()):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}.{key}={value!r}: expected a finite number")
        if self.lr < 0:
            raise ValueError(f"{where}.lr={self.lr!r}: expected a learning rate >= 0")
        if not isinstance(self.transductive, bool):
            raise ValueError(f"{where}.transductive={self.transductive!r}: expected true or false")
        if self.split == "test" and not self.transductive:
            raise ValueError(
                f"{where}.split='test': learning on the test split is the transductive setting; say "
                "transductive: true to ask for it (the report marks it)"
            )
        if self.transductive and self.split != "test":
            raise ValueError(f"{where}.transductive=true: only with split: test (got split={self.split!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{where}.seed={self.seed!r}: expected an integer")
        if self.include is not None:
            try:
                re.compile(str(self.include))
            except re.error as err:
                raise ValueError(f"{where}.include={self.include!r}: not a regular expression ({err})") from None
        return self

    @classmethod
    def parse(cls, value: Mapping[str, Any] | LearnSettings, where: str = "learn") -> LearnSettings:
        """A recipe's ``learn`` mapping as checked settings; unknown keys named."""
        if isinstance(value, LearnSettings):
            return value.check(where)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}={value!r}: expected a mapping of {sorted(cls.__dataclass_fields__)}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known {sorted(cls.__dataclass_fields__)}")
        settings = cls.__new__(cls)  # checked below with ``where`` in its messages
        for key, item in asdict(cls()).items():
            setattr(settings, key, value.get(key, item))
        return settings.check(where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def data_used(self) -> str:
        """What the coefficients were learned on, in words (the report says it beside the numbers)."""
        if self.objective == "entropy":
            what = f"entropy of predictions on the {self.split} split's inputs, labels unused"
        else:
            what = f"cross-entropy on the labelled {self.split} split"
        return what + (" (TRANSDUCTIVE: the test split)" if self.transductive else "")


def group_of(name: str, granularity: str) -> str:
    """The group a parameter's coefficient belongs to: itself (``tensor``) or its block (``block``)."""
    if granularity == "tensor":
        return name
    if granularity != "block":
        raise ValueError(f"granularity={granularity!r}: expected one of {list(GRANULARITIES)}")
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


@dataclass(frozen=True)
class CoefficientLayout:
    """Which row of the coefficient matrix ``[groups, columns]`` scales which parameter.

    ``columns`` are the task names (``task`` form) or ``["merged"]`` (``layer`` form).
    """

    names: tuple[str, ...]
    groups: tuple[str, ...]
    rows: tuple[int, ...]
    columns: tuple[str, ...]

    @classmethod
    def build(cls, names: Sequence[str], granularity: str, columns: Sequence[str]) -> CoefficientLayout:
        groups: list[str] = []
        index: dict[str, int] = {}
        rows = []
        for name in names:
            group = group_of(name, granularity)
            if group not in index:
                index[group] = len(groups)
                groups.append(group)
            rows.append(index[group])
        return cls(tuple(names), tuple(groups), tuple(rows), tuple(columns))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.groups), len(self.columns)


def combine(coefficients: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``Σ_k c_k·D_k`` of a ``[K, *shape]`` stack (``c_0·D_0`` for one delta, the same product with K = 1)."""
    if stack.shape[0] == 1:
        return coefficients[0] * stack[0]
    return torch.tensordot(coefficients.to(stack.dtype), stack, dims=1)


def is_learned(name: str, include: str | None) -> bool:
    """Whether parameter ``name`` gets learned coefficients (``include`` searched in it; None: every one)."""
    return include is None or re.search(include, name) is not None


def read_merged_stacks(merged: str | os.PathLike[str], include: str | None = None) -> dict[str, torch.Tensor]:
    """``layer`` form: each learned parameter's merged delta as a ``[1, *shape]`` float32 stack."""
    from drm_lightning.io.merged_delta import iter_merged_delta

    return {name: d.float().unsqueeze(0) for name, d in iter_merged_delta(merged) if is_learned(name, include)}


def task_form_methods() -> tuple[str, ...]:
    """The methods whose merged delta is a sum of per-task terms the ``task`` form can weight one by one: Task
    Arithmetic, TIES, and every registry method with ``task_terms`` (RegMean, ``wudi_closed``)."""
    from drm_lightning.merging.methods.registry import METHODS

    return ELEMENTWISE_TASK_FORM + tuple(name for name, m in METHODS.items() if m.task_terms is not None)


def read_task_stacks(
    merged: str | os.PathLike[str],
    record: Mapping[str, Any],
    task_vectors: Sequence[str | os.PathLike[str]],
    include: str | None = None,
) -> dict[str, torch.Tensor]:
    """``task`` form: each parameter's per-task terms ``[T, *shape]`` (float32), whose sum is the merged delta.

    Task Arithmetic: ``c_i Δ_i``; TIES: ``ties_terms``; a method with ``task_terms`` (RegMean, ``wudi_closed``): its
    matrix rule's terms on the parameters its merge plan (``merge.json``'s ``plan``) gave the matrix rule, with the
    recorded parameters and, for RegMean, each task's input Gram; on the others the plain mean's ``c_i Δ_i / T``
    (their elementwise rule).

    Args:
        merged: the merged folder (its keys and shapes name the parameters).
        record: its ``merge.json`` (method, params, coefficients, plan).
        task_vectors: the task vector folders, in the merge's order.
        include: only the parameters this regular expression is found in (None: all).
    """
    from drm_lightning.io.merged_delta import iter_merged_delta
    from drm_lightning.merging.engine.merger import read_grams
    from drm_lightning.merging.engine.plan import MergePlan
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.merging.methods.basic import task_mean
    from drm_lightning.merging.methods.registry import get_method

    method = str(record["method"])
    if method not in task_form_methods():
        raise ValueError(
            f"{Path(merged) / 'merge.json'}: method {method!r} has no per-task terms; learn.form='task' works over "
            f"{list(task_form_methods())} (use form: layer for any method)"
        )
    spec = get_method(method)
    if spec.task_terms is not None and spec.elementwise is not task_mean:
        raise ValueError(f"{method}: the task form needs the plain mean as its elementwise rule")
    readers = [TaskVectorReader(f) for f in task_vectors]
    c = record.get("coefficients") or [1.0] * len(readers)
    weights = torch.tensor([float(x) for x in c], dtype=torch.float64)
    params = dict(record.get("params") or {})
    density = float(params.get("density", 0.2))
    plan = MergePlan(**(record.get("plan") or {})) if spec.task_terms is not None else None
    out: dict[str, torch.Tensor] = {}
    for name, merged_delta in iter_merged_delta(merged):
        if not is_learned(name, include):
            continue
        shape = tuple(merged_delta.shape)
        raw = [reader.get(name, shape) for reader in readers]
        if plan is not None and plan.rule(name, shape, True) == "matrix":
            deltas = [torch.zeros(shape, dtype=torch.float64) if d is None else d for d in raw]
            grams = read_grams(readers, name) if spec.needs_statistics else None
            terms = spec.matrix_terms(deltas, [float(x) for x in c], grams, **params, out_dtype=torch.float64)
            out[name] = terms.to(torch.float32)
            continue
        stack = torch.zeros((len(readers), merged_delta.numel()), dtype=torch.float64)
        for i, delta in enumerate(raw):
            if delta is None:
                continue
            dense = delta if isinstance(delta, torch.Tensor) else delta.dense(torch.float64)
            stack[i] = dense.to(torch.float64).reshape(-1)
        if method == "ties":
            stack = ties_terms(stack, density)
        elif plan is not None:  # the plain mean
            stack = stack / len(readers)
        out[name] = (weights.view(-1, 1) * stack).to(torch.float32).reshape(len(readers), *shape)
    return out


def ties_terms(stack: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's per-task contributions ``s_i/n`` of a float64 ``[T, numel]`` stack, unweighted (``Σ_i`` = TIES).

    Each row trimmed to its largest fraction ``density`` (ties at the threshold kept, as ``ties``), the sign of the
    trimmed rows' sum elected (a zero sum elects +), an entry kept where it is non-zero with that sign, and every
    kept entry divided by the number of tasks kept there (at least 1).
    """
    from drm_lightning.merging.ops.elementwise import trim_threshold

    x = stack.clone()
    for i in range(x.shape[0]):
        threshold = trim_threshold(x[i], density)
        if threshold is not None:
            x[i].masked_fill_(x[i].abs() < threshold.to(x.dtype), 0)
    sign = torch.where(x.sum(dim=0) >= 0, 1.0, -1.0).to(x.dtype)
    survives = (x * sign) > 0
    count = survives.sum(dim=0).clamp_min(1).to(x.dtype)
    return torch.where(survives, x, torch.zeros_like(x)) / count
