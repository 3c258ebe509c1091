"""Merge wall time of one model's task vectors with 1, 2, ... processes (``torch.distributed``).

Builds a Llama-architecture model from a config (random weights, nothing downloaded), writes T random dense task
vectors for it in the project's on-disk format, then merges them with the ordinary entry point,
``merge_task_vectors_distributed``, launched under ``torchrun`` with each process count in turn. That is exactly
how a user scales a merge out: the parameters of the plan are shared between the ranks, and rank 0 assembles one
output. The merged tensors of every process count are compared with the single-process ones (they must be equal
bit for bit: same device kind and threads per process).

Usage::

    python benchmarks/merge_scaling.py                                  # 1 and 2 processes, CPU, drm_v, T=3
    python benchmarks/merge_scaling.py --processes 1 2 4 --method iso_cts --hidden 1024 --json out.json
    python benchmarks/merge_scaling.py --device cuda --processes 1 2   # one GPU per process (cuda:LOCAL_RANK)

Reported per process count: the merge's wall time (the slowest rank, from the call to its return, so loading the
base model, process-group set-up and rank 0's assembly count; interpreter start-up does not), its speed-up against
the first process count, the slowest rank's merge arithmetic alone (the ``matrix`` + ``elementwise`` phases of the
merger's timings), the slowest rank's CPU time for the call (on a machine shared with other jobs, where wall time
also measures the queue, this is the load-independent view of how the work was split), and the launcher's wall time
from start to exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if importlib.util.find_spec("drm_lightning") is None:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(REPO))

LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ModelSpec:
    """The Llama-architecture model whose task vectors are merged (k/v heads a quarter of the heads, as in Llama 3)."""

    hidden: int = 512
    intermediate: int = 1536
    layers: int = 4
    vocab: int = 1024
    head_dim: int = 64

    def config(self):  # -> transformers.LlamaConfig, imported lazily (the worker never needs it)
        from transformers import LlamaConfig

        heads = max(1, self.hidden // self.head_dim)
        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            vocab_size=self.vocab,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )


@dataclass
class RunResult:
    """One process count."""

    processes: int
    merge_seconds: float
    """Median over repeats of the slowest rank's merge call."""
    launch_seconds: float
    """Median over repeats of the launcher's start-to-exit wall time."""
    repeats_merge_seconds: list[float]
    rank_seconds: list[list[float]]
    """Per repeat, each rank's merge call."""
    cpu_seconds: float
    """Median over repeats of the largest per-rank CPU time of the merge call (all its threads)."""
    rank_cpu_seconds: list[list[float]]
    rank_timings: list[dict[str, float]]
    """Each rank's merge phases (``load``, ``read``, ``matrix``, ``elementwise``, ``write``, ...), last repeat."""
    math_seconds: float = 0.0
    """The slowest rank's ``matrix`` + ``elementwise`` phases (the merge arithmetic), last repeat."""
    speedup: float | None = None
    identical: bool | None = None
    """Merged tensors equal, bit for bit, to the single-process merge (None for the first process count)."""


@dataclass
class ScalingReport:
    config: dict[str, object]
    parameters: int
    task_vector_bytes: int
    runs: list[RunResult]


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def build_inputs(spec: ModelSpec, tasks: int, folder: Path, seed: int) -> tuple[Path, list[Path], int]:
    """Save the base model and write ``tasks`` random dense task vectors (``1e-3 · N(0, 1)``); returns their paths.

    The deltas go through the project's own writer and the base fingerprint through the loader the merger uses, so
    the merge reads them exactly like task vectors written by the extraction callback.
    """
    from transformers import LlamaModel

    from drm_lightning.io.task_vector import TaskVectorMeta, library_versions, write_task_vector
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.task_vectors.fingerprint import fingerprint

    torch.manual_seed(seed)
    base = folder / "base"
    LlamaModel(spec.config()).save_pretrained(base)
    backbone = load_backbone(str(base), "decoder")
    state = {name: value.detach() for name, value in backbone.state_dict().items() if value.is_floating_point()}
    base_fingerprint = fingerprint(backbone)
    del backbone
    paths = []
    for task in range(tasks):
        generator = torch.Generator().manual_seed(seed * 1000 + task + 1)
        deltas = {name: 1e-3 * torch.randn(value.shape, generator=generator) for name, value in state.items()}
        head = {"weight": torch.randn(2, spec.hidden, generator=generator), "bias": torch.zeros(2)}
        meta = TaskVectorMeta(
            task=f"task{task}",
            kind="dense",
            base_model=str(base),
            base_fingerprint=base_fingerprint,
            family="decoder",
            label_names=["negative", "positive"],
            versions=library_versions(),
        )
        paths.append(write_task_vector(folder / f"task{task}", deltas, head, meta))
    return base, paths, sum(value.numel() for value in state.values())


# --------------------------------------------------------------------------------------------------------------
# Worker (one rank, started by torchrun)
# --------------------------------------------------------------------------------------------------------------


