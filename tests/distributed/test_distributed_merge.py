"""Distributed merging: the parameter assignment, launcher detection, and a 2-process merge (torchrun, gloo, CPU)
that must equal the 1-process merge bit for bit.

"Equal" is checked at three levels: the same tensors bit for bit under the same names (``torch.equal``), and for
the canonical layout the same shard files and index byte for byte. Both sides run with one intra-op thread, as
torchrun's ranks do: float64 eigendecompositions round differently when BLAS splits work over more threads.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from drm_lightning.io.merged_delta import MERGED_DIR, iter_merged_delta
from drm_lightning.io.task_vector import TaskVectorError, read_head, read_meta, write_task_vector
from drm_lightning.merging.engine.distributed import assign_entries, distributed_merge, merge_task_vectors_distributed
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.plan import PlanEntry
from drm_lightning.merging.engine.record import MERGE_FILE, read_merge_record
from drm_lightning.world import WorldInfo, detect_world, encode_json, rank_device
from tests.helpers.launch import finish, free_port, pipeline_env, reaped, start
from tests.helpers.merge_inputs import dense_deltas

REPO = Path(__file__).resolve().parents[2]
T = 3
SHARD = 20_000  # small shards, so that outputs span several files and the re-sharding is exercised
NAN_KEY = "encoder.layer.1.attention.self.value.weight"
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NAME")


def _entry(name: str, cost: float, rule: str = "matrix") -> PlanEntry:
    return PlanEntry(name, (2, 2), rule, cost)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Assignment, detection, devices: pure functions
# --------------------------------------------------------------------------------------------------------------

ASSIGN_CASES = [
    # (costs, world size, expected names per rank)
    ([5, 4, 3, 3, 3], 2, [["p0", "p3"], ["p1", "p2", "p4"]]),  # 5→r0, 4→r1, 3→r1 (4<5), 3→r0 (5<7), 3→r1 (7<8)
    ([1, 1, 1, 1], 2, [["p0", "p2"], ["p1", "p3"]]),  # equal costs alternate, lowest rank first
    ([9, 1, 1, 1], 2, [["p0"], ["p1", "p2", "p3"]]),  # one heavy matrix against many light vectors
    ([3, 2, 1], 1, [["p0", "p1", "p2"]]),
    ([3, 2], 4, [["p0"], ["p1"], [], []]),  # more ranks than work: idle ranks get nothing
    ([], 2, [[], []]),
]


@pytest.mark.parametrize(("costs", "world_size", "expected"), ASSIGN_CASES)
def test_assign_entries_is_longest_processing_time(costs: list[float], world_size: int, expected) -> None:
    entries = [_entry(f"p{i}", c) for i, c in enumerate(costs)]
    shares = assign_entries(entries, world_size)
    assert [[e.name for e in share] for share in shares] == expected
    assert assign_entries(entries, world_size) == shares  # deterministic


def test_assign_entries_covers_every_entry_once_and_skips_skips() -> None:
    entries = [_entry(f"p{i}", float((i * 7) % 5 + 1)) for i in range(23)] + [_entry("frozen", 0.0, "skip")]
    shares = assign_entries(entries, 3)
    names = [e.name for share in shares for e in share]
    assert sorted(names) == sorted(f"p{i}" for i in range(23))
    loads = [sum(e.cost for e in share) for share in shares]
    assert max(loads) - min(loads) <= max(e.cost for e in entries)  # greedy keeps ranks within one entry's cost
    for share in shares:  # each share in plan order
        assert [entries.index(e) for e in share] == sorted(entries.index(e) for e in share)


@pytest.mark.parametrize("world_size", [0, -1, True, 1.5])
def test_assign_entries_rejects_bad_world_size(world_size) -> None:
    with pytest.raises(ValueError, match="world_size"):
        assign_entries([_entry("p", 1.0)], world_size)


DETECT_CASES = [
    ({}, WorldInfo(1, 0, 0, "single")),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, WorldInfo(4, 3, 1, "torchrun")),
    ({"WORLD_SIZE": "2", "RANK": "0"}, WorldInfo(2, 0, 0, "torchrun")),
    (
        {
            "SLURM_NTASKS": "8",
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "1234567",
        },
        WorldInfo(8, 5, 1, "slurm", "gpu07", 19567),  # Lightning's rules: first node, 15000 + last 4 digits
    ),  # fmt: skip
    (
        {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "2222"},
        WorldInfo(2, 1, 0, "slurm", "n1", 2222),
    ),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, WorldInfo(1, 0, 0, "slurm")),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "interactive"}, WorldInfo(1, 0, 0, "single")),  # salloc shell
    ({"WORLD_SIZE": "2", "RANK": "1", "SLURM_NTASKS": "8"}, WorldInfo(2, 1, 0, "torchrun")),  # torchrun in SLURM
]


def test_json_payload_owns_its_memory() -> None:
    # A collective's input whose storage is a Python buffer needs the GIL when a gloo worker thread frees it, which
    # aborts the process at interpreter exit ("terminate called without an active exception", seen in CI).
    payload = encode_json({"ranks": [0, 1], "ok": True})
    assert payload.dtype == torch.uint8
    assert payload.untyped_storage().resizable()  # torch-owned; a frombuffer view of a bytearray is not
    assert json.loads(bytes(payload.numpy()).decode()) == {"ranks": [0, 1], "ok": True}


@pytest.mark.parametrize(("environ", "expected"), DETECT_CASES)
def test_detect_world(environ: dict[str, str], expected: WorldInfo) -> None:
    assert detect_world(environ) == expected


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "rank 2"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "world size 0"),
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
    ],
)
def test_detect_world_rejects_bad_environment(environ: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detect_world(environ)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
@pytest.mark.parametrize(("device", "expected"), [(None, "cpu"), ("cpu", "cpu")])
def test_rank_device_without_cuda(device: str | None, expected: str) -> None:
    assert rank_device(device, local_rank=1) == torch.device(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_rank_device_refuses_missing_cuda() -> None:
    with pytest.raises(ValueError, match="device='cuda'"):
        rank_device("cuda", local_rank=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("local_rank", [0, 1, 9])
def test_rank_device_picks_local_gpu(local_rank: int) -> None:
    expected = torch.device("cuda", local_rank % torch.cuda.device_count())
    assert rank_device(None, local_rank) == expected
    assert rank_device("cuda", local_rank) == expected


# --------------------------------------------------------------------------------------------------------------
# One process: the fallback, and the whole protocol on a world of one
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed_merge")


@pytest.fixture(scope="module")
def nan_tvs(root: Path, dense_tvs: list[Path]) -> list[Path]:
    """The dense task vectors, but the second one has a NaN in one matrix (caught only when that tensor is read)."""
    folder = dense_tvs[1]
    deltas = dense_deltas(folder)
    deltas[NAN_KEY][0, 0] = float("nan")
    bad = write_task_vector(root / "tv_nan" / folder.name, deltas, read_head(folder), read_meta(folder))
    return [dense_tvs[0], bad, dense_tvs[2]]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def world_of_one(no_launcher: None):
    """An initialised gloo group of one process, destroyed afterwards so no other test sees it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    yield
    dist.destroy_process_group()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_merged_delta(folder))


