"""Why DRM trails Iso-C / Iso-CTS / TSV-M on the demo: what each merge keeps, per task and per layer.

Reads real task vectors (e.g. the quickstart's ``runs/quickstart/task_vectors/*``), merges every matrix the default
merge plan gives the matrix rule with each method, in float64, and measures on the weights alone (no evaluation):

* per task: the share of the joint energy ``‖Δ_i‖² / Σ_j ‖Δ_j‖²``, and how strongly the merged delta acts in the
  task's own top singular directions, ``r_i = ‖U_ikᵀ (λ·Δ_merged) V_ik‖ / ‖U_ikᵀ Δ_i V_ik‖`` (``k = min(n, m)//T``,
  the share TSV-M gives each task): ``r_i = 1`` is the expert's own strength there;
* per method: ``‖λ·Δ_merged‖`` and its spectrum (effective rank, ``σ_1 / mean σ``);
* inside DRM: the fraction of each task's energy that survives pruning and then the sign election, with each of
  DRM's steps switchable (renormalisation, election, disjoint mean) — the paper's ablation, on these deltas.

Why on the weights: an evaluation of one merged MiniLM on four tasks costs tens of seconds, these numbers take
seconds per method, and they say *why* an evaluation comes out as it does. ``benchmarks/drm_study_eval.py`` gives
the accuracies. Numbers and commands: ``docs/drm_study.md``.

    python benchmarks/drm_study.py --task_vectors runs/quickstart/task_vectors --output runs/drm_study/weights.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from drm_lightning.merging import functional as F
from drm_lightning.merging.methods.drm_iso import drm_iso

F64 = torch.float64

#: λ chosen by the quickstart (docs/results.md table, commit f1830b8): the scale each merged delta is used at.
QUICKSTART_LAMBDA = {
    "task_arithmetic": 0.6,
    "ties": 0.8,
    "drm_v": 1.0,
    "drm_h": 0.5,
    "iso_c": 3.0,
    "iso_cts": 3.0,
    "tsv_m": 1.0,
    "drm_iso_v": 3.0,
}


# --------------------------------------------------------------------------------------------------------------------
# DRM with every step switchable (float64, straight from ALGORITHMS.md; the default path equals F.drm)
# --------------------------------------------------------------------------------------------------------------------


def drm_steps(
    deltas: Sequence[Tensor],
    *,
    direction: str = "vertical",
    drop_rate: float = 0.8,
    renorm: bool = True,
    elect: bool = True,
    disjoint: bool = True,
    rank_tol: float = F.DRM_RANK_TOL,
) -> dict[str, Tensor]:
    """DRM on one parameter's deltas, returning the merged delta and what each step kept of each task.

    Switches (the paper's ablation): ``renorm=False`` prunes the raw singular-vector blocks ``U_i`` (so a task with a
    small share ``ν_ij`` loses its entries first); ``elect=False`` keeps every non-zero pruned entry whatever its
    sign; ``disjoint=False`` divides by ``T`` instead of by the number of survivors.

    Returns:
        ``merged`` ``[n, m]``; ``share`` ``[T]``, each task's share of the joint energy; ``after_prune`` and
        ``after_elect`` ``[T]``, the fraction of ``‖B_i‖`` (``B_i = Δ_i V_r``, the task's coordinates in the joint
        basis) left after pruning and after the election; ``rank``, the number of joint components kept.
    """
    stack = torch.stack([d.to(F64) for d in deltas])
    if direction == "horizontal":
        stack = stack.mT
    t, n, m = stack.shape
    _, s, vh = torch.linalg.svd(stack.reshape(t * n, m), full_matrices=False)
    r = int((s > rank_tol * s[0]).sum())
    v = vh[:r].mT
    blocks = stack @ v  # [T, n, r] = U_i diag(s)
    norms = torch.linalg.vector_norm(blocks, dim=1)  # [T, r] = s ⊙ ν_i
    if renorm:
        ok = norms > F.SHARE_EPS * s[:r]
        unit = torch.where(ok.unsqueeze(1), blocks / torch.where(ok, norms, 1.0).unsqueeze(1), 0.0)
        scale = norms
    else:
        unit = blocks / s[:r]  # U_i itself
        scale = s[:r].expand(t, r)
    kept = F.keep_top_fraction(unit, 1.0 - drop_rate) * scale.unsqueeze(1)
    if elect:
        sign = torch.where(kept.sum(dim=0) >= 0, 1.0, -1.0).to(F64)
        survive = kept * sign > 0
    else:
        survive = kept != 0
    chosen = torch.where(survive, kept, 0.0)
    count = survive.sum(dim=0).clamp_min(1) if disjoint else torch.full_like(kept[0], float(t))
    merged = (chosen.sum(dim=0) / count) @ v.mT
    energy = torch.linalg.vector_norm(blocks, dim=(1, 2))
    safe = torch.where(energy > 0, energy, 1.0)
    return {
        "merged": merged.mT if direction == "horizontal" else merged,
        "share": energy**2 / (energy**2).sum().clamp_min(1e-300),
        "after_prune": torch.linalg.vector_norm(kept, dim=(1, 2)) / safe,
        "after_elect": torch.linalg.vector_norm(chosen, dim=(1, 2)) / safe,
        "rank": torch.tensor(r),
    }


# --------------------------------------------------------------------------------------------------------------------
# Measures on one parameter
# --------------------------------------------------------------------------------------------------------------------


def spectrum_stats(merged: Tensor) -> dict[str, float]:
    """Frobenius norm, effective rank ``exp(H(σ²/Σσ²))``, ``σ_1 / mean σ`` and the top-1 % energy share."""
    s = torch.linalg.svdvals(merged.to(F64))
    total = float((s**2).sum())
    if total == 0:
        return {"norm": 0.0, "effective_rank": 0.0, "top_over_mean": 0.0, "top1pct_energy": 0.0}
    p = s**2 / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    top = max(1, round(0.01 * s.numel()))
    return {
        "norm": math.sqrt(total),
        "effective_rank": math.exp(entropy),
        "top_over_mean": float(s[0] / s.mean()),
        "top1pct_energy": float(p[:top].sum()),
    }


BANDS = ((0, 8), (8, 32), (32, 96), (96, None))
"""Bands of each task's own singular directions (by rank) in which the merged delta's strength is measured."""


def task_bases(deltas: Sequence[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each task's singular triplets ``(U_i, S_i, V_i)`` (computed once per parameter)."""
    out = []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d.to(F64), full_matrices=False)
        out.append((u, s, vh.mT))
    return out


