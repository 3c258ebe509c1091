"""``drm-lightning merge`` against ``mergekit-yaml`` end to end: the same experts, the same mergekit YAML, one machine.

::

    python benchmarks/vs_mergekit.py                          # SmolLM2-135M shapes, 4 experts, every method, 3 runs
    python benchmarks/vs_mergekit.py --sizes llama-30m smollm2-135m --experts 2 4 8 --methods task_arithmetic ties
    python benchmarks/vs_mergekit.py --quick                  # a tiny Llama, 2 experts, 1 run: the suite's check
    python benchmarks/vs_mergekit.py --quick --methods ...    # the tiny Llama with other methods
    python benchmarks/vs_mergekit.py --cuda                   # both tools' math on the GPU (--cuda / --device cuda)
    python benchmarks/vs_mergekit.py --folders                # also our merge given the expert folders themselves

What it builds, offline: a Llama of a stated size from its config (``--sizes``: ``smollm2-135m`` has SmolLM2-135M's
shapes, tied embeddings and 134.5 M parameters; ``llama-30m`` a narrower, shallower one; weights seeded, float32),
and T experts ``W_0 + Δ_t`` with seeded low-rank-plus-noise deltas (rank 8 plus 10 % noise on every matrix, noise
on every vector), saved as ``save_pretrained`` folders. mergekit merges those folders; this project merges task
vectors made from them once by ``drm-lightning extract`` (timed apart, as the one-time conversion it is).
``--folders`` adds a third tool: ``drm-lightning merge`` given the same ``save_pretrained`` folders mergekit reads,
converted inside the merge (the end-to-end wall of a user who holds model folders; at a fixed λ each delta is taken
by reference as the merge reads it, docs/interop.md). It is timed twice: with the base's skeleton already in the
cache (``interop/skeleton_cache.py``; a folder of the benchmark's own, filled by one untimed merge first: every merge
of a base after its first) and with an empty cache each run (the first merge of a base on a machine).

mergekit lives in its own virtual environment, never in this project's: ``--mergekit_venv`` (default
``$MERGEKIT_VENV`` or ``/work/mkvenv``) is used when it holds ``bin/mergekit-yaml``; ``--install`` makes it
(``python -m venv``, then ``pip install torch==2.13.0`` first, so pip takes the CPU wheel the machine offers, then
``pip install mergekit==0.1.5``). Without mergekit the script says so and times this project alone.

Each method is one mergekit YAML (``merge_method``, ``base_model``, ``models`` with ``weight``/``density``,
``parameters``, ``dtype: float32``). mergekit runs it as written; ``drm-lightning merge --mergekit_config`` runs
the same YAML with each expert's folder replaced by its task vector folder (docs/interop.md maps the keys; DRM,
Iso-C, Iso-CTS and TSV-M, which mergekit lacks, are the same YAML with this project's ``merge_method``; their
wall time is given as a ratio to this project's Task Arithmetic on the same experts). The two tools run
interleaved (run r of every method and tool before run r + 1), each under ``/usr/bin/time -v`` for its wall time and
peak resident memory (a psutil sampler where that is missing); the median over ``--runs`` is printed with the load
average seen. The relative difference of the two outputs is ``‖Δ_ours − Δ_mergekit‖ / ‖Δ_mergekit‖`` over every
merged tensor, Δ the output minus the base (DARE's drops are random in both tools: its difference is that of two
draws, not an error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Llama configs by name: (config fields, what the name stands for).
SIZES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {  # SmolLM2-135M's shapes: 134.5 M parameters, tied embeddings
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64,
    },
    "llama-30m": {  # the same family at a quarter of the depth and two thirds of the width
        "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 6,
        "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64,
    },
    "tiny": {  # --quick
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True, "head_dim": 16,
    },
}  # fmt: skip

#: method -> (mergekit YAML's merge_method, per-model parameters, top-level parameters, in mergekit).
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any], bool]] = {
    "task_arithmetic": ("task_arithmetic", {"weight": 1.0}, {}, True),
    "ties": ("ties", {"weight": 1.0, "density": 0.2}, {}, True),
    "dare_linear": ("dare_linear", {"weight": 1.0, "density": 0.2}, {}, True),
    "dare_ties": ("dare_ties", {"weight": 1.0, "density": 0.2}, {}, True),
    "linear": ("linear", {"weight": 1.0}, {}, True),
    "model_stock": ("model_stock", {"weight": 1.0}, {}, True),
    "drm_v": ("drm_v", {}, {}, False),
    "iso_c": ("iso_c", {}, {}, False),
    "iso_cts": ("iso_cts", {}, {}, False),
    "tsv_m": ("tsv_m", {}, {}, False),
}
RANK, NOISE, SCALE = 8, 0.1, 2e-3


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ experts


def build_inputs(work: Path, size: str, experts: int, seed: int = 0) -> dict[str, Any]:
    """The base and ``experts`` expert folders of ``size`` under ``work/size`` (reused when already there), and a
    task vector folder per expert (``drm-lightning extract``, timed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = work / size
    base = root / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(seed)
        config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, torch_dtype="float32")
        LlamaForCausalLM(config).save_pretrained(base)
    state = None
    folders, tvs, extract_s = [], [], []
    for t in range(experts):
        folder, tv = root / f"expert{t}", root / f"tv{t}"
        folders.append(folder)
        tvs.append(tv)
        if not (folder / "config.json").is_file():
            if state is None:
                state = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
            gen = torch.Generator().manual_seed(seed + 1000 + t)
            model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
            with torch.no_grad():
                for name, weight in model.state_dict().items():
                    weight.add_(_delta(state[name], gen))
            model.save_pretrained(folder)
            del model
        if not (tv / "meta.json").is_file():
            t0 = time.perf_counter()
            command = [sys.executable, "-m", "drm_lightning.cli", "extract", "--model", str(folder), "--base",
                       str(base), "--output", str(tv), "--task", f"task{t}"]  # fmt: skip
            subprocess.run(command, check=True, env=_env(), capture_output=True)
            extract_s.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in _safetensors(base).values())
    return {"base": base, "experts": folders, "task_vectors": tvs, "extract_s": extract_s, "params": params}


