"""Figures for the run report: accuracy per task, λ curves, singular value spectra before and after merging.

matplotlib is optional (the ``demo``/``test`` extras): it is imported lazily, with the Agg backend so no display is
ever needed, and ``write_plots`` skips the figures with a warning naming the missing package when it is absent.

The spectra are computed apart from the drawing (``layer_spectra``) so they can be tested without matplotlib:
for a few 2-D parameters (first, middle and last by name order) the singular values of each task's delta
("before", LoRA factors made dense as ``scale·B@A``) and of each method's merged delta ("after"), in float64,
because float32 singular values of nearly rank-deficient deltas are mostly rounding noise.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from drm_lightning.evaluation.results import EvaluationResults
from drm_lightning.io.merged_delta import merged_delta_index
from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import DELTAS_FILE, LORA_A_SUFFIX, LORA_B_SUFFIX, TaskVectorError, read_meta
from drm_lightning.merging.engine.plan import DEFAULT_EXCLUDE

ACCURACY_PNG = "accuracy_by_task.png"
LAMBDA_PNG = "lambda_curves.png"
LANDSCAPE_PNG = "param_search.png"
SPECTRA_PNG = "singular_values.png"

#: 2-D parameters that are not linear maps (token tables, heads): the merge plan's default exclusions. Their
#: spectra say nothing about the matrix methods, which leave them to the elementwise rule.
NON_MATRIX_PATTERNS = tuple(re.compile(p) for p in DEFAULT_EXCLUDE)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or ``None`` (with a warning naming the package) when not installed."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(
            "plots skipped: the 'matplotlib' package is not installed (pip install 'drm_lightning[demo]')",
            stacklevel=3,
        )
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_task_accuracy(results: EvaluationResults, path: str | os.PathLike[str]) -> Path | None:
    """Grouped bars: one group per task (plus the average), one bar per model (pretrained, expert, each merge)."""
    plt = _pyplot()
    if plt is None:
        return None
    sources = (["pretrained"] if results.pretrained else []) + ["expert"] + [m.label for m in results.methods]
    groups = [*results.tasks, "average"]
    width = 0.8 / len(sources)
    width_in = min(20.0, max(6.0, 0.25 * len(groups) * len(sources) + 1.0))  # room for every bar, within reason
    fig, ax = plt.subplots(figsize=(width_in, 4.0))
    try:
        for k, source in enumerate(sources):
            values = [results.value(source, t) for t in results.tasks] + [results.average(source)]
            xs = [g + (k - (len(sources) - 1) / 2) * width for g in range(len(groups))]
            heights = [math.nan if v is None else 100.0 * v for v in values]
            ax.bar(xs, heights, width=width, label=source)
        ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 5 else 0)
        ax.set_ylabel(f"{results.metric} (%)")
        ax.set_title(f"{results.metric} per task ({results.split})")
        ax.set_ylim(0, 115)  # headroom: the legend sits above the 100 % line, never on a bar
        ax.legend(fontsize="small", ncols=min(4, len(sources)), loc="upper center")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_lambda_curves(results: EvaluationResults, path: str | os.PathLike[str]) -> Path | None:
    """One line per merged model: average normalised metric against λ, the chosen λ marked. ``None`` if no curve."""
    searched = [m for m in results.methods if m.curve]
    if not searched:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    try:
        for m in searched:
            points = sorted(m.curve, key=lambda p: p.lam)
            xs, ys = [p.lam for p in points], [100.0 * p.score for p in points]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=m.label)
            chosen = [p for p in points if m.lam is not None and p.lam == m.lam]
            if chosen:
                ax.plot([chosen[0].lam], [100.0 * chosen[0].score], marker="*", ms=12, color=line.get_color())
        ax.set_xlabel("λ")
        ax.set_ylabel(f"average normalised {results.metric} (%)")
        ax.set_title("λ search on validation data (★ = chosen)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_param_landscapes(results: EvaluationResults, path: str | os.PathLike[str]) -> Path | None:
    """A heatmap per method whose own parameters were searched: parameter set x λ, validation score (%), the chosen
    cell framed. ``None`` when no method searched its parameters."""
    swept = [m for m in results.methods if m.variants]
    if not swept:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    lams = [sorted({p.lam for v in m.variants for p in v.curve}) for m in swept]
    fig, axes = plt.subplots(
        len(swept), 1, figsize=(min(16.0, 3.0 + 0.7 * max(map(len, lams))), 1.2 + sum(0.45 * len(m.variants) + 0.8
                                                                              for m in swept)), squeeze=False,
    )  # fmt: skip
    try:
        for ax, m, grid in zip(axes[:, 0], swept, lams, strict=True):
            cells = [[math.nan] * len(grid) for _ in m.variants]
            for i, v in enumerate(m.variants):
                for p in v.curve:
                    cells[i][grid.index(p.lam)] = 100.0 * p.score
            image = ax.imshow(cells, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(grid)), [f"{x:g}" for x in grid], fontsize="small")
            ax.set_yticks(range(len(m.variants)), [v.name for v in m.variants], fontsize="small")
            chosen = [i for i, v in enumerate(m.variants) if v is m.chosen()]
            if chosen and m.lam in grid:
                i, j = chosen[0], grid.index(m.lam)
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            for i, row in enumerate(cells):
                for j, value in enumerate(row):
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize="x-small", color="white")
            ax.set_title(f"{m.label}: average normalised {results.metric} (%) on validation", fontsize="small")
            ax.set_xlabel("λ", fontsize="small")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


@dataclass
class LayerSpectrum:
    """Singular values (descending, float64) of one parameter: each task's delta and each merged delta."""

    name: str
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]


