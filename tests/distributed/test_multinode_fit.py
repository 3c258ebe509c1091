"""Multi-node training through the real CLI: two processes on localhost acting as two nodes (gloo, CPU).

``drm-lightning fit --trainer.num_nodes 2 --trainer.devices 1 --trainer.strategy ddp`` is started twice with
``NODE_RANK=0/1`` and a shared ``MASTER_ADDR``/``MASTER_PORT`` (as ``python -m drm_lightning.cli fit``), exactly as
a user would start it on two machines; Lightning's own cluster detection takes it from there. Its task vector must
match a single-process run with the same global batch (one process, batch 2B, against two processes, batch B each)
to float tolerance, and only global rank 0 may write it.

Why the single-process reference also runs under ``strategy=ddp``: Lightning gives every DDP run a
``DistributedSampler`` (seeded by ``seed_everything``), whose rank ``r`` of ``W`` takes positions ``r, r+W, ...`` of
one seeded permutation; so the union of the ranks' k-th batches is the k-th batch of the one-process run, and the
mean loss over it is the same. A plain single-device run shuffles with a ``RandomSampler`` and sees the data in
another order.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import DELTAS_FILE, HEAD_FILE, read_meta
from tests.helpers.launch import free_ports
from tests.helpers.tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # a hang (a collective on one rank only) fails the test instead of blocking the suite
BATCH = 2  # per process; the single-process reference uses 2 * BATCH
TRAIN_ROWS = 16  # a multiple of 2 * BATCH: no padding by the DistributedSampler, no ragged last batch
POSITIVE = ("good", "great", "fun", "nice", "best", "love", "superb", "fresh")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring", "worst", "hate", "rotten")


def _write_csv(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            words = POSITIVE if i % 2 else NEGATIVE
            writer.writerow([f"{rng.choice(words)} movie {rng.choice(['the', 'a', 'this'])} {rng.choice(words)}",
                             "pos" if i % 2 else "neg"])  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multinode")
    # No dropout anywhere: the ranks' dropout masks could never reproduce the single process's.
    make_tiny_model("encoder", root / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _write_csv(root / "train.csv", TRAIN_ROWS, seed=0)
    _write_csv(root / "validation.csv", 8, seed=1)
    return root


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without any launcher's variables (pytest itself may run under SLURM or torchrun)."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_")) and k not in drop}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        DRM_LIGHTNING_VERBOSE="1",  # Lightning's own banner ("Starting with 2 processes") is the evidence below
        **extra,
    )
    return env


def _fit(root: Path, name: str, *, num_nodes: int, batch_size: int) -> list[str]:
    """``drm-lightning fit`` of a tiny BERT expert; every process gets its own datasets cache and output folders."""
    return [
        sys.executable, "-m", "drm_lightning.cli", "fit",  # what torchrun / srun start on every node
        "--model.backbone", str(root / "bert"), "--model.family", "encoder",
        "--model.head_dropout", "0", "--model.learning_rate", "1e-3", "--model.warmup_ratio", "0",
        "--data.class_path", "drm_lightning.data.text.TextClassificationDataModule",
        "--data.task", "toy", "--data.label_names", "[neg, pos]",
        "--data.data_files", f"{{train: {root / 'train.csv'}, validation: {root / 'validation.csv'}}}",
        "--data.test_split", "null", "--data.batch_size", str(batch_size),
        # Fixed padded length: per-rank batches pad like the single process's batch of twice the size.
        "--data.max_length", "16", "--data.pad_to_multiple_of", "16", "--data.cache_dir", str(root / f"cache-{name}"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", str(num_nodes),
        "--trainer.strategy", "ddp", "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root / f"run-{name}"),
        "--seed_everything", "0", "--task_vector_dir", str(root / f"tv-{name}"),
    ]  # fmt: skip


def _run_all(jobs: dict[str, tuple[list[str], dict[str, str]]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Start every job at once and wait for all of them; on a timeout, kill the ones this test started."""
    procs = {
        name: subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (cmd, env) in jobs.items()
    }
    out: dict[str, subprocess.CompletedProcess] = {}
    try:
        for name, proc in procs.items():
            stdout, _ = proc.communicate(timeout=TIMEOUT_S)
            out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout)
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            proc.kill()
        texts = {n: (p.communicate()[0] or "")[-2000:] for n, p in procs.items()}
        pytest.fail(f"fit did not finish in {TIMEOUT_S}s (a hang?); output tails: {texts}")
    return out


def _tensors(folder: Path, filename: str) -> dict[str, torch.Tensor]:
    with open_safetensors(folder / filename) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_match_one_process(workdir: Path) -> None:
    root = workdir
    single_port, multi_port = free_ports(2)  # two launches on one port would meet in one store and hang
    jobs = {
        "single": (_fit(root, "single", num_nodes=1, batch_size=2 * BATCH), _env(MASTER_PORT=str(single_port))),
        **{
            f"node{n}": (
                _fit(root, f"node{n}", num_nodes=2, batch_size=BATCH),
                _env(MASTER_PORT=str(multi_port), NODE_RANK=str(n)),
            )
            for n in (0, 1)
        },
    }
    results = _run_all(jobs, root)
    for name, result in results.items():
        assert result.returncode == 0, f"{name} failed:\n{result.stdout[-4000:]}"
    assert "Starting with 2 processes" in results["node0"].stdout  # Lightning really ran one world of two

    single, multi = root / "tv-single", root / "tv-node0"
    assert not (root / "tv-node1").exists(), "global rank 1 wrote a task vector: only rank 0 may write"
    ref, got = _tensors(single, DELTAS_FILE), _tensors(multi, DELTAS_FILE)
    assert sorted(got) == sorted(ref)
    assert max(t.abs().max().item() for t in ref.values()) > 1e-4  # training really moved the weights
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    ref_head, got_head = _tensors(single, HEAD_FILE), _tensors(multi, HEAD_FILE)
    for name, tensor in ref_head.items():
        torch.testing.assert_close(got_head[name], tensor, rtol=0, atol=1e-5)
    meta_single, meta_multi = read_meta(single), read_meta(multi)
    assert (meta_multi.task, meta_multi.kind, meta_multi.base_fingerprint) == (
        meta_single.task,
        meta_single.kind,
        meta_single.base_fingerprint,
    )