def _delta(weight: Any, gen: Any) -> Any:
    """A seeded low-rank-plus-noise delta of ``weight``'s shape, ``SCALE`` times the weight's RMS."""
    import torch

    rms = float(weight.float().pow(2).mean().sqrt()) or 1.0
    if weight.ndim == 2:
        n, m = weight.shape
        low = torch.randn(n, RANK, generator=gen) @ torch.randn(RANK, m, generator=gen) / math.sqrt(RANK)
        delta = low + NOISE * torch.randn(n, m, generator=gen)
    else:
        delta = torch.randn(weight.shape, generator=gen)
    return (SCALE * rms * delta).to(weight.dtype)


def _safetensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


# ------------------------------------------------------------------------------------------------ configs


def mergekit_yaml(method: str, base: Path, models: list[Path], dtype: str = "float32") -> str:
    """The mergekit YAML of ``method`` over ``models`` (mergekit's schema; our methods under their own names)."""
    import yaml

    merge_method, per_model, top, _ = METHODS[method]
    config: dict[str, Any] = {
        "merge_method": merge_method,
        "base_model": str(base),
        "models": [{"model": str(m), **({"parameters": dict(per_model)} if per_model else {})} for m in models],
        "dtype": dtype,
    }
    if merge_method == "linear":  # the mean of the experts: mergekit would average a base_model in with a weight
        del config["base_model"]
    if top:
        config["parameters"] = dict(top)
    return yaml.safe_dump(config, sort_keys=False)


