"""Accuracy of DRM's ablations and variants on the demo tasks: λ searched on validation, then test.

The ground truth for ``benchmarks/drm_study.py``'s weight measures. Each variant is a rule for the matrices the
default merge plan selects plus a rule for every other parameter (biases, norms, embeddings):

* ``elect`` — elect and merge the raw deltas (what DRM, and on main before issue 11 every SVD method, uses there),
* ``mean`` — the plain mean (Iso-C, Iso-CTS, TSV-M by their authors), ``sum`` — Task Arithmetic.

The merged deltas are computed once per variant (float64 functional code, as ``drm-lightning merge``), kept in
``<output dir>/deltas/<variant>.safetensors``, and the merged backbone ``W_0 + λ·Δ`` is evaluated in memory under
each task's head with the project's own ``evaluate_backbone`` (the code path of the pipeline's λ search). λ is
chosen by the average normalised validation accuracy (the experts' validation accuracy from the same run), then
the test split is evaluated at that λ. A run that finds its variant in the output JSON reuses it.

    python benchmarks/drm_study_eval.py --recipe recipes/quickstart.yaml --variants drm_v,drm_v+iso \
        --lambdas 0.5,1,1.5,2,3 --output runs/drm_study/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drm_study import drm_steps  # noqa: E402

from drm_lightning.merging import functional as F  # noqa: E402
from drm_lightning.merging.methods.drm_iso import drm_iso  # noqa: E402

F64 = torch.float64
Rule = Callable[[list[Tensor]], Tensor]

ELEMENTWISE: dict[str, Rule] = {
    "elect": lambda d: F.elect_and_merge(d),
    "mean": lambda d: F.task_arithmetic(d) / len(d),
    "sum": lambda d: F.task_arithmetic(d),
}


def _drm(**kw: object) -> Rule:
    return lambda d: drm_steps(d, **kw)["merged"]  # type: ignore[arg-type]


#: variant -> (matrix rule, elementwise rule name). Names: method, then _p<drop rate>, then switches, +iso = flattened.
VARIANTS: dict[str, tuple[Rule, str]] = {
    "task_arithmetic": (lambda d: F.task_arithmetic(d), "sum"),
    "ties": (lambda d: F.ties(d, density=0.2), "sum"),
    "drm_v": (_drm(drop_rate=0.8), "elect"),
    "drm_h": (_drm(direction="horizontal", drop_rate=0.8), "elect"),
    "drm_v_p0": (_drm(drop_rate=0.0), "elect"),
    "drm_v_p0.5": (_drm(drop_rate=0.5), "elect"),
    "drm_v_p0.9": (_drm(drop_rate=0.9), "elect"),
    "drm_v_norenorm": (_drm(drop_rate=0.8, renorm=False), "elect"),
    "drm_v_noelect": (_drm(drop_rate=0.8, elect=False), "elect"),
    "drm_v_plainmean": (_drm(drop_rate=0.8, disjoint=False), "elect"),
    "drm_iso_v": (lambda d: drm_iso(d, "vertical", 0.8), "mean"),
    "drm_iso_v_elect": (lambda d: drm_iso(d, "vertical", 0.8), "elect"),
    "drm_iso_v_p0": (lambda d: drm_iso(d, "vertical", 0.0), "mean"),
    "drm_iso_h": (lambda d: drm_iso(d, "horizontal", 0.8), "mean"),
    "iso_c": (lambda d: F.iso_c(d), "elect"),
    "iso_c_mean": (lambda d: F.iso_c(d), "mean"),
    "iso_cts": (lambda d: F.iso_cts(d, common_fraction=0.8), "elect"),
    "tsv_m": (lambda d: F.tsv_m(d), "elect"),
    "drm_v_mean": (_drm(drop_rate=0.8), "mean"),
}


def merged_delta(folders: Sequence[Path], variant: str) -> dict[str, Tensor]:
    """The variant's Δ_merged for every parameter the task vectors change (default merge plan, float32 out)."""
    from drm_lightning.merging.engine.plan import MergePlan
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.models.backbone import load_recorded_base

    matrix, elementwise = VARIANTS[variant][0], ELEMENTWISE[VARIANTS[variant][1]]
    readers = [TaskVectorReader(f) for f in folders]
    shapes = {k: tuple(v.shape) for k, v in load_recorded_base(readers[0].meta).state_dict().items()}
    present = set().union(*(r.names() for r in readers))
    out = {}
    for entry in MergePlan().entries(shapes, True, present=present):
        if entry.rule == "skip":
            continue
        raw = [r.get(entry.name, entry.shape) for r in readers]
        deltas = [torch.zeros(entry.shape, dtype=F64) if d is None else d.to(F64) for d in raw]
        rule = matrix if entry.rule == "matrix" else elementwise
        out[entry.name] = rule(deltas).to(torch.float32).contiguous()
    return out