def task_strength(merged: Tensor, bases: Sequence[tuple[Tensor, Tensor, Tensor]], k: int) -> list[float]:
    """``r_i = ‖U_ikᵀ M V_ik‖ / ‖S_ik‖`` per task: the merged delta's strength in task i's top-k directions."""
    return [band_strength(merged, basis, 0, k) for basis in bases]


def band_strength(merged: Tensor, basis: tuple[Tensor, Tensor, Tensor], start: int, stop: int | None) -> float:
    """``‖U_bᵀ M V_b‖ / ‖S_b‖`` for the band ``b = start:stop`` of one task's singular directions."""
    u, s, v = basis
    own = float(torch.linalg.vector_norm(s[start:stop]))
    inside = float(torch.linalg.vector_norm(u[:, start:stop].mT @ merged.to(F64) @ v[:, start:stop]))
    return inside / own if own > 0 else 0.0


def gain(merged: Tensor, delta: Tensor) -> float:
    """``⟨M, Δ_i⟩ / ‖Δ_i‖²``: how many times task i's own update the merged delta contains, along that update."""
    norm2 = float((delta.to(F64) ** 2).sum())
    return float((merged.to(F64) * delta.to(F64)).sum()) / norm2 if norm2 > 0 else 0.0


def methods(drop_rate: float = 0.8) -> dict[str, Callable[[list[Tensor]], Tensor]]:
    """The merges compared (matrix rule only), each a function of one parameter's float64 deltas."""
    return {
        "task_arithmetic": lambda d: F.task_arithmetic(d),
        "ties": lambda d: F.ties(d, density=0.2),
        "drm_v": lambda d: F.drm(d, "vertical", drop_rate),
        "drm_h": lambda d: F.drm(d, "horizontal", drop_rate),
        "iso_c": lambda d: F.iso_c(d),
        "iso_cts": lambda d: F.iso_cts(d, common_fraction=0.8),
        "tsv_m": lambda d: F.tsv_m(d),
        "drm_iso_v": lambda d: drm_iso(d, "vertical", drop_rate),
    }


