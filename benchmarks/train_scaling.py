"""Time of one training step with 1 and 2 (or more) DDP processes: the real ``ExpertModule`` under Lightning.

A BERT encoder built from a config (hidden 256, 4 layers by default) is saved to a work folder; then, for each process
count W, ``torchrun --standalone --nproc_per_node W`` runs this file's worker: ``ExpertModule`` (full fine-tuning)
fitted by a ``Trainer(strategy="ddp", devices=W)`` on random token batches, ``--batch_size`` examples per process
(so W processes see W times the examples per step: weak scaling, as adding GPUs does). W=1 runs under DDP too, so
the rows differ only in the number of processes. Each rank gets ``--threads`` intra-op threads (default: cores // W,
so every row uses the whole machine). The first ``--warmup`` steps are not timed. CUDA is used where present
(``--accelerator``), gloo on CPU.

Reported per W: the median step time (forward, backward with DDP's gradient all-reduce, optimizer step), examples
per second over all processes, and the throughput speed-up over the first W.

Usage::

    python benchmarks/train_scaling.py                                # W = 1, 2 on CPU (gloo)
    python benchmarks/train_scaling.py --procs 1 2 4 --accelerator gpu --hidden 768 --layers 12 --batch_size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(folder: Path, hidden: int, layers: int, vocab: int, seed: int) -> Path:
    """Save a randomly initialised BERT (the real loading path then runs in the worker)."""
    import torch
    from transformers import BertConfig, BertModel

    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        config = BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            vocab_size=vocab,
            max_position_embeddings=512,
        )
        BertModel(config).save_pretrained(folder)
    return folder


def worker(args: argparse.Namespace) -> None:
    """One rank: fit ``warmup + steps`` steps, time each step, rank 0 writes the times."""
    import torch
    from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
    from torch.utils.data import DataLoader, Dataset

    from drm_lightning.models.expert import ExpertModule

    torch.set_num_threads(args.threads)
    seed_everything(args.seed, verbose=False)

    class RandomTokens(Dataset):
        """Random token ids (no padding) and labels: the step's cost does not depend on the text."""

        def __init__(self, size: int) -> None:
            gen = torch.Generator().manual_seed(args.seed)
            self.ids = torch.randint(5, args.vocab, (size, args.seq_len), generator=gen)
            self.labels = torch.randint(0, 2, (size,), generator=gen)

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = self.ids[i]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}

    class Data(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            size = args.batch_size * args.procs * (args.warmup + args.steps)
            return DataLoader(RandomTokens(size), batch_size=args.batch_size, shuffle=True)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if torch.cuda.is_available() and args.accelerator == "gpu":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if torch.cuda.is_available() and args.accelerator == "gpu":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    model = ExpertModule(
        backbone=args.base, family="encoder", task="bench", label_names=["a", "b"], learning_rate=1e-4,
        warmup_ratio=0.0, head_dropout=0.0,
    )  # fmt: skip
    timer = StepTimer()
    trainer = Trainer(
        accelerator=args.accelerator, devices=args.procs, strategy="ddp", max_steps=args.warmup + args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=str(Path(args.result).parent),
    )  # fmt: skip
    trainer.fit(model, datamodule=Data())
    if trainer.is_global_zero:
        Path(args.result).write_text(json.dumps({"times": timer.times[args.warmup :], "threads": args.threads}))


def launch(procs: int, threads: int, args: argparse.Namespace, base: Path, work: Path) -> dict:
    """torchrun this file's worker on ``procs`` processes; return rank 0's step times."""
    result = work / f"train-{procs}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # Lightning would take SLURM's ranks
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), __file__,
        "--worker", "--procs", str(procs), "--threads", str(threads), "--base", str(base), "--result", str(result),
        "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--vocab", str(args.vocab),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--accelerator", args.accelerator,
        "--seed", str(args.seed),
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"W={procs} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**json.loads(result.read_text()), "launch_wall": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts W to time")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8, help="examples per process and step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores // W)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--workdir", default=None, help="keep the model here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.procs = args.procs[0]
        worker(args)
        return
    if min(args.procs) < 1 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--procs, --steps and --batch_size must be positive, --warmup non-negative")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="train_scaling-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = build_model(work / "base", args.hidden, args.layers, args.vocab, args.seed)
        cores = os.cpu_count() or 1
        rows = []
        for procs in args.procs:
            threads = args.threads or max(1, cores // procs)
            row = {"procs": procs, "threads": threads, **launch(procs, threads, args, base, work)}
            row["step_s"] = statistics.median(row["times"])
            row["examples_per_s"] = procs * args.batch_size / row["step_s"]
            rows.append(row)
    for row in rows:
        row["speedup"] = row["examples_per_s"] / rows[0]["examples_per_s"]
    print(
        f"train_scaling: ExpertModule (full fine-tuning), BERT hidden {args.hidden} x {args.layers} layers, "
        f"seq {args.seq_len}, {args.batch_size} examples/process/step, {args.accelerator}, {cores} cores, "
        f"median of {args.steps} steps"
    )
    print(f"{'W':>3} {'threads/rank':>12} {'step s':>8} {'examples/s':>11} {'throughput x':>13}")
    for r in rows:
        print(
            f"{r['procs']:>3} {r['threads']:>12} {r['step_s']:>8.3f} {r['examples_per_s']:>11.1f} "
            f"{r['speedup']:>12.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
