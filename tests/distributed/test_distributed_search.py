"""A parameter search (method parameters and λ, with edge extension) under ``torchrun`` on two ranks (gloo, CPU)
chooses what one process chooses, with the same scores.

One process runs the tiny recipe first (fitting its two experts); two ranks then run it again over those experts
(``--experts_dir``): the parameter sets merged shared out between the ranks, each method's whole search (λ grids,
the extra parameter set an edge asks for, merged by the rank that searches it) on one rank, every result gathered.
Each rank must also leave its process groups itself: a gloo group left to the interpreter's exit can abort it
("terminate called without an active exception").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from drm_lightning.cli import main
from tests.helpers.launch import finish, reaped, start_pipeline
from tests.helpers.recipes import tiny_two_task_recipe, write_recipe

METHODS = [
    {"method": "drm_v", "params": {"drop_rate": [0.3, 0.6]}, "lambdas": [0.5, 1.0]},
    {"method": "ties", "params": {"density": [0.3, 0.6]}, "lam": 1.0},
]


def _recipe(tmp: Path) -> Path:
    # split: the search's own numbers, no test split to evaluate
    return write_recipe(
        tmp, tiny_two_task_recipe(tmp, run_dir=str(tmp / "one"), methods=METHODS, split="validation", export="none")
    )


def _searches(run: Path) -> dict:
    """Per method: the chosen (parameters, λ), the validation numbers, and every parameter set's search."""
    methods = json.loads((run / "report.json").read_text())["results"]["methods"]
    return {
        m["label"]: {
            "chosen": (m["params"], m["lambda"]),
            "metrics": m["metrics"],
            "evaluations": m["evaluations"],
            "notes": m["notes"],
            "variants": [(v["name"], v["lambda"], v["score"], v["curve"]) for v in m["variants"]],
        }
        for m in methods
    }


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_search_what_one_process_searches(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    assert main(["pipeline", "--config", str(recipe)]) == 0
    args = ["--config", str(recipe), "--experts_dir", str(tmp_path / "one"), "--run_dir", str(tmp_path / "two")]
    two = start_pipeline(args, tmp_path / "two.log", nproc=2)
    with reaped(two):
        out = finish(two, tmp_path / "two.log", time.monotonic() + 240)
    assert two.returncode == 0, out[-4000:]
    assert "terminate called" not in out, out[-4000:]  # every rank left its gloo groups before exit
    assert out.count("# drm_lightning merge report") == 1  # rank 0 alone reports
    assert not (tmp_path / "two" / "task_vectors").exists()  # the one-process run's experts, reused
    got, ref = _searches(tmp_path / "two"), _searches(tmp_path / "one")
    assert got == ref
    for label, search in ref.items():  # a two-value grid's best is at its edge: one more set was searched
        assert len(search["variants"]) == 3 and any("added" in n for n in search["notes"]), (label, search)
    # the grid's sets were merged by both ranks together, the edge's extra set by the rank that searched it
    for label in ref:
        records = sorted((tmp_path / "two" / "merged" / label).glob("*/merge.json"))
        worlds = [json.loads(r.read_text()).get("distributed", {}).get("world_size", 1) for r in records]
        assert sorted(worlds) == [1, 2, 2], (label, worlds)


@pytest.mark.parametrize("before", [False, True])
def test_main_destroys_the_group_its_command_made_and_keeps_one_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    """``cli.main`` leaves no process group of its own to the interpreter's exit (a gloo group there can abort
    the process); a group that existed before the command (a caller's) is the caller's to destroy."""
    import torch.distributed as dist

    from drm_lightning import cli

    def init(name: str) -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / name}", world_size=1, rank=0)

    monkeypatch.setattr(cli, "_run", lambda command, args, quiet: None if dist.is_initialized() else init("command"))
    if before:
        init("caller")
    try:
        assert cli.main(["merge"]) == 0
        assert dist.is_initialized() == before
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