# ------------------------------------------------------------------------------------------------ running


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def timed(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``command``; its wall seconds and peak RSS (MiB), from ``/usr/bin/time -v`` or a psutil sampler."""
    if Path("/usr/bin/time").exists():
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])}... failed:\n{done.stderr[-3000:]}")
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        return {"wall_s": wall, "rss_mib": int(rss.group(1)) / 1024 if rss else float("nan")}
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}... failed:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return {"wall_s": wall, "rss_mib": peak / 2**20}


def find_mergekit(venv: Path, install: bool) -> Path | None:
    """``venv/bin/mergekit-yaml``, made first with ``install``; ``None`` when there is none."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe
    if not install:
        return None
    _log(f"installing mergekit 0.1.5 into {venv} (its own virtual environment)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: the CPU wheel where the machine offers one
    subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return exe if exe.is_file() else None


def rel_diff(ours: Path, theirs: Path, base: Path) -> float:
    """``‖Δ_ours − Δ_theirs‖ / ‖Δ_theirs‖`` over the tensors both folders hold (Δ = output − base, float64)."""
    a, b, w = _safetensors(ours), _safetensors(theirs), _safetensors(base)
    num = den = 0.0
    for name in sorted(set(a) & set(b) & set(w)):
        da = a[name].double() - w[name].double()
        db = b[name].double() - w[name].double()
        num += float((da - db).pow(2).sum())
        den += float(db.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vs_mergekit-"))
    mergekit = None if args.no_mergekit else find_mergekit(Path(args.mergekit_venv), args.install)
    if mergekit is None and not args.no_mergekit:
        _log(f"mergekit not found in {args.mergekit_venv} (--install makes it): timing drm-lightning alone")
    device = ["--device", "cuda"] if args.cuda else ["--device", "cpu"]
    results: dict[str, Any] = {"machine": machine(args), "rows": [], "extract_s": [], "load_start": os.getloadavg()}
    for size in args.sizes:
        for experts in args.experts:
            inputs = build_inputs(work, size, experts)
            results["extract_s"] += inputs["extract_s"]
            case = work / size / f"T{experts}"
            case.mkdir(parents=True, exist_ok=True)
            rows = {m: {"size": size, "params": inputs["params"], "experts": experts, "method": m, "ours": [],
                        "mergekit": [], "folders": [], "folders_first": [], "load": []}
                    for m in args.methods}  # fmt: skip
            warm = {**_env(), "DRM_LIGHTNING_CACHE": str(work / "skeleton-cache")}
            for r in range(args.runs):
                for i, method in enumerate(args.methods):
                    mk_cfg, our_cfg = case / f"{method}.mergekit.yml", case / f"{method}.ours.yml"
                    mk_cfg.write_text(mergekit_yaml(method, inputs["base"], inputs["experts"]))
                    our_cfg.write_text(mergekit_yaml(method, inputs["base"], inputs["task_vectors"]))
                    tools = []  # (tool, command, environment)
                    if mergekit is not None and METHODS[method][3]:
                        mk_command = [str(mergekit), str(mk_cfg), str(case / f"{method}.mergekit")]
                        tools.append(("mergekit", [*mk_command, *(["--cuda"] if args.cuda else [])], _env()))
                    ours = [sys.executable, "-m", "drm_lightning.cli", "merge", "--mergekit_config", str(our_cfg),
                            "--output", str(case / f"{method}.ours"), *device]  # fmt: skip
                    tools.append(("ours", ours, _env()))
                    if args.folders:  # the same YAML over the model folders: conversion inside the merge
                        folder_cfg = case / f"{method}.folders.yml"
                        folder_cfg.write_text(mergekit_yaml(method, inputs["base"], inputs["experts"]))
                        folder = [*ours[:5], str(folder_cfg), "--output", str(case / f"{method}.folders"), *device]
                        if r == 0 and i == 0:  # untimed: the base's skeleton into the warm cache
                            subprocess.run(folder, env=warm, capture_output=True, check=True)
                        cold = {**_env(), "DRM_LIGHTNING_CACHE": tempfile.mkdtemp(dir=case, prefix="cold-cache-")}
                        tools += [("folders", folder, warm), ("folders_first", folder, cold)]
                    if (r + i) % 2:  # interleaved: each tool goes first in every other slot
                        tools.reverse()
                    for tool, command, env in tools:
                        out = Path(command[2] if tool == "mergekit" else command[command.index("--output") + 1])
                        shutil.rmtree(out, ignore_errors=True)
                        rows[method]["load"].append(os.getloadavg()[0])
                        got = timed(command, env)
                        rows[method][tool].append(got)
                        _log(f"{size} T={experts} {method:16s} {tool:8s} run {r + 1}: {got['wall_s']:.1f} s, "
                             f"{got['rss_mib']:.0f} MiB peak (load {rows[method]['load'][-1]:.1f})")  # fmt: skip
            for method, row in rows.items():
                ours_out, mk_out = case / f"{method}.ours", case / f"{method}.mergekit"
                row["rel_diff"] = rel_diff(ours_out, mk_out, inputs["base"]) if mk_out.is_dir() else None
                results["rows"].append(row)
            if not args.keep:
                for path in case.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    results["load_end"] = os.getloadavg()
    return results


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if args.cuda else None,
        "torch": torch.__version__, "python": platform.python_version(), "runs": args.runs,
        "command": " ".join(["python", "benchmarks/vs_mergekit.py", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
    }  # fmt: skip


def _loads(loads: Any) -> str:
    return "/".join(f"{x:.1f}" for x in loads) if loads else "?"


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs) if runs else float("nan")


def table(results: dict[str, Any]) -> str:
    """The markdown table: medians per (size, T, method); our-only methods as ratios to our Task Arithmetic."""
    m = results["machine"]
    folders = any(r.get("folders") for r in results["rows"])
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}; torch {m['torch']}, "
        f"Python {m['python']}; commit {m['commit']}; median of {m['runs']} interleaved run(s).",
        f"Command: `{m.get('command', '?')}`; load average (1/5/15 min) at the start "
        f"{_loads(results.get('load_start'))}, at the end {_loads(results.get('load_end'))}.",
        "",
        "| model | T | method | mergekit wall s | ours wall s | ours ÷ mergekit | mergekit peak MiB | ours peak MiB "
        "| rel. diff Δ | load avg |"
        + (
            " ours from folders wall s | from folders ÷ mergekit | from folders peak MiB | from folders, first merge "
            "of the base, wall s |"
            if folders
            else ""
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if folders else ""),
    ]
    ta = {(r["size"], r["experts"]): r for r in results["rows"] if r["method"] == "task_arithmetic"}
    for r in results["rows"]:
        ours_w, mk_w = _median(r["ours"], "wall_s"), _median(r["mergekit"], "wall_s")
        ours_m, mk_m = _median(r["ours"], "rss_mib"), _median(r["mergekit"], "rss_mib")
        if r["mergekit"]:
            ratio = f"{ours_w / mk_w:.2f}"
        else:
            ref = ta.get((r["size"], r["experts"]))
            ratio = f"{ours_w / _median(ref['ours'], 'wall_s'):.2f}× our TA" if ref else "-"
        diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        mk_w_s = f"{mk_w:.1f}" if r["mergekit"] else "-"
        mk_m_s = f"{mk_m:.0f}" if r["mergekit"] else "-"
        load = f"{min(r['load']):.1f}–{max(r['load']):.1f}"
        size = f"{r['size']} ({r['params'] / 1e6:.1f} M)"
        line = (f"| {size} | {r['experts']} | {r['method']} | {mk_w_s} | {ours_w:.1f} | {ratio} | {mk_m_s} | "
                f"{ours_m:.0f} | {diff} | {load} |")  # fmt: skip
        if folders:
            fo_w = _median(r.get("folders", []), "wall_s")
            fo_ratio = f"{fo_w / mk_w:.2f}" if r["mergekit"] and r.get("folders") else "-"
            line += f" {fo_w:.1f} | {fo_ratio} | {_median(r.get('folders', []), 'rss_mib'):.0f} |"
            line += f" {_median(r.get('folders_first', []), 'wall_s'):.1f} |"
        lines.append(line)
    extract = results["extract_s"]
    if extract:
        lines += ["", f"One-time conversion (`drm-lightning extract` per expert, not in the merge times): median "
                  f"{statistics.median(extract):.1f} s over {len(extract)} expert(s)."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["smollm2-135m"], choices=sorted(SIZES))
    parser.add_argument("--experts", nargs="+", type=int, default=[4], help="numbers of experts T to merge")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="default: every method (--quick: task_arithmetic and ties)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per tool and method (median shown)")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, 2 experts, 2 methods, 1 run")
    parser.add_argument("--cuda", action="store_true", help="the merge math on the GPU in both tools")
    parser.add_argument("--mergekit_venv", default=os.environ.get("MERGEKIT_VENV", "/work/mkvenv"))
    parser.add_argument("--install", action="store_true", help="make the mergekit virtualenv when it is missing")
    parser.add_argument("--no_mergekit", action="store_true", help="time drm-lightning alone")
    parser.add_argument("--folders", action="store_true",
                        help="also time our merge given the expert folders (conversion inside the merge)")  # fmt: skip
    parser.add_argument("--work", default=None, help="where models go (kept and reused; default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--json", default=None, help="also write every number as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.experts, args.runs = ["tiny"], [2], 1
        args.methods = args.methods or ["task_arithmetic", "ties"]
    args.methods = args.methods or list(METHODS)
    results = run_benchmark(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
