"""``pipeline --procs_per_expert K``: the launched processes fit different tasks' experts at the same time.

Unit tables for the group layout (``plan_group``), the dealing of tasks and the environment a group trains in; then
two real launches under ``torch.distributed.run`` on localhost (gloo): two groups of one process fit two tiny experts
at once and every file (task vectors, heads, merged deltas, report numbers) equals a one-process run bit for bit
(the evaluations shared out between the ranks included, on splits of odd size); and
a task that fails in one group is raised on every rank, nothing hangs, and the other group's expert is kept; and,
without groups, both ranks fit each expert with DDP and then share the merges and evaluations out, with the bytes
and numbers of a one-process run over the same task vectors.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from drm_lightning.commands.expert_groups import (
    ExpertGroup,
    GroupEnvironment,
    assign_tasks,
    expert_group,
    group_devices,
    local_world_size,
    plan_group,
)
from drm_lightning.world import WorldInfo
from tests.helpers.launch import finish, reaped, start, start_pipeline
from tests.helpers.recipes import tiny_two_task_recipe, write_recipe


def _world(world_size: int, rank: int, local_rank: int) -> WorldInfo:
    return WorldInfo(world_size, rank, local_rank, "torchrun")


@pytest.mark.parametrize(
    ("world", "k", "local", "expected"),
    [
        ((2, 0, 0), 1, 2, ExpertGroup(0, 2, 0, 1, (0,), 29501)),
        ((2, 1, 1), 1, 2, ExpertGroup(1, 2, 0, 1, (1,), 29502)),
        ((4, 3, 3), 2, 4, ExpertGroup(1, 2, 1, 2, (2, 3), 29502)),
        ((8, 5, 1), 2, 4, ExpertGroup(2, 4, 1, 2, (0, 1), 29503)),  # second node, its first group
        ((8, 7, 3), 4, 4, ExpertGroup(1, 2, 3, 4, (0, 1, 2, 3), 29502)),  # one group per node
        ((4, 2, 2), 1, None, ExpertGroup(2, 4, 0, 1, (2,), 29503)),  # unknown processes per node: one node
    ],
)
def test_plan_group(world: tuple[int, int, int], k: int, local: int | None, expected: ExpertGroup) -> None:
    assert plan_group(_world(*world), k, local, 29500) == expected


@pytest.mark.parametrize(
    ("world", "k", "local", "match"),
    [
        ((4, 0, 0), 0, 4, "procs_per_expert=0"),
        ((4, 0, 0), 3, 4, "divisor of the 4"),
        ((4, 0, 0), True, 4, "procs_per_expert=True"),
        ((2, 0, 0), 4, 2, "divisor of the 2"),
        ((4, 0, 0), 4, 2, "must divide the 2 processes per node"),  # a group would straddle two nodes
        ((4, 0, 0), 1, 3, "3 processes per node"),
        ((4, 1, 0), 1, 2, "node-contiguous"),  # srun --distribution=cyclic
    ],
)
def test_plan_group_rejects(world: tuple[int, int, int], k, local: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_group(_world(*world), k, local, 29500)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "8"}, 4),
        ({"SLURM_NTASKS_PER_NODE": "8"}, 8),
        ({"SLURM_TASKS_PER_NODE": "4(x2)"}, 4),
        ({"SLURM_TASKS_PER_NODE": "2"}, 2),
        ({"SLURM_TASKS_PER_NODE": "2,1"}, None),  # uneven nodes: no single answer
        ({}, None),
    ],
)
def test_local_world_size(environ: dict[str, str], expected: int | None) -> None:
    assert local_world_size(environ) == expected


@pytest.mark.parametrize(
    ("tasks", "groups", "expected"),
    [
        (["a", "b", "c", "d", "e"], 2, [["a", "c", "e"], ["b", "d"]]),
        (["a", "b"], 4, [["a"], ["b"], [], []]),
        (["a", "b", "c"], 1, [["a", "b", "c"]]),
    ],
)
def test_assign_tasks_deals_in_order(tasks: list[str], groups: int, expected: list[list[str]]) -> None:
    assert assign_tasks(tasks, groups) == expected


def test_assign_tasks_rejects_no_groups() -> None:
    with pytest.raises(ValueError, match="groups=0"):
        assign_tasks(["a"], 0)


GROUP = ExpertGroup(index=1, count=2, rank=1, size=2, local_ranks=(2, 3), port=29502)


def test_expert_group_rewrites_then_restores_the_launcher_view(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    launcher = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3",
                "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_USE_AGENT_STORE": "True"}  # fmt: skip
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", 3)
    with expert_group(GROUP, "cpu") as overrides:
        inside = {k: os.environ.get(k) for k in (*launcher, "NODE_RANK")}
        assert rank_zero_only.rank == 1
    assert inside == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29502", "WORLD_SIZE": "2", "RANK": "1",
                      "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": None,
                      "NODE_RANK": "0"}  # fmt: skip
    assert {k: os.environ.get(k) for k in launcher} == launcher and "NODE_RANK" not in os.environ
    assert rank_zero_only.rank == 3
    assert overrides["devices"] == 2 and overrides["num_nodes"] == 1
    (env,) = overrides["plugins"]
    assert (env.main_address, env.main_port, env.world_size(), env.global_rank(), env.local_rank()) == (
        "127.0.0.1", 29502, 2, 1, 1,
    )  # fmt: skip


def test_expert_group_restores_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(KeyError), expert_group(GROUP, "cpu"):
        raise KeyError("boom")
    assert os.environ["MASTER_PORT"] == "29500"


def test_expert_group_refuses_an_existing_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already"), expert_group(GROUP, "cpu"):
        pass


@pytest.mark.parametrize(
    ("accelerator", "gpus", "expected"),
    [
        ("cpu", 8, 2),
        ("gpu", 8, [2, 3]),
        ("cuda", 4, [2, 3]),
        ("gpu", 2, [0, 1]),  # each node sees its own GPUs: LOCAL_RANK modulo the visible ones
        ("gpu", 1, "needs 2 GPUs, 1 are visible"),
        ("gpu", 0, "no CUDA device"),
    ],
)
def test_group_devices(monkeypatch: pytest.MonkeyPatch, accelerator: str, gpus: int, expected) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            group_devices(GROUP, accelerator)
    else:
        assert group_devices(GROUP, accelerator) == expected


def test_lightning_takes_the_group_as_its_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Trainer given the group's environment sees K processes and this process's group rank (no launch)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the strategy sets it: undo for later tests

    trainer = Trainer(
        accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", plugins=[GroupEnvironment(GROUP)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (2, 1, 1, 0)
    assert trainer.strategy.cluster_environment.main_port == 29502
    assert not trainer.is_global_zero and rank_zero_only.rank == 1


# --------------------------------------------------------------------------------------------------------------
# Real launches: torchrun, two processes, gloo on localhost
# --------------------------------------------------------------------------------------------------------------


#: A hang guard for one test's launches (they run at the same time): 20-40 s on 2 loaded cores.
DEADLINE_S = 480


def _recipe(tmp: Path, break_second: bool = False) -> Path:
    recipe = tiny_two_task_recipe(tmp)
    if break_second:  # a dataset without its label column: found only when the expert's data is set up
        train = tmp / "data" / "animal" / "train.csv"
        train.write_text("\n".join(line.split(",")[0] for line in train.read_text().splitlines()) + "\n")
    return write_recipe(tmp, recipe)


def _files(run: Path) -> dict[str, bytes]:
    """Every tensor file of a run, by path relative to the run folder."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*.safetensors"))}