def _assert_same_tensors(got: Path, ref: Path) -> None:
    a, b = _tensors(got), _tensors(ref)
    assert sorted(a) == sorted(b)
    different = [k for k in b if not torch.equal(a[k], b[k])]
    assert not different, f"{got}: tensors differ from {ref}: {different[:5]}"


def _assert_same_files(got: Path, ref: Path) -> None:
    names = sorted(p.name for p in (ref / MERGED_DIR).iterdir())
    assert sorted(p.name for p in (got / MERGED_DIR).iterdir()) == names
    _, mismatch, errors = filecmp.cmpfiles(ref / MERGED_DIR, got / MERGED_DIR, names, shallow=False)
    assert not mismatch and not errors, f"{got}: files differ from {ref}: {mismatch + errors}"
    for task in ("task0", "task1", "task2"):
        _, mismatch, errors = filecmp.cmpfiles(
            ref / "heads" / task, got / "heads" / task, ["head.safetensors", "meta.json"], shallow=False
        )
        assert not mismatch and not errors


def test_fallback_without_launcher_is_the_single_process_merge(
    root: Path, dense_tvs: list[Path], no_launcher: None, one_thread: None
) -> None:
    ref = merge_task_vectors(dense_tvs, "drm_v", root / "fb_ref", progress=False, max_shard_bytes=SHARD)
    got = merge_task_vectors_distributed(dense_tvs, "drm_v", root / "fb_got", progress=False, max_shard_bytes=SHARD)
    assert not dist.is_initialized()  # no process group for a plain run
    assert got.merged_parameters == ref.merged_parameters
    _assert_same_files(root / "fb_got", root / "fb_ref")
    assert "distributed" not in read_merge_record(root / "fb_got")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "interleaved"}, "layout='interleaved'"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"timeout_s": float("nan")}, "timeout_s=nan"),
        ({"max_shard_bytes": 0}, "max_shard_bytes=0"),
    ],
)
def test_bad_options_fail_before_any_work(root: Path, dense_tvs: list[Path], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_task_vectors_distributed(dense_tvs, "drm_v", root / "never", **kwargs)
    assert not (root / "never").exists()


@pytest.mark.parametrize(("method", "layout"), [("drm_v", "canonical"), ("ties", "per_rank")])
def test_world_of_one_runs_the_protocol(
    root: Path, dense_tvs: list[Path], world_of_one: None, one_thread: None, method: str, layout: str
) -> None:
    ref = root / f"one_ref_{method}"
    merge_task_vectors(dense_tvs, method, ref, progress=False, max_shard_bytes=SHARD)
    out = root / f"one_{method}_{layout}"
    result = merge_task_vectors_distributed(
        dense_tvs, method, out, progress=False, max_shard_bytes=SHARD, layout=layout
    )
    _assert_same_tensors(out, ref)
    if layout == "canonical":
        _assert_same_files(out, ref)
    record = read_merge_record(out)
    assert record["distributed"]["world_size"] == 1
    assert record["distributed"]["layout"] == layout
    assert record["distributed"]["ranks"][0]["parameters"] == result.merged_parameters == record["merged_parameters"]
    assert not list(root.glob(f".{out.name}.tmp-*"))  # the staging folder is gone


def test_world_of_one_error_leaves_nothing(root: Path, nan_tvs: list[Path], world_of_one: None) -> None:
    out = root / "one_nan"
    with pytest.raises(TaskVectorError, match=NAN_KEY):
        distributed_merge(nan_tvs, "drm_v", out, progress=False)
    assert not out.exists()
    assert not list(root.glob(f".{out.name}*"))
    # The group is still usable: a good merge right after the failed one works.
    distributed_merge(nan_tvs[:1], "ties", root / "one_after_error", progress=False)
    assert (root / "one_after_error" / MERGE_FILE).is_file()


# --------------------------------------------------------------------------------------------------------------
# Two processes under torchrun
# --------------------------------------------------------------------------------------------------------------

WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
from drm_lightning.world import detect_world

spec = json.loads(open(sys.argv[1]).read())
out = []
for job in spec["jobs"]:
    try:
        result = merge_task_vectors_distributed(
            job["task_vectors"], job["method"], job["output"], job.get("params"),
            progress=False, max_shard_bytes=spec["shard"], layout=job["layout"], device="cpu", timeout_s=120,
        )
        out.append({"ok": True, "merged": result.merged_parameters, "device": result.device})
    except Exception as err:
        out.append({"ok": False, "type": type(err).__name__, "user": isinstance(err, ValueError), "error": str(err)})
with open(os.path.join(spec["results"], f"rank{detect_world().rank}.json"), "w") as f:
    json.dump(out, f)
"""

#: (name, method, task vectors fixture, layout, params, expected error substring or None)
TWO_PROCESS_JOBS = [
    ("drm_v", "drm_v", "dense", "canonical", None, None),
    ("drm_v_per_rank", "drm_v", "dense", "per_rank", None, None),
    ("drm_v_lora", "drm_v", "lora", "canonical", None, None),
    ("ties", "ties", "dense", "canonical", None, None),
    ("dare", "dare", "dense", "canonical", {"drop_rate": 0.5, "seed": 3}, None),
    ("nan", "drm_v", "nan", "canonical", None, NAN_KEY),  # fails on the rank that reads it, raised on both
    ("bad_param", "ties", "dense", "canonical", {"density": 2.0}, "density"),  # fails in rank 0's validation
]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one_bit_for_bit(
    root: Path, dense_tvs: list[Path], lora_tvs: list[Path], nan_tvs: list[Path], one_thread: None
) -> None:
    inputs = {"dense": dense_tvs, "lora": lora_tvs, "nan": nan_tvs}
    work = root / "two"
    (work / "results").mkdir(parents=True)
    jobs = [
        {"name": name, "method": method, "task_vectors": [str(p) for p in inputs[tvs]], "layout": layout,
         "params": params, "output": str(work / name)}
        for name, method, tvs, layout, params, _ in TWO_PROCESS_JOBS
    ]  # fmt: skip
    (work / "worker.py").write_text(WORKER)
    (work / "spec.json").write_text(json.dumps({"jobs": jobs, "shard": SHARD, "results": str(work / "results")}))
    proc = start([str(work / "worker.py"), str(work / "spec.json")], work / "launch.log", 2)  # DRM_TEST_LAUNCH
    with reaped(proc):
        # The single-process references, computed while the two ranks start up.
        for job, (_, _, _, _, _, error) in zip(jobs, TWO_PROCESS_JOBS, strict=True):
            if error is None:
                merge_task_vectors(
                    job["task_vectors"], job["method"], work / f"{job['name']}_ref", job["params"],
                    progress=False, max_shard_bytes=SHARD, device="cpu",
                )  # fmt: skip
        stdout = finish(proc, work / "launch.log", time.monotonic() + 240)
    assert proc.returncode == 0, stdout[-4000:]
    ranks = [json.loads((work / "results" / f"rank{r}.json").read_text()) for r in (0, 1)]

    for i, (name, _, _, layout, _, error) in enumerate(TWO_PROCESS_JOBS):
        out, ref = work / name, work / f"{name}_ref"
        got = [rank[i] for rank in ranks]
        if error is not None:
            assert [g["ok"] for g in got] == [False, False], got
            assert all(g["user"] and error in g["error"] for g in got), got  # both ranks name the cause
            assert sum("rank " in g["error"] and "failed" in g["error"] for g in got) == 1  # one hears it remotely
            assert not out.exists() and not list(work.glob(f".{name}*")), f"{name}: left files behind"
            continue
        assert all(g["ok"] for g in got), got
        _assert_same_tensors(out, ref)
        if layout == "canonical":
            _assert_same_files(out, ref)
        else:
            assert all("rank" in p.name for p in (out / MERGED_DIR).glob("*.safetensors"))
        record, ref_record = read_merge_record(out), read_merge_record(ref)
        for key in ("method", "params", "coefficients", "inputs", "plan", "rule_counts", "merged_parameters"):
            assert record[key] == ref_record[key], key
        shares = record["distributed"]["ranks"]
        assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
        assert [s["parameters"] > 0 for s in shares] == [True, True]  # both ranks really merged something
        assert sum(s["parameters"] for s in shares) == record["merged_parameters"] == got[0]["merged"]
        assert not list(work.glob(f".{name}.tmp-*"))


# --------------------------------------------------------------------------------------------------------------
# The CLI: `drm-lightning merge` under torchrun
# --------------------------------------------------------------------------------------------------------------


def _model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.multiprocess
def test_cli_merge_under_torchrun_equals_one_process(root: Path, dense_tvs: list[Path]) -> None:
    """Two ranks share Δ_merged; rank 0 alone writes the model folder, whose tensors equal a one-process run's."""
    env = pipeline_env()
    work = root / "cli"
    work.mkdir()
    tvs = "[" + ",".join(map(str, dense_tvs)) + "]"
    args = ["merge", "--task_vectors", tvs, "--method", "drm_v", "--lam", "1.0", "--device", "cpu"]
    two = start(["-m", "drm_lightning.cli", *args, "--output", str(work / "two")], work / "two.log", 2)
    with reaped(two):
        one = subprocess.run(
            [sys.executable, "-m", "drm_lightning.cli", *args, "--output", str(work / "one")],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        two_out = finish(two, work / "two.log", time.monotonic() + 120)
    assert one.returncode == 0, one.stderr[-4000:]
    assert two.returncode == 0, two_out[-4000:]
    assert two_out.count("merged model:") == 1, two_out[-4000:]  # one rank wrote the folder
    assert read_merge_record(work / "two_delta")["distributed"]["world_size"] == 2
    got, ref = _model_tensors(work / "two"), _model_tensors(work / "one")
    assert got and sorted(got) == sorted(ref)
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []
    assert sorted(p.name for p in (work / "two").rglob("*")) == sorted(p.name for p in (work / "one").rglob("*"))


@pytest.mark.parametrize(
    ("environ", "source"),
    [({"WORLD_SIZE": "2", "RANK": "0"}, "torchrun"), ({"WORLD_SIZE": "2", "RANK": "1"}, "torchrun")],
)
def test_cli_merge_refuses_lambda_search_on_several_processes(
    root: Path, dense_tvs: list[Path], no_launcher: None, monkeypatch: pytest.MonkeyPatch, environ, source: str
) -> None:
    from drm_lightning.commands.merge import merge

    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    out = root / f"search_{environ['RANK']}"
    with pytest.raises(ValueError, match=rf"lam='search' under {source} \(2 processes\).*--lam"):
        merge([str(p) for p in dense_tvs], str(out), method="drm_v", lam="search", tasks=["unused.yaml"])
    assert not out.exists() and not Path(f"{out}_delta").exists()


def test_a_killed_merges_staging_is_removed_by_the_next(
    root: Path, dense_tvs: list[Path], world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's staging folder carries its host and pid, so a SIGKILLed merge's leftovers go with the next merge."""
    from drm_lightning.io.atomic import temporary_prefix
    from drm_lightning.merging.engine import distributed as dist_module

    staged: list[Path] = []
    real_share = dist_module._merge_share

    def spy(setup, share, part, *args, **kwargs):
        staged.append(part.parent)
        return real_share(setup, share, part, *args, **kwargs)

    monkeypatch.setattr(dist_module, "_merge_share", spy)

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is dead now
    out = root / "after_kill"
    stale = root / temporary_prefix(out).replace(f"-{os.getpid()}-", f"-{child.pid}-")
    stale = stale.with_name(stale.name + "parts-x1")
    (stale / "rank00000").mkdir(parents=True)
    distributed_merge(dense_tvs, "ties", out, progress=False)
    assert (out / MERGE_FILE).is_file() and not stale.exists()
    assert [p.name.startswith(temporary_prefix(out)) for p in staged] == [True]  # named for the stale cleanup
    assert not list(root.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize(("layout", "copies_fit", "refused"), [("canonical", 1, True), ("canonical", 2, False),
                                                             ("per_rank", 1, False)])  # fmt: skip
def test_canonical_layout_needs_room_for_two_copies(
    root: Path, dense_tvs: list[Path], world_of_one: None, monkeypatch: pytest.MonkeyPatch,
    layout: str, copies_fit: int, refused: bool,
) -> None:  # fmt: skip
    from drm_lightning.io import disk as io_disk
    from drm_lightning.io.disk import InsufficientSpaceError, with_margin
    from drm_lightning.merging.engine.space import check_merge_space

    needed = check_merge_space(dense_tvs, root / "probe", copies=copies_fit)  # bytes for this many copies of Δ
    monkeypatch.setattr(io_disk, "disk_free_bytes", lambda path: with_margin(needed))
    out = root / f"space_{layout}_{copies_fit}"
    if refused:
        with pytest.raises(InsufficientSpaceError, match=out.name):
            distributed_merge(dense_tvs, "ties", out, progress=False, layout=layout)
        assert not out.exists() and not list(root.glob(f".{out.name}*"))
    else:
        distributed_merge(dense_tvs, "ties", out, progress=False, layout=layout)
        assert (out / MERGE_FILE).is_file()
