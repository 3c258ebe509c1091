"""What a search over a method's own parameter costs, per Llama-3.1-8B decoder layer: one merge at one value, against
the same merge at several values in one call (``MergeMethod.merge_many``, what ``merge_task_vectors_many`` runs).

Why: DRM's joint decomposition (Gram matrix, ``eigh``, the projections onto the joint basis) does not depend on the
drop rate or on the switches, so a drop-rate search should cost little more than one merge; Iso-CTS's decomposition
of the summed delta serves every common fraction (its per-task residuals do depend on it). The issue's target: a
4-value DRM drop-rate sweep at most 1.5x one DRM merge on the same shapes. The sweep's results are compared with a
separate merge at each value (the largest relative Frobenius difference is printed).

Usage::

    python benchmarks/param_sweep.py                              # GPU if there is one, full shapes
    python benchmarks/param_sweep.py --device cpu --threads 1     # CPU: every dimension / 16 by default
    python benchmarks/param_sweep.py --methods drm_v --values 0.5 0.7 0.8 0.9 --layers q gate --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_speed  # noqa: E402  (shapes, deltas, timer, machine info; also puts drm_lightning on the path)

from drm_lightning.merging.methods.registry import get_method  # noqa: E402

#: The parameter each method's sweep varies, and its default values.
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "drm_v": ("drop_rate", (0.5, 0.7, 0.8, 0.9)),
    "drm_h": ("drop_rate", (0.5, 0.7, 0.8, 0.9)),
    "iso_cts": ("common_fraction", (0.6, 0.7, 0.8, 0.9)),
}


@dataclass
class SweepResult:
    """One method over the chosen matrices of a layer: median seconds per layer, one value vs the sweep."""

    method: str
    param: str
    values: list[float]
    one_merge_s: float
    sweep_s: float
    ratio: float
    max_difference: float
    """Largest relative Frobenius difference between a sweep output and the separate merge at its value."""


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().norm()
    diff = (a.double() - b.double()).norm()
    return float(diff / scale) if scale > 0 else float(diff)


def run_sweep(
    method_name: str,
    values: Sequence[float],
    deltas: dict[str, list[torch.Tensor]],
    timer: merge_speed.Timer,
    repeats: int,
) -> SweepResult:
    """Time one merge at the method's default value and the sweep over ``values``, per matrix, summed per layer."""
    method = get_method(method_name)
    param, _ = SWEEPS[method_name]
    sets = [{param: v} for v in values]
    default = {param: method.defaults[param]}
    one, sweep, difference = [], [], 0.0
    for ds in deltas.values():
        single = [method.merge_matrix(ds, **{param: v}) for v in values]  # warm-up and the comparison
        for out, ref in zip(method.merge_many("matrix", ds, sets), single, strict=True):
            difference = max(difference, _relative(out, ref))
        one.append([timer(lambda ds=ds: method.merge_matrix(ds, **default)) for _ in range(repeats)])
        sweep.append([timer(lambda ds=ds: method.merge_many("matrix", ds, sets)) for _ in range(repeats)])
    one_s = statistics.median(sum(r[i] for r in one) for i in range(repeats))
    sweep_s = statistics.median(sum(r[i] for r in sweep) for i in range(repeats))
    return SweepResult(method_name, param, list(values), one_s, sweep_s, sweep_s / one_s, difference)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--scale", type=int, default=None, help="divide every dimension (default: 1 GPU, 16 CPU)")
    parser.add_argument("--tasks", type=int, default=5, help="number of task deltas T (default 5)")
    parser.add_argument("--methods", nargs="+", default=list(SWEEPS), help=f"any of {' '.join(SWEEPS)}")
    parser.add_argument("--values", nargs="+", type=float, default=None, help="the swept values (default per method)")
    parser.add_argument("--layers", nargs="+", default=list(merge_speed.LLAMA31_8B_LAYER), help="matrices to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per matrix after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--clock", default="wall", help="wall, or process (CPU time; --device cpu only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in SWEEPS]
    if unknown:
        parser.error(f"--methods: {unknown} not among {list(SWEEPS)}")
    bad = [name for name in args.layers if name not in merge_speed.LLAMA31_8B_LAYER]
    if bad:
        parser.error(f"--layers: {bad} not among {list(merge_speed.LLAMA31_8B_LAYER)}")
    if args.repeats < 1 or args.tasks < 1:
        parser.error("--repeats and --tasks must be positive")
    if args.clock not in merge_speed.CLOCKS:
        parser.error(f"--clock: expected one of {list(merge_speed.CLOCKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[SweepResult]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = args.scale if args.scale is not None else (1 if device.type == "cuda" else merge_speed.CPU_DEFAULT_SCALE)
    shapes = merge_speed.scaled_shapes(args.layers, scale)
    deltas = merge_speed.make_deltas(shapes, args.tasks, torch.float32, device, args.seed)
    timer = merge_speed.Timer(device, args.clock)
    results = []
    for method in args.methods:
        values = args.values or SWEEPS[method][1]
        results.append(run_sweep(method, values, deltas, timer, args.repeats))
    info = merge_speed.machine_info(device)
    print(f"# {info}\n# shapes /{scale}: {shapes}, T = {args.tasks}, {args.clock} clock, median of {args.repeats}")
    print("| method | swept | one merge s/layer | sweep s/layer | sweep ÷ one | max rel. diff. |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        swept = f"{r.param} {', '.join(f'{v:g}' for v in r.values)}"
        print(
            f"| {r.method} | {swept} | {r.one_merge_s:.3f} | {r.sweep_s:.3f} | {r.ratio:.2f} | {r.max_difference:.1e} |"
        )
    if args.json is not None:
        payload = {"machine": info, "shapes": shapes, "tasks": args.tasks, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