def _task_vector_matrices(folder: Path) -> tuple[str, dict[str, tuple[str, ...]], float]:
    """A task vector's task name, its 2-D deltas (name -> the safetensors keys that make it) and its LoRA scale."""
    meta = read_meta(folder)
    scale = float(meta.lora.scale) if meta.lora is not None else 1.0
    entries: dict[str, tuple[str, ...]] = {}
    with open_safetensors(folder / DELTAS_FILE, error=TaskVectorError) as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(LORA_A_SUFFIX):
                name = key[: -len(LORA_A_SUFFIX)]
                if name + LORA_B_SUFFIX not in keys:
                    raise TaskVectorError(f"{folder / DELTAS_FILE}: key {key!r} has no {LORA_B_SUFFIX} partner")
                entries[name] = (key, name + LORA_B_SUFFIX)
            elif not key.endswith(LORA_B_SUFFIX) and len(f.get_slice(key).get_shape()) == 2:
                entries[key] = (key,)
    return meta.task, entries, scale


def _read_task_delta(folder: Path, keys: tuple[str, ...], scale: float) -> torch.Tensor:
    with open_safetensors(folder / DELTAS_FILE, error=TaskVectorError) as f:
        tensors = [f.get_tensor(k).to(torch.float64) for k in keys]
    if len(tensors) == 1:
        return tensors[0]
    lora_a, lora_b = tensors
    return scale * (lora_b @ lora_a)


