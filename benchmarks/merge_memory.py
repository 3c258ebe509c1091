"""Working memory of one parameter's merge, as a multiple of its T float32 input deltas, per method and shape.

Why a multiple: a merge holds one parameter's T deltas at a time, so what decides whether the largest parameter of a
model fits the merge device is how much *more* than those inputs the method needs. The number printed is

    (peak memory during the call − memory with the inputs already resident) ÷ (T · numel · 4 bytes)

so the inputs themselves are not counted, and the output (1/T of the inputs in float32) is. On CPU each
measurement runs in a fresh interpreter (``--child``), which builds the deltas, calls the method once on them
(warm-up), hands freed heap back (``malloc_trim``), resets the peak RSS (``/proc/self/clear_refs``) and reads
``VmHWM`` during a second call. Why the warm-up: a merge calls the method on parameter after parameter, and what
the first call leaves behind for good (lazy imports, the BLAS/LAPACK libraries' buffer pools, about 8 MiB with MKL
on a 512-sided ``eigh``) is paid once per process, not per parameter; the number is the per-parameter cost.

The children run with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc then maps every block of 1 MiB or more on its own
and unmaps it when freed, so the peak RSS is the peak of what the method holds. With glibc's default (a threshold
that rises to the size of the last freed block) freed parameter-sized blocks stay in the heap and are reused only
when a later request fits, so the same method's peak RSS moves by 0.5–2× of the inputs from run to run
(``--malloc-default`` measures that way). On CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation with
the inputs on the device (exact).

Shapes are the large parameters of Llama-3.1-8B divided by ``--scale`` (default 8 on CPU, 1 on CUDA): ``q``
4096×4096, ``down`` 4096×14336, ``gate`` 14336×4096, and ``embed`` 128256×4096, which the default merge plan
excludes from the matrix rule, so every method merges it elementwise (as the merger would).

Usage::

    python benchmarks/merge_memory.py                                  # every method and shape, GPU if there is one
    python benchmarks/merge_memory.py --device cpu --methods ties drm_v --shapes down embed --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LLAMA31_8B: dict[str, tuple[tuple[int, int], str]] = {
    "q": ((4096, 4096), "matrix"),
    "down": ((4096, 14336), "matrix"),
    "gate": ((14336, 4096), "matrix"),
    "embed": ((128256, 4096), "elementwise"),
}
"""Shape and merge-plan rule of the parameters measured (``embed_tokens`` is excluded from the matrix rule)."""

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare": ("dare", {}),
    "dare_ties": ("dare", {"merge": "ties"}),
    "drm_v": ("drm_v", {}),
    "drm_h": ("drm_h", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "tsv_m": ("tsv_m", {}),
    "wudi_closed": ("wudi_closed", {}),
    "wudi": ("wudi", {"steps": 3}),  # the memory of Adam's state does not grow with the steps; the time does
}
"""Benchmark name -> (registry method, parameters beyond its defaults)."""

CPU_DEFAULT_SCALE = 8
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = 1 << 20
"""glibc: blocks of 1 MiB and more always get their own mapping, returned to the OS when freed (see the docstring)."""


def scaled(shape: tuple[int, int], scale: int) -> tuple[int, int]:
    return (max(1, shape[0] // scale), max(1, shape[1] // scale))


def _release_heap() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def measure_in_process(
    variant: str, shape: tuple[int, int], rule: str, tasks: int, device: str, seed: int = 0, warmup: bool = True
) -> dict[str, Any]:
    """One measurement in this process: peak growth above the resident inputs, in bytes and ÷ input bytes
    (``warmup=False``: without the warm-up call, for a time-boxed CUDA run where one-time workspaces are small beside
    full-size inputs)."""
    import torch

    from drm_lightning.merging.methods.registry import get_method

    name, extra = VARIANTS[variant]
    method = get_method(name)
    merge = method.merge_matrix if rule == "matrix" else method.merge_elementwise
    dev = torch.device(device)
    generator = torch.Generator(device=dev).manual_seed(seed)
    deltas = [1e-3 * torch.randn(shape, generator=generator, device=dev) for _ in range(tasks)]
    if warmup:
        merge(deltas, out_dtype=torch.float32, **extra)  # warm-up: lazy imports, the BLAS/LAPACK buffer pools
    input_bytes = tasks * shape[0] * shape[1] * 4
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = merge(deltas, out_dtype=torch.float32, **extra)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        _release_heap()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        base = _kib("VmRSS") * 1024
        out = merge(deltas, out_dtype=torch.float32, **extra)
        peak = _kib("VmHWM") * 1024 - base
    assert tuple(out.shape) == shape
    return {
        "method": variant,
        "shape": list(shape),
        "rule": rule,
        "tasks": tasks,
        "device": str(dev),
        "input_bytes": input_bytes,
        "peak_bytes": int(peak),
        "ratio": peak / input_bytes,
        "warmup": warmup,
    }


def measure_fresh(
    variant: str,
    shape: tuple[int, int],
    rule: str,
    tasks: int,
    device: str,
    threads: int | None = None,
    fixed_mmap_threshold: bool = True,
    warmup: bool = True,
) -> dict[str, Any]:
    """``measure_in_process`` in a fresh interpreter (nothing an earlier measurement allocated is reused)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, f"{shape[0]}x{shape[1]}", rule]
    cmd += ["--tasks", str(tasks), "--device", device]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if not warmup:
        cmd.append("--no-warmup")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    if fixed_mmap_threshold:
        env[MMAP_ENV] = str(MMAP_THRESHOLD)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: Sequence[dict[str, Any]], shapes: dict[str, tuple[tuple[int, int], str]]) -> str:
    """Methods down, shapes across; each cell peak ÷ input bytes."""
    by = {(r["method"], tuple(r["shape"])): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = [f"{n} {s[0]}×{s[1]}" + (" (elementwise)" if rule != "matrix" else "") for n, (s, rule) in shapes.items()]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for m in methods:
        cells = []
        for shape, _ in shapes.values():
            r = by.get((m, shape))
            cells.append(f"{r['ratio']:.2f}×" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--scale", type=int, default=None, help=f"divide dimensions by this (default 1 cuda, {CPU_DEFAULT_SCALE} cpu)"
    )
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), help=f"any of {' '.join(VARIANTS)}")
    parser.add_argument("--shapes", nargs="+", default=list(LLAMA31_8B), help=f"any of {' '.join(LLAMA31_8B)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each measurement")
    parser.add_argument(
        "--in-process", action="store_true", help="measure everything in this one process (faster; for tests)"
    )
    parser.add_argument(
        "--malloc-default", action="store_true", help=f"children keep glibc's dynamic {MMAP_ENV} (noisier)"
    )
    parser.add_argument("--no-warmup", action="store_true", help="measure the first call (time-boxed GPU runs)")
    parser.add_argument(
        "--keep-going", action="store_true", help="a failed measurement is reported (exit status 1), the next runs"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write every measurement here (rewritten after each one)"
    )
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "NxM", "RULE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if args.child:
        variant, dims, rule = args.child
        n, m = (int(x) for x in dims.split("x"))
        print(json.dumps(measure_in_process(variant, (n, m), rule, args.tasks, device, warmup=not args.no_warmup)))
        return []
    unknown = sorted(set(args.methods) - set(VARIANTS)) + sorted(set(args.shapes) - set(LLAMA31_8B))
    if unknown:
        raise SystemExit(f"unknown method or shape {unknown}; methods: {list(VARIANTS)}, shapes: {list(LLAMA31_8B)}")
    scale = args.scale or (1 if device.startswith("cuda") else CPU_DEFAULT_SCALE)
    shapes = {k: (scaled(LLAMA31_8B[k][0], scale), LLAMA31_8B[k][1]) for k in args.shapes}
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for variant in args.methods:
        for shape, rule in shapes.values():
            try:
                if device.startswith("cuda") or args.in_process:
                    row = measure_in_process(variant, shape, rule, args.tasks, device, warmup=not args.no_warmup)
                else:
                    row = measure_fresh(
                        variant,
                        shape,
                        rule,
                        args.tasks,
                        device,
                        args.threads,
                        fixed_mmap_threshold=not args.malloc_default,
                        warmup=not args.no_warmup,
                    )
            except Exception as err:
                if not args.keep_going:
                    raise
                traceback.print_exc()
                errors.append({"method": variant, "shape": list(shape), "error": f"{type(err).__name__}: {err}"})
                print(f"{variant:16s} {shape[0]}x{shape[1]:<6d} FAILED: {errors[-1]['error']}", file=sys.stderr)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()  # an out-of-memory measurement leaves the next one its memory
                write_json(args.json, scale, args.tasks, rows, errors)
                continue
            rows.append(row)
            write_json(args.json, scale, args.tasks, rows, errors)  # a run stopped by a time limit keeps its rows
            print(f"{variant:16s} {shape[0]}x{shape[1]:<6d} {rule:11s} {row['ratio']:6.2f}x", file=sys.stderr)
    print(f"T = {args.tasks}, {device}, Llama-3.1-8B shapes / {scale}: peak working memory ÷ input bytes")
    print(format_table(rows, shapes))
    write_json(args.json, scale, args.tasks, rows, errors)
    if errors:
        raise SystemExit(f"{len(errors)} measurement(s) failed: " + "; ".join(e["error"] for e in errors))
    return rows


def write_json(
    path: Path | None, scale: int, tasks: int, rows: list[dict[str, Any]], errors: list[dict[str, Any]]
) -> None:
    """Every measurement so far (and every failed one) as JSON at ``path`` (None: nowhere), replaced whole."""
    if path is None:
        return
    partial = path.with_name(path.name + ".tmp")
    data = {"scale": scale, "tasks": tasks, "rows": rows, "errors": errors}
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    main()