def worker(spec_path: Path) -> None:
    """Merge as one rank and record how long the call took; torchrun sets RANK and friends."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed

    start, cpu_start = time.perf_counter(), time.process_time()
    result = merge_task_vectors_distributed(
        spec["task_vectors"], spec["method"], spec["output"], spec["params"], device=spec["device"], progress=False
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "seconds": seconds, "cpu_seconds": cpu_seconds, "timings": result.timings}
    (Path(spec["results"]) / f"rank{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------


def launch(processes: int, spec: dict[str, object], folder: Path, timeout_s: float) -> tuple[float, list[dict]]:
    """Run one merge under ``torchrun --standalone``; returns (launcher wall seconds, each rank's record)."""
    results = Path(str(spec["results"]))
    results.mkdir(parents=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARS}
    env.update(
        OMP_NUM_THREADS=str(spec["threads"]),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += [str(Path(__file__).resolve()), "--worker", str(spec_path)]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} processes failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    records = sorted((json.loads(p.read_text()) for p in results.glob("rank*.json")), key=lambda r: r["rank"])
    if len(records) != processes:
        raise RuntimeError(f"torchrun with {processes} processes: {len(records)} rank records in {results}")
    return seconds, records


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two merge outputs hold the same merged tensors, bit for bit, under the same names."""
    from drm_lightning.io.merged_delta import iter_merged_delta

    left, right = dict(iter_merged_delta(a)), dict(iter_merged_delta(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--method", default="drm_v", help="a registry name (default drm_v)")
    parser.add_argument("--params", default="{}", help="the method's parameters as JSON, e.g. '{\"drop_rate\": 0.9}'")
    parser.add_argument("--tasks", type=int, default=3, help="number of task vectors T (default 3)")
    for name, default in vars(ModelSpec()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"model {name}")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each rank on cuda:LOCAL_RANK)")
    parser.add_argument("--repeats", type=int, default=1, help="merges per process count (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a launch is abandoned")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here (default: a tmp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> dict[str, object]:
    """Check the arguments (errors name the option and value); returns the parsed ``--params``."""
    for option in ("threads", "tasks", "repeats", *vars(ModelSpec())):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')}: must be at least 1, got {getattr(args, option)}")
    if not args.processes or min(args.processes) < 1:
        raise ValueError(f"--processes: each count must be at least 1, got {args.processes}")
    if args.hidden % args.head_dim:
        raise ValueError(f"--hidden: must be a multiple of --head-dim {args.head_dim}, got {args.hidden}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.processes):
        raise ValueError(f"--device cuda: {max(args.processes)} processes need as many GPUs, torch sees "
                         f"{torch.cuda.device_count()}")  # fmt: skip
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise ValueError(f"--params: not JSON ({err}): {args.params!r}") from None
    if not isinstance(params, dict):
        raise ValueError(f"--params: must be a JSON object, got {args.params!r}")
    from drm_lightning.merging.methods.registry import get_method

    get_method(args.method).check(params)  # unknown methods and bad parameters fail here, before any work
    return params


def format_report(report: ScalingReport) -> str:
    cfg = report.config
    lines = [
        f"Merge scaling: {cfg['method']} of T={cfg['tasks']} task vectors of a Llama-architecture model "
        f"({report.parameters / 1e6:.1f} M parameters, hidden {cfg['hidden']}, {cfg['layers']} layers, "
        f"{report.task_vector_bytes / 2**20:.0f} MiB of task vectors), {cfg['device']}, "
        f"{cfg['threads']} thread(s) per process, median of {cfg['repeats']}",
        "",
        f"{'processes':>9}{'merge s':>10}{'speed-up':>10}{'math s':>9}{'CPU s':>9}{'launch-to-exit s':>18}"
        f"{'identical to 1':>16}",
    ]
    for run in report.runs:
        identical = "-" if run.identical is None else ("yes" if run.identical else "NO")
        speedup = "-" if run.speedup is None else f"{run.speedup:.2f}x"
        lines.append(
            f"{run.processes:>9}{run.merge_seconds:>10.3f}{speedup:>10}{run.math_seconds:>9.3f}{run.cpu_seconds:>9.2f}"
            f"{run.launch_seconds:>18.2f}{identical:>16}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> ScalingReport | None:
    """Build the inputs, merge them with each process count, print the table; returns the results."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return None
    params = validate(args)
    spec = ModelSpec(**{name: getattr(args, name) for name in vars(ModelSpec())})
    owned = args.workdir is None
    folder = Path(tempfile.mkdtemp(prefix="merge_scaling_")) if owned else args.workdir
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _, task_vectors, parameters = build_inputs(spec, args.tasks, folder, args.seed)
        tv_bytes = sum(f.stat().st_size for tv in task_vectors for f in tv.iterdir())
        runs: list[RunResult] = []
        first_output: Path | None = None
        for index, processes in enumerate(args.processes):
            launches, merges, per_rank, cpu_per_rank, records = [], [], [], [], []
            output = folder / f"merged_{index}_p{processes}"
            for repeat in range(args.repeats):
                if output.exists():
                    shutil.rmtree(output)
                job = {
                    "task_vectors": [str(p) for p in task_vectors],
                    "method": args.method,
                    "params": params,
                    "output": str(output),
                    "device": args.device,
                    "threads": args.threads,
                    "results": str(folder / f"results_{index}_p{processes}_r{repeat}"),
                }
                seconds, records = launch(processes, job, folder, args.timeout)
                launches.append(seconds)
                per_rank.append([r["seconds"] for r in records])
                cpu_per_rank.append([r["cpu_seconds"] for r in records])
                merges.append(max(per_rank[-1]))
            run = RunResult(
                processes=processes,
                merge_seconds=statistics.median(merges),
                launch_seconds=statistics.median(launches),
                repeats_merge_seconds=merges,
                rank_seconds=per_rank,
                cpu_seconds=statistics.median(max(cpus) for cpus in cpu_per_rank),
                rank_cpu_seconds=cpu_per_rank,
                rank_timings=[r["timings"] for r in records],
                math_seconds=max(
                    r["timings"].get("matrix", 0.0) + r["timings"].get("elementwise", 0.0) for r in records
                ),
            )
            if first_output is None:
                first_output = output
            else:
                run.identical = same_tensors(output, first_output)
            runs.append(run)
        for run in runs:
            run.speedup = runs[0].merge_seconds / run.merge_seconds
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    config["params"] = params
    report = ScalingReport(config=config, parameters=parameters, task_vector_bytes=tv_bytes, runs=runs)
    print(format_report(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
