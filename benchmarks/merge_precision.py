"""What a float32 merge would cost in accuracy: each SVD method in float32 against the library's float64 result.

Why: consumer GPUs run float64 at 1/32–1/64 of their float32 speed, so a float32 route would be the fast one there.
The contract (docs/methods.md) asks for 1e-3 relative Frobenius error against a float64 evaluation; this measures,
per method, two float32 routes on the same deltas:

- ``float32 svd``: the methods' authors' way, a float32 ``torch.linalg.svd`` of the matrix each paper names
  (``drm_lightning.merging.reference`` with ``dtype=float32``);
- ``float32 gram``: the library's own algorithm (Gram ``eigh``, column-norm singular values, polar factors from
  the Gram) with every float64 step done in float32 instead.

The reference is the library in float64 (it agrees with ``reference`` in float64 to ~1e-8 on the benchmark
shapes, ``merge_speed.py``'s error column). Inputs: real task vectors (``--task_vectors``: every 2-D parameter all of
them change, embeddings excluded as the default merge plan does) or random deltas of ``merge_speed.py``'s
Llama-3.1-8B layer shapes / ``--scale``.

Usage::

    python benchmarks/merge_precision.py --task_vectors runs/quickstart/task_vectors/*
    python benchmarks/merge_precision.py --scale 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_speed  # noqa: E402

from drm_lightning.merging import functional, reference  # noqa: E402
from drm_lightning.merging.methods import inputs, iso, tsv  # noqa: E402
from drm_lightning.merging.ops import elementwise  # noqa: E402

METHODS = ("drm-v", "drm-h", "iso-c", "iso-cts", "tsv-m")
ROUTES = ("float32 svd", "float32 gram")


@contextlib.contextmanager
def library_in(dtype: torch.dtype) -> Iterator[None]:
    """The library with its float64 working dtype replaced by ``dtype`` (what a float32 port of it would compute)."""
    modules = (elementwise, inputs, iso, tsv)  # every module whose float64 steps the SVD methods run
    saved = [module._F64 for module in modules]
    for module in modules:
        module._F64 = dtype
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module._F64 = value


def real_deltas(folders: Sequence[Path], limit: int | None) -> dict[str, list[Tensor]]:
    """Every 2-D delta that all task vectors hold (embeddings left out), as float32."""
    from safetensors import safe_open

    files = [folder / "task_vector.safetensors" for folder in folders]
    handles = [safe_open(str(f), "pt") for f in files]
    names = set(handles[0].keys())
    for handle in handles[1:]:
        names &= set(handle.keys())
    chosen = sorted(n for n in names if len(handles[0].get_slice(n).get_shape()) == 2 and "embeddings" not in n)
    return {n: [h.get_tensor(n).float() for h in handles] for n in chosen[:limit]}


def errors(deltas: dict[str, list[Tensor]], method: merge_speed.Method) -> dict[str, float]:
    """Relative Frobenius error over all matrices of each float32 route against the float64 library."""
    params = merge_speed.method_params(method)
    fn = getattr(functional, method.library_name)
    sums = dict.fromkeys(ROUTES, 0.0)
    ref_sq = 0.0
    for matrices in deltas.values():
        want = fn(matrices, **params, out_dtype=torch.float64)
        ref_sq += float(want.square().sum())
        routes = {"float32 svd": getattr(reference, method.library_name)(matrices, **params, dtype=torch.float32)}
        with library_in(torch.float32):
            routes["float32 gram"] = fn(matrices, **params, out_dtype=torch.float32)
        for route, got in routes.items():
            sums[route] += float((got.double() - want).square().sum())
    return {route: math.sqrt(total / ref_sq) if ref_sq > 0 else math.sqrt(total) for route, total in sums.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task_vectors", nargs="+", type=Path, default=None, help="task vector folders (real deltas)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many parameters of the task vectors")
    parser.add_argument("--scale", type=int, default=16, help="random deltas: Llama-3.1-8B layer shapes / this")
    parser.add_argument("--tasks", type=int, default=5, help="random deltas: T")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {' '.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.task_vectors:
        deltas = real_deltas(sorted(args.task_vectors), args.limit)
        source = f"{len(deltas)} matrices of {len(args.task_vectors)} task vectors"
    else:
        shapes = merge_speed.scaled_shapes(list(merge_speed.LLAMA31_8B_LAYER), args.scale)
        deltas = merge_speed.make_deltas(shapes, args.tasks, torch.float32, torch.device("cpu"), 0)
        source = f"random deltas, Llama-3.1-8B layer / {args.scale}, T = {args.tasks}"
    results = {key: errors(deltas, merge_speed.METHODS[key]) for key in args.methods}
    print(f"relative error vs the float64 library ({source}); the contract allows 1e-3")
    print("| method | " + " | ".join(ROUTES) + " |\n|---|" + "---:|" * len(ROUTES))
    for key, row in results.items():
        print(f"| {merge_speed.METHODS[key].name} | " + " | ".join(f"{row[r]:.1e}" for r in ROUTES) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps({"source": source, "errors": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