class Evaluator:
    """One base backbone in memory, set to ``W_0 + λ·Δ`` and evaluated under every task's head."""

    def __init__(self, recipe: str) -> None:
        from drm_lightning.commands.pipeline import eval_trainer_kwargs
        from drm_lightning.commands.pipeline_folder import RunFolder
        from drm_lightning.commands.pipeline_recipe import build_pipeline_parser, load_recipe
        from drm_lightning.io.task_vector import read_meta
        from drm_lightning.models.backbone import load_recorded_base

        pipeline = RunFolder(load_recipe(build_pipeline_parser().parse_args(["--config", recipe])))
        self.datamodules = pipeline.datamodules
        self.folders = [pipeline.task_vector_dir(t) for t in pipeline.tasks]
        self.trainer_kwargs = eval_trainer_kwargs(pipeline.recipe)
        self.model = load_recorded_base(read_meta(self.folders[0]))
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def set(self, delta: dict[str, Tensor], lam: float) -> None:
        state = self.model.state_dict()
        for name, value in self.base.items():
            state[name].copy_(value)
        for name, value in delta.items():
            state[name].add_(value.to(state[name].dtype), alpha=lam)

    def run(self, split: str, delta: dict[str, Tensor] | None = None, lam: float = 0.0) -> dict[str, float]:
        """Accuracy per task on ``split``; ``delta=None``: the experts themselves."""
        from drm_lightning.evaluation.multitask import evaluate_backbone

        if delta is None:
            metrics = evaluate_backbone(None, self.folders, self.datamodules, split, self.trainer_kwargs, True)
        else:
            self.set(delta, lam)
            metrics = evaluate_backbone(self.model, self.folders, self.datamodules, split, self.trainer_kwargs)
        return {task: m["accuracy"] for task, m in metrics.items()}


def normalised(acc: dict[str, float], expert: dict[str, float]) -> float:
    return sum(acc[t] / expert[t] for t in expert) / len(expert)


def study(evaluator: Evaluator, variant: str, lambdas: Sequence[float], results: dict, cache: Path) -> dict:
    """λ curve on validation, then test at the best λ (ties to the smaller λ); reuses earlier points."""
    path = cache / f"{variant}.safetensors"
    t0 = time.perf_counter()
    if path.is_file():
        delta = load_file(str(path))
    else:
        delta = merged_delta(evaluator.folders, variant)
        cache.mkdir(parents=True, exist_ok=True)
        save_file(delta, str(path))
    entry = results.setdefault("variants", {}).setdefault(variant, {"curve": {}})
    entry["elementwise"] = VARIANTS[variant][1]
    entry["merge_seconds"] = entry.get("merge_seconds", time.perf_counter() - t0)
    expert = results["experts"]["validation"]
    for lam in lambdas:
        key = f"{lam:g}"
        if key not in entry["curve"]:
            acc = evaluator.run("validation", delta, lam)
            entry["curve"][key] = {"accuracy": acc, "score": normalised(acc, expert)}
            print(f"{variant} λ={key}: {entry['curve'][key]['score']:.4f} {acc}", flush=True)
    best = max(sorted(entry["curve"], key=float), key=lambda k: entry["curve"][k]["score"])
    if entry.get("test", {}).get("lam") != best:
        acc = evaluator.run("test", delta, float(best))
        entry["test"] = {"lam": best, "accuracy": acc, "score": normalised(acc, results["experts"]["test"])}
    print(f"{variant}: best λ {best}, test merged/expert {100 * entry['test']['score']:.1f} {entry['test']}")
    return entry


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="Its run_dir holds the task vectors.")
    parser.add_argument("--variants", default="drm_v", help=f"Comma-separated, from {sorted(VARIANTS)}.")
    parser.add_argument("--lambdas", default="0.5,1,1.5,2,3", help="Comma-separated λ grid (validation).")
    parser.add_argument("--output", type=Path, default=Path("runs/drm_study/eval.json"))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    lambdas = [float(x) for x in args.lambdas.split(",")]
    torch.set_grad_enabled(False)
    from drm_lightning.verbosity import quiet_third_party

    quiet_third_party(False)
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}
    evaluator = Evaluator(args.recipe)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if "experts" not in results:
        results["experts"] = {split: evaluator.run(split) for split in ("validation", "test")}
        args.output.write_text(json.dumps(results, indent=1) + "\n")
        print(f"experts: {results['experts']}", flush=True)
    for variant in variants:
        study(evaluator, variant, lambdas, results, args.output.parent / "deltas")
        args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