# --------------------------------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------------------------------


def matrix_deltas(folders: Sequence[Path]) -> tuple[list[str], dict[str, list[Tensor]]]:
    """Task names and, for every parameter the default plan merges with the matrix rule, the T dense deltas."""
    from drm_lightning.merging.engine.plan import MergePlan
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.models.backbone import load_recorded_base

    readers = [TaskVectorReader(f) for f in folders]
    base = load_recorded_base(readers[0].meta)
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    del base
    present = set().union(*(r.names() for r in readers))
    out: dict[str, list[Tensor]] = {}
    for entry in MergePlan().entries(shapes, True, present=present):
        if entry.rule == "matrix":
            raw = [r.get(entry.name, entry.shape) for r in readers]
            out[entry.name] = [torch.zeros(entry.shape, dtype=F64) if d is None else d.dense(F64) if hasattr(d, "dense")
                               else d.to(F64) for d in raw]  # fmt: skip
    return [r.task for r in readers], out


def layer_kind(name: str) -> str:
    """``attention.self.query`` etc. -> a short kind for per-kind tables (q, k, v, o, ffn_in, ffn_out)."""
    for key, kind in (("query", "q"), ("key", "k"), ("value", "v"), ("attention.output", "o"),
                      ("intermediate", "ffn_in"), ("output.dense", "ffn_out")):  # fmt: skip
        if key in name:
            return kind
    return "other"


def analyse(
    folders: Sequence[Path], lambdas: dict[str, float], drop_rate: float = 0.8, limit: int = 0, steps: bool = True
) -> dict:
    """Every measure of the module docstring, per parameter and averaged over parameters per task."""
    tasks, deltas = matrix_deltas(folders)
    if limit:
        deltas = dict(list(deltas.items())[:limit])
    fns = methods(drop_rate)
    per_param: dict[str, dict] = {}
    for name, ds in deltas.items():
        bases, k = task_bases(ds), min(ds[0].shape) // len(ds)
        row: dict = {"kind": layer_kind(name), "task_norms": [float(d.norm()) for d in ds]}
        for label, fn in fns.items():
            merged = fn(ds) * lambdas.get(label, 1.0)
            row[label] = {
                **spectrum_stats(merged),
                "strength": task_strength(merged, bases, k),
                "gain": [gain(merged, d) for d in ds],
                "bands": [[band_strength(merged, b, lo, hi) for lo, hi in BANDS] for b in bases],
            }
        for variant, kw in (ablations(drop_rate) if steps else {}).items():
            parts = drm_steps(ds, **kw)
            row[f"steps:{variant}"] = {key: parts[key].tolist() for key in ("share", "after_prune", "after_elect")}
        per_param[name] = row
        print(f"{name}: done", flush=True)
    return {"tasks": tasks, "lambdas": lambdas, "drop_rate": drop_rate, "params": per_param,
            "summary": summarise(tasks, per_param, list(fns))}  # fmt: skip


def ablations(drop_rate: float) -> dict[str, dict]:
    """DRM-V step switches measured inside DRM (the evaluation script runs the same set)."""
    return {
        "drm_v": {"drop_rate": drop_rate},
        "drm_v_p0": {"drop_rate": 0.0},
        "drm_v_norenorm": {"drop_rate": drop_rate, "renorm": False},
        "drm_v_noelect": {"drop_rate": drop_rate, "elect": False},
    }


