"""Which parameter of a backbone gets which merge rule, and what merging it costs.

Why a plan: matrix methods (DRM, Iso-C, Iso-CTS, TSV-M) are defined on the 2-D weight of a linear map. Embedding
tables are 2-D too, but their rows are tokens, not a linear map's outputs, and heads are task-specific; decomposing
them is meaningless (and for a 128k-token vocabulary, very slow). Those parameters and every 1-D one (biases,
norms) are merged by the method's elementwise rule instead. The plan is a pure function of names and shapes, so it
can be printed, tested, and shared out between distributed ranks by its cost before any tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Rule = Literal["matrix", "elementwise", "skip"]

#: Matrices that default to the elementwise rule: token/position embeddings, LM and classifier heads, T5's shared
#: embedding. Matched with ``re.search`` against ``state_dict()`` names.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)embeddings\.",  # BERT/RoBERTa/ViT embeddings.* (word, position, token type, patch)
    r"(^|\.)embed_tokens\.",  # Llama/T5 token embeddings
    r"(^|\.)embed_positions\.",
    r"(^|\.)(wte|wpe)\.",  # GPT-2 style
    r"(^|\.)shared\.",  # T5 shared embedding
    r"position_embeddings?\.",
    r"token_type_embeddings\.",
    r"relative_attention_bias\.",  # T5 relative position buckets: an embedding table
    r"(^|\.)rel_embeddings\.",  # DeBERTa-v2/v3 relative position table (encoder.rel_embeddings)
    r"(^|\.)lm_head\.",
    r"(^|\.)classifier\.",
    r"(^|\.)score\.",
)


class _HasMatrixOnly(Protocol):
    matrix_only: bool


@dataclass(frozen=True)
class PlanEntry:
    """One parameter's place in the plan.

    Attributes:
        name: the backbone ``state_dict()`` name.
        shape: the base parameter's shape.
        rule: ``"matrix"`` (the method's matrix rule), ``"elementwise"`` (its rule for non-matrix parameters) or
            ``"skip"`` (no task changes it, or the plan keeps it at ``W_0``: the merged delta is absent).
        cost: a rough floating-point-operation estimate, used to balance parameters between ranks.
    """

    name: str
    shape: tuple[int, ...]
    rule: Rule
    cost: float


@dataclass
class MergePlan:
    """Regexes (``re.search``) that route parameters to a method's matrix or elementwise rule.

    Attributes:
        include: a 2-D parameter gets the matrix rule only if its name matches one of these.
        exclude: ... and none of these (defaults: embeddings, position/token-type embeddings, LM and classifier
            heads, T5's ``shared``).
        skip: parameters kept at ``W_0`` whatever the task vectors say (empty by default).
    """

    include: list[str] = field(default_factory=lambda: [r".*"])
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    skip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._compiled: dict[str, list[re.Pattern[str]]] = {}
        for attr in ("include", "exclude", "skip"):
            patterns = getattr(self, attr)
            if isinstance(patterns, str):
                raise ValueError(f"MergePlan.{attr}={patterns!r}: expected a list of regexes, not one string")
            compiled = []
            for pattern in patterns:
                try:
                    compiled.append(re.compile(pattern))
                except re.error as err:
                    raise ValueError(f"MergePlan.{attr}: invalid regex {pattern!r} ({err})") from None
            self._compiled[attr] = compiled

    def _matches(self, attr: str, name: str) -> bool:
        return any(p.search(name) for p in self._compiled[attr])

    def rule(self, name: str, shape: Sequence[int], matrix_only: bool, *, present: bool = True) -> Rule:
        """The rule for one parameter (see ``PlanEntry.rule``)."""
        if not present or self._matches("skip", name):
            return "skip"
        if matrix_only and len(shape) == 2 and self._matches("include", name) and not self._matches("exclude", name):
            return "matrix"
        return "elementwise"

    def entries(
        self,
        shapes: Mapping[str, Sequence[int]],
        method: _HasMatrixOnly | bool,
        *,
        present: Collection[str] | None = None,
        num_tasks: int = 1,
    ) -> list[PlanEntry]:
        """Plan every parameter of ``shapes`` (in its order).

        Args:
            shapes: base parameter name -> shape (e.g. ``{k: v.shape for k, v in model.state_dict().items()}``).
            method: a registry ``MergeMethod`` (only ``matrix_only`` is read) or that flag itself.
            present: names that at least one task vector changes; others are skipped. ``None``: all present.
            num_tasks: the number of task vectors, which scales the cost estimate.
        """
        matrix_only = method if isinstance(method, bool) else bool(method.matrix_only)
        out = []
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            rule = self.rule(name, shape, matrix_only, present=present is None or name in present)
            out.append(PlanEntry(name, shape, rule, estimate_cost(shape, rule, num_tasks)))
        return out


def estimate_cost(shape: Sequence[int], rule: Rule, num_tasks: int = 1) -> float:
    """Rough flop count of merging one parameter, for load balancing (only ratios matter).

    Matrix rule on n×m: the joint decomposition of T stacked deltas, T·n·m·min(n, m) (a thin SVD or a Gram
    matrix), plus min(n, m)³ for its eigendecomposition. Elementwise: T·numel. Skip: 0.
    """
    if rule == "skip":
        return 0.0
    numel = 1
    for s in shape:
        numel *= int(s)
    if rule == "elementwise":
        return float(num_tasks * numel)
    n, m = int(shape[0]), int(shape[1])
    k = min(n, m)
    return float(num_tasks * n * m * k + k**3)


def summarize(entries: Sequence[PlanEntry]) -> dict[str, int]:
    """Count entries per rule (every rule present, zero counts included): what ``merge.json`` records."""
    counts = {"matrix": 0, "elementwise": 0, "skip": 0}
    for entry in entries:
        counts[entry.rule] += 1
    return counts