def _numbers(run: Path) -> dict:
    results = json.loads((run / "report.json").read_text())["results"]
    return {
        "expert": results["expert"],
        "pretrained": results["pretrained"],
        "methods": [(m["label"], m["lambda"], m["metrics"], m["curve"]) for m in results["methods"]],
    }


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_groups_fit_two_experts_at_once_and_match_one_process(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    deadline = time.monotonic() + DEADLINE_S
    args = ["--config", str(recipe), "--procs_per_expert", "1", "--run_dir", str(tmp_path / "two")]
    two = start_pipeline(args, tmp_path / "two.log", nproc=2)
    with reaped(two):
        one = start_pipeline(["--config", str(recipe), "--run_dir", str(tmp_path / "one")], tmp_path / "one.log")
        with reaped(one):
            one_out = finish(one, tmp_path / "one.log", deadline)
            out = finish(two, tmp_path / "two.log", deadline)
    assert one.returncode == 0, one_out[-4000:]
    assert two.returncode == 0, out[-4000:]
    # each group (one process) fitted one task, both at once
    assert "2 expert groups of 1 process(es) fit 2 expert(s)" in out
    assert "sentiment: expert group 0 (global ranks 0..0) fits it" in out
    assert "animal: expert group 1 (global ranks 1..1) fits it" in out
    # then all ranks merged together, and every file and number equals the one-process run's
    record = json.loads((tmp_path / "two" / "merged" / "drm_v" / "merge.json").read_text())
    assert record["distributed"]["world_size"] == 2
    assert [r["parameters"] > 0 for r in record["distributed"]["ranks"]] == [True, True]
    got, ref = _files(tmp_path / "two"), _files(tmp_path / "one")
    # 2 × (task vector, head, input statistics); merged delta, 2 heads; the exported best model (models/<label>/)
    # and its 2 heads
    assert len(ref) == 2 * 3 + 3 + 3 and sorted(got) == sorted(ref)
    # the input Grams are sums of large matrix products: another thread count (torchrun's workers run one) sums them
    # in another order, so they are equal to rounding; every other file is equal bytes
    grams = [name for name in ref if name.endswith("statistics.safetensors")]
    assert len(grams) == 2
    assert [name for name in ref if name not in grams and got[name] != ref[name]] == []
    for name in grams:
        mine, theirs = load(got[name]), load(ref[name])
        assert sorted(mine) == sorted(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6 * float(theirs[key].abs().max()))
    assert _numbers(tmp_path / "two") == _numbers(tmp_path / "one")
    assert out.count("# drm_lightning merge report") == 1  # rank 0 alone reports
    # the evaluations were shared out: rank 1 scored the experts on test (rank 0, which speaks, did not)
    assert "evaluating 2 expert(s) on validation" in out and "evaluating 2 expert(s) on test" not in out


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("late", [True, False], ids=["srun-rank1-late", "launcher"])
def test_a_failing_group_fails_every_rank_and_keeps_the_others_expert(tmp_path: Path, late: bool) -> None:
    """Launched as srun starts tasks with rank 1 late (only after rank 0 has fitted its expert or waits for the
    others), and under the test session's launcher (DRM_TEST_LAUNCH).

    A late rank once read from the file system that rank 0's fresh expert was current, dealt the remaining task to
    group 0 and fitted nothing; its broken task passed unnoticed (seen under torchrun --standalone, 1 run in 20).
    The ranks must agree on the experts to fit before any group fits one.
    """
    recipe = _recipe(tmp_path, break_second=True)
    log = tmp_path / "two.log"
    deadline = time.monotonic() + DEADLINE_S

    def after_rank_zero_started(rank: int) -> None:
        fitted = tmp_path / "run" / "experts" / "sentiment" / "fit.json"
        while rank == 1 and time.monotonic() < deadline and not fitted.is_file():
            if "rank 0: joins the world" in log.read_text():
                return  # rank 0 waits for rank 1: nothing can be fitted before it comes
            time.sleep(0.2)

    cli = ["-m", "drm_lightning.cli", "pipeline", "--config", str(recipe), "--procs_per_expert", "1"]
    trace = {"DRM_LIGHTNING_TRACE": "1"}
    two = start(cli, log, 2, "srun", trace, after_rank_zero_started) if late else start(cli, log, 2, env=trace)
    with reaped(two):
        out = finish(two, log, deadline)
    assert two.returncode != 0
    assert out.count("drm-lightning: error:") == 2, out[-4000:]  # both ranks stop with one line, none hangs
    assert "rank 1 failed" in out and "label" in out, out[-4000:]
    run = tmp_path / "run"
    assert (run / "task_vectors" / "sentiment" / "meta.json").is_file()  # the healthy group's expert is kept
    assert not (run / "task_vectors" / "animal").exists() and not (run / "merged").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_without_groups_all_ranks_fit_each_expert_then_share_merges_and_evaluations(tmp_path: Path) -> None:
    """The default under torchrun: each expert fitted by both ranks (DDP), then merges and evaluations shared out
    after Lightning made the process group; a one-process run over the same task vectors gives the same bytes and
    numbers."""
    import shutil

    recipe = _recipe(tmp_path)
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    two = start_pipeline(["--config", str(recipe), "--run_dir", str(tmp_path / "two"), *ddp], tmp_path / "two.log", 2)
    with reaped(two):
        out = finish(two, tmp_path / "two.log", time.monotonic() + DEADLINE_S)
    assert two.returncode == 0, out[-4000:]
    assert "expert groups" not in out and out.count("# drm_lightning merge report") == 1
    assert (
        json.loads((tmp_path / "two" / "merged" / "drm_v" / "merge.json").read_text())["distributed"]["world_size"] == 2
    )
    for folder in ("task_vectors", "experts"):  # the same experts, reused by a one-process run
        shutil.copytree(tmp_path / "two" / folder, tmp_path / "one" / folder)
    args = ["--config", str(recipe), "--run_dir", str(tmp_path / "one"), *ddp, "--eval_trainer", "{devices: 1}"]
    one = start_pipeline(args, tmp_path / "one.log")
    with reaped(one):
        one_out = finish(one, tmp_path / "one.log", time.monotonic() + DEADLINE_S)
    assert one.returncode == 0, one_out[-4000:]
    assert "sentiment: reusing the task vector" in one_out
    got, ref = _files(tmp_path / "two"), _files(tmp_path / "one")
    assert sorted(got) == sorted(ref) and [name for name in ref if got[name] != ref[name]] == []
    assert _numbers(tmp_path / "two") == _numbers(tmp_path / "one")


@pytest.mark.parametrize(
    ("trainer", "eval_trainer", "gpus", "local_rank", "expected"),
    [
        ({"accelerator": "cpu", "devices": 2}, {}, 0, 1, {"accelerator": "cpu", "devices": 1}),
        ({"accelerator": "gpu", "devices": 8, "num_nodes": 2}, {}, 8, 3, {"accelerator": "gpu", "devices": [3]}),
        ({"accelerator": "auto"}, {"devices": 4, "strategy": "ddp"}, 2, 3, {"accelerator": "auto", "devices": [1]}),
        ({"accelerator": "cpu", "precision": "bf16-mixed"}, {}, 0, 0,
         {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}),
    ],
)  # fmt: skip
def test_shared_out_evaluation_uses_one_device_per_rank(
    monkeypatch: pytest.MonkeyPatch, trainer: dict, eval_trainer: dict, gpus: int, local_rank: int, expected: dict
) -> None:
    """Shared out, each rank evaluates alone on its own device: the recipe's devices, nodes and strategy (and
    eval_trainer's) are replaced, other settings kept."""
    from types import SimpleNamespace

    from drm_lightning.commands.pipeline import eval_trainer_kwargs

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    recipe = SimpleNamespace(trainer=trainer, eval_trainer=eval_trainer)
    assert eval_trainer_kwargs(recipe, local_rank) == {**expected, "num_nodes": 1, "strategy": "auto"}