def summarise(tasks: list[str], per_param: dict[str, dict], labels: list[str]) -> dict:
    """Per method: mean over parameters of each task's strength and of the spectrum numbers; DRM's per-task kept."""
    rows = list(per_param.values())
    out: dict = {"share": [sum(r["task_norms"][i] ** 2 for r in rows) for i in range(len(tasks))]}
    total = sum(out["share"])
    out["share"] = [x / total for x in out["share"]]
    for label in labels:
        out[label] = {
            "strength": [sum(r[label]["strength"][i] for r in rows) / len(rows) for i in range(len(tasks))],
            "gain": [sum(r[label]["gain"][i] for r in rows) / len(rows) for i in range(len(tasks))],
            "bands": [[sum(r[label]["bands"][i][b] for r in rows) / len(rows) for b in range(len(BANDS))]
                      for i in range(len(tasks))],
            **{key: sum(r[label][key] for r in rows) / len(rows) for key in ("norm", "effective_rank",
                                                                               "top_over_mean", "top1pct_energy")},
        }  # fmt: skip
    for key in [k for k in rows[0] if k.startswith("steps:")]:
        out[key] = {
            field: [sum(r[key][field][i] for r in rows) / len(rows) for i in range(len(tasks))]
            for field in ("share", "after_prune", "after_elect")
        }
    return out


def markdown(result: dict) -> str:
    """The summary tables of ``docs/drm_study.md``."""
    tasks, summary = result["tasks"], result["summary"]
    lines = ["| method (λ) | " + " | ".join(tasks) + " | min/max | ‖λΔ‖ | eff. rank | σ₁/mean σ |",
             "|---|" + "---:|" * (len(tasks) + 4)]  # fmt: skip
    for label, s in summary.items():
        if label == "share" or label.startswith("steps:"):
            continue
        lam = result["lambdas"].get(label, 1.0)
        st = s["strength"]
        lines.append(f"| {label} ({lam:g}) | " + " | ".join(f"{x:.2f}" for x in st)
                     + f" | {min(st) / max(st):.2f} | {s['norm']:.3f} | {s['effective_rank']:.0f} | "
                     f"{s['top_over_mean']:.1f} |")  # fmt: skip
    bands = ", ".join(f"{lo + 1}–{hi or 'end'}" for lo, hi in BANDS)
    lines += ["", f"Strength by band of each task's own singular directions ({bands}), and gain ⟨λΔ, Δ_i⟩/‖Δ_i‖²:", "",
              "| method (λ) | " + " | ".join(f"{t} bands / gain" for t in tasks) + " |",
              "|---|" + "---:|" * len(tasks)]  # fmt: skip
    for label, s in summary.items():
        if label == "share" or label.startswith("steps:"):
            continue
        cells = [" ".join(f"{x:.2f}" for x in b) + f" / {g:.2f}" for b, g in zip(s["bands"], s["gain"], strict=True)]
        lines.append(f"| {label} ({result['lambdas'].get(label, 1.0):g}) | " + " | ".join(cells) + " |")
    lines += ["", "| DRM-V variant | " + " | ".join(f"{t} kept (prune / elect)" for t in tasks) + " |",
              "|---|" + "---:|" * len(tasks)]  # fmt: skip
    for key, s in summary.items():
        if key.startswith("steps:"):
            cells = [f"{p:.2f} / {e:.2f}" for p, e in zip(s["after_prune"], s["after_elect"], strict=True)]
            lines.append(f"| {key[6:]} | " + " | ".join(cells) + " |")
    lines += ["", "energy share ‖Δ_i‖²/Σ‖Δ_j‖²: " + ", ".join(f"{t} {x:.3f}" for t, x in zip(tasks, summary["share"],
                                                                                           strict=True))]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task_vectors", type=Path, default=Path("runs/quickstart/task_vectors"),
                        help="A folder of task vector folders, one per task.")  # fmt: skip
    parser.add_argument("--drop_rate", type=float, default=0.8)
    parser.add_argument("--output", type=Path, default=Path("runs/drm_study/weights.json"))
    parser.add_argument("--limit", type=int, default=0, help="Only the first N matrices (a quick look).")
    parser.add_argument("--no_steps", action="store_true", help="Skip the DRM step ablation measures.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = sorted(p for p in args.task_vectors.iterdir() if (p / "meta.json").is_file())
    if not folders:
        raise SystemExit(f"--task_vectors {args.task_vectors}: no task vector folder (with meta.json) inside")
    torch.set_grad_enabled(False)
    result = analyse(folders, QUICKSTART_LAMBDA, args.drop_rate, args.limit, not args.no_steps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    args.output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