def pick_layers(names: Sequence[str], count: int = 3) -> list[str]:
    """``count`` names spread over ``names`` in order: first, last and evenly in between (first/middle/last for 3)."""
    if count < 1:
        raise ValueError(f"count={count!r}: must be >= 1")
    if len(names) <= count:
        return list(names)
    if count == 1:
        return [names[len(names) // 2]]
    picks = [round(i * (len(names) - 1) / (count - 1)) for i in range(count)]
    return [names[i] for i in dict.fromkeys(picks)]


def layer_spectra(
    task_vectors: Sequence[str | os.PathLike[str]],
    merged: Mapping[str, str | os.PathLike[str]],
    names: Sequence[str] | None = None,
    count: int = 3,
) -> list[LayerSpectrum]:
    """Singular values of task and merged deltas for a few 2-D parameters.

    Args:
        task_vectors: task vector folders (dense or LoRA).
        merged: method label -> merged folder written by ``merge_task_vectors`` (its ``merged_delta/`` shards hold
            Δ_merged, before λ).
        names: the parameters to use; by default ``count`` of the linear-map matrices that every task vector and
            every merged folder has (``pick_layers`` over their sorted names; embeddings and heads left out).
        count: how many parameters to pick when ``names`` is ``None``.
    """
    if not task_vectors:
        raise ValueError("task_vectors: need at least one task vector folder for the spectra")
    tvs = [(Path(folder), *_task_vector_matrices(Path(folder))) for folder in task_vectors]
    indices = {label: merged_delta_index(folder) for label, folder in merged.items()}
    common = set.intersection(*(set(entries) for _, _, entries, _ in tvs))
    for index in indices.values():
        common &= set(index)
    if names is None:
        matrices = [n for n in sorted(common) if not any(p.search(n) for p in NON_MATRIX_PATTERNS)]
        names = pick_layers(matrices, count)
        if not names:
            raise ValueError(
                f"no 2-D parameter is shared by all task vectors {[str(p) for p, *_ in tvs]} and merged folders "
                f"{sorted(merged)}; pass names= explicitly"
            )
    else:
        missing = [n for n in names if n not in common]
        if missing:
            raise ValueError(f"names: {missing} not a 2-D delta in every task vector and merged folder")
    spectra = []
    for name in names:
        before = {}
        for folder, task, entries, scale in tvs:
            before[task] = torch.linalg.svdvals(_read_task_delta(folder, entries[name], scale))
        after = {}
        for label, index in indices.items():
            with open_safetensors(index[name]) as f:
                delta = f.get_tensor(name).to(torch.float64)
            if delta.ndim != 2:
                raise ValueError(f"{index[name]}: key {name!r} has shape {list(delta.shape)}, expected a matrix")
            after[label] = torch.linalg.svdvals(delta)
        spectra.append(LayerSpectrum(name, before, after))
    return spectra


def plot_spectra(spectra: Sequence[LayerSpectrum], path: str | os.PathLike[str]) -> Path | None:
    """One panel per parameter: task deltas dashed ("before"), merged deltas solid ("after"), log scale."""
    if not spectra:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(spectra), figsize=(4.5 * len(spectra), 3.8), squeeze=False)
    try:
        for ax, spectrum in zip(axes[0], spectra, strict=True):
            for task, values in spectrum.before.items():
                ax.plot(_positive(values), linestyle="--", linewidth=1.0, label=f"task {task}")
            for label, values in spectrum.after.items():
                ax.plot(_positive(values), linewidth=1.8, label=f"merged {label}")
            ax.set_yscale("log")
            ax.set_xlabel("index")
            ax.set_ylabel("singular value")
            ax.set_title(_short(spectrum.name), fontsize="small")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="x-small")
        fig.suptitle("singular values of deltas: tasks (dashed) and merged (solid)")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def heatmap(
    values: Sequence[Sequence[float]],
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    path: str | os.PathLike[str],
) -> Path | None:
    """A matrix as a heatmap, one row per ``rows`` entry (e.g. learned coefficients, layer × task), the colour scale
    beside it. ``None`` without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    height = min(40.0, max(3.0, 0.16 * len(rows) + 1.5))
    width = min(16.0, max(4.5, 1.1 * len(columns) + 4.0))
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(columns)), [_short(c, 16) for c in columns], rotation=20 if len(columns) > 4 else 0)
        ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=6 if len(rows) > 30 else 8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _positive(values: torch.Tensor) -> list[float]:
    """Exact zeros cannot be drawn on a log scale: they end the line (NaN) instead of breaking the axis."""
    return [v if v > 0 else math.nan for v in values.tolist()]


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_plots(
    results: EvaluationResults,
    folder: str | os.PathLike[str],
    task_vectors: Sequence[str | os.PathLike[str]] = (),
    merged: Mapping[str, str | os.PathLike[str]] | None = None,
    spectra_layers: int = 3,
) -> list[Path]:
    """Draw every figure that the inputs allow into ``folder``; return the PNG paths written.

    The spectra need the task vector folders and the merged folders; without them that figure is left out.
    With matplotlib missing, nothing is drawn and one warning names the package. Only global rank 0 draws.
    """
    if rank_zero_only.rank != 0 or _pyplot() is None:
        return []
    folder = Path(folder)
    written = [
        plot_task_accuracy(results, folder / ACCURACY_PNG),
        plot_lambda_curves(results, folder / LAMBDA_PNG),
        plot_param_landscapes(results, folder / LANDSCAPE_PNG),
    ]
    if task_vectors and merged:
        written.append(plot_spectra(layer_spectra(task_vectors, merged, count=spectra_layers), folder / SPECTRA_PNG))
    return [p for p in written if p is not None]
