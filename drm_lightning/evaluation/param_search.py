"""A search over a merge method's own parameters, with edge extension: the one orchestration ``merge`` and the
pipeline share.

Every parameter set of the grid (``ParamGrid.combinations``) is merged into ``<root>/<values>`` (``variant_name``)
by the caller; ``evaluate_merges``, given the ``ParamSearch`` for a label, scores each set on validation (its λ
searched, or at the given λ) and keeps the best (set, λ). After each round, up to ``extend`` times, every numeric
parameter whose best value is the first or last of its grid gets the next value beyond it
(``sweep.edge_extension``, as the λ grid does): those sets are merged through the caller's ``merge`` and scored too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drm_lightning.evaluation.results import VariantResult

if TYPE_CHECKING:
    from drm_lightning.merging.engine.sweep import ParamGrid


@dataclass(frozen=True)
class Variant:
    """One parameter set of a search over a method's own parameters: its searched values and merged folder."""

    name: str
    values: dict[str, Any]
    folder: Path


MergeSets = Callable[[Sequence[Variant], list[dict[str, Any]]], None]
"""``(variants, their full parameters) -> None``: merge each set into its folder (the caller's merge)."""


class ParamSearch:
    """The parameter sets of one searched method and their edge extension.

    Args:
        grid: the method's parameters, the searched ones as axes (``ParamGrid.parse``).
        root: the folder that holds one merged folder per set.
        merge: merges the sets an extension adds (the grid's own sets are merged by the caller, beforehand).
    """

    def __init__(self, grid: ParamGrid, root: Path, merge: MergeSets) -> None:
        from drm_lightning.merging.engine.sweep import variant_name

        self.grid = grid
        self.root = Path(root)
        self.merge = merge
        self.variants = [Variant(variant_name(v), v, self.root / variant_name(v)) for v in grid.combinations()]

    def params(self, variants: Sequence[Variant]) -> list[dict[str, Any]]:
        """The full checked parameters of each set (fixed values, searched values, defaults)."""
        return [self.grid.params(v.values) for v in variants]

    def extend(self, tried: Sequence[VariantResult]) -> list[Variant]:
        """One round of edge extension: for every numeric axis whose best value over ``tried`` is its first or last,
        the best set with that axis moved one step beyond the edge, merged (``merge``) into ``root/<name>``.

        The grid keeps the values added, so the next round extends from it. ``[]`` when no axis has its best value
        at an edge (or none can step beyond it).
        """
        from drm_lightning.merging.engine.sweep import edge_extension, variant_name

        best = best_variant(tried)
        new = []
        for key in list(self.grid.axes):
            value = edge_extension(self.grid.method, key, self.grid.axes[key], best.values[key])
            if value is None:
                continue
            self.grid = self.grid.extended(key, value)
            values = {**best.values, key: value}
            new.append(Variant(variant_name(values), values, self.root / variant_name(values)))
        if new:
            self.merge(new, self.params(new))
        return new


def best_variant(results: Sequence[VariantResult]) -> VariantResult:
    """The variant with the best validation score; ties (and NaN or missing scores, which never win) go to the
    earlier one."""
    best = results[0]
    for item in results[1:]:
        s, b = item.score, best.score
        s = -math.inf if s is None or math.isnan(s) else s
        b = -math.inf if b is None or math.isnan(b) else b
        if s > b:
            best = item
    return best
