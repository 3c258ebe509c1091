"""The merge speed benchmark: its harness on tiny shapes, and the straightforward reference it scores against."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import merge_scaling  # noqa: E402
import merge_speed  # noqa: E402

from drm_lightning.merging import functional, reference  # noqa: E402

TINY = ["--device", "cpu", "--scale", "128", "--tasks", "3", "--repeats", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: a second intra-op thread only waits for the first (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One full benchmark run on every method and matrix at 1/128 of Llama-3.1-8B, read back from its JSON."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    report = merge_speed.main([*TINY, "--json", str(out)])
    return json.loads(out.read_text()), merge_speed.format_report(report)


MERGES = [key for key, method in merge_speed.METHODS.items() if method.inputs != "learn"]
LEARNERS = [key for key, method in merge_speed.METHODS.items() if method.inputs == "learn"]


def test_json_has_every_method_with_finite_numbers(tiny_run: tuple[dict, str]) -> None:
    data, _ = tiny_run
    assert list(data["methods"]) == list(merge_speed.METHODS)
    assert data["shapes"] == {name: [max(1, d // 128) for d in s] for name, s in merge_speed.LLAMA31_8B_LAYER.items()}
    assert set(data["floors"]) == {"rows", "columns", "sum", "each", "solve", "product", "step"}
    for kind, floor in data["floors"].items():
        assert floor["seconds_per_layer"] > 0
        assert set(floor["seconds_per_matrix"]) == (set() if kind == "step" else set(data["shapes"]))
    assert data["floors"]["rows"]["gram_size"] == {"q": 32, "k": 24, "v": 24, "o": 32, "gate": 32, "up": 32, "down": 96}
    inputs = {name: shape[1] for name, shape in data["shapes"].items()}  # RegMean's and WUDI's in-sided systems
    assert data["floors"]["solve"]["gram_size"] == inputs == data["floors"]["product"]["gram_size"]
    for result in data["methods"].values():
        assert (result["floor"] is None) == (result["key"] in ("ties", "task-arithmetic"))
        if result["key"] in LEARNERS:
            assert list(result["impls"]) == ["drm_lightning"] and result["speedup"] is None
            impl = result["impls"]["drm_lightning"]
            assert impl["seconds_per_layer"] > 0 and impl["rel_error"] is None and math.isfinite(impl["floor_multiple"])
            assert result["params"]["columns"] == (1 if result["params"]["form"] == "layer" else 3)
            continue
        assert set(result["impls"]) == {"drm_lightning", "naive"}
        assert math.isfinite(result["speedup"]) and result["speedup"] > 0
        for impl in result["impls"].values():
            assert math.isfinite(impl["seconds_per_layer"]) and impl["seconds_per_layer"] > 0
            assert set(impl["seconds_per_matrix"]) == set(merge_speed.LLAMA31_8B_LAYER)
            assert math.isfinite(impl["rel_error"])
            assert (impl["floor_multiple"] is None) == (result["floor"] is None)
            assert impl["floor_multiple"] is None or math.isfinite(impl["floor_multiple"])
            assert impl["peak_bytes"] >= 0
    topk = data["topk"]
    assert topk["entries"] == 3 * 112 * 32 and topk["keep"] == round(0.2 * topk["entries"])
    assert topk["kthvalue_s"] > 0 and topk["topk_s"] > 0


@pytest.mark.parametrize("method", MERGES)
def test_library_matches_float64_reference(tiny_run: tuple[dict, str], method: str) -> None:
    """The acceptance bar of docs/methods.md: within 1e-3 of a float64 evaluation of the contract."""
    impl = tiny_run[0]["methods"][method]["impls"]["drm_lightning"]
    assert impl["rel_error"] <= 1e-3
    assert max(impl["rel_error_per_matrix"].values()) <= 1e-3


def test_table_lists_every_method(tiny_run: tuple[dict, str]) -> None:
    _, table = tiny_run
    for method in merge_speed.METHODS.values():
        assert any(line.startswith(method.name) for line in table.splitlines()), method.name
    assert "kthvalue" in table and "floor" in table
    assert f"{merge_speed.WUDI_STEPS} Adam steps per matrix" in table
    assert "seconds per optimiser step over the layer, 3 delta(s) per matrix" in table


def test_bfloat16_subset_scores_against_rounded_inputs(tmp_path: Path) -> None:
    """bf16 deltas: the reference sees the same rounded values, so the library stays within 1e-3."""
    out = tmp_path / "bf16.json"
    args = [*TINY, "--dtype", "bfloat16", "--methods", "drm-h", "iso-cts", "--layers", "k", "down"]
    merge_speed.main([*args, "--no-topk", "--json", str(out)])
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["drm-h", "iso-cts"] and list(data["shapes"]) == ["k", "down"]
    assert data["topk"] is None
    for result in data["methods"].values():
        assert result["impls"]["drm_lightning"]["rel_error"] <= 1e-3


def test_naive_only_without_reference_on_the_process_clock(tmp_path: Path) -> None:
    out = tmp_path / "naive.json"
    args = ["--impls", "naive", "--no-reference", "--no-topk", "--methods", "ties", "--clock", "process"]
    merge_speed.main([*TINY, *args, "--threads", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["config"]["clock"] == "process" and data["machine"]["torch_threads"] == 2
    assert torch.get_num_threads() == 1  # main restores the caller's thread count
    result = data["methods"]["ties"]
    assert list(result["impls"]) == ["naive"] and result["speedup"] is None
    assert result["impls"]["naive"]["rel_error"] is None


@pytest.mark.parametrize(
    ("methods", "extra", "floors"),
    [
        (["ties", "iso-c"], [], {"sum"}),  # only the floors the chosen methods need, timed when first needed
        (["iso-c", "learn-layer"], ["--no-floors"], set()),
    ],
)
def test_floors_of_the_chosen_methods(tmp_path: Path, methods: list[str], extra: list[str], floors: set[str]) -> None:
    out = tmp_path / "floors.json"
    merge_speed.main([*TINY, "--no-topk", "--no-reference", "--methods", *methods, *extra, "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["floors"]) == floors
    for result in data["methods"].values():
        multiples = {impl["floor_multiple"] is None for impl in result["impls"].values()}
        assert multiples == {result["floor"] not in floors}


def test_keep_going_reports_a_failed_method_and_runs_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_method = merge_speed.run_method

    def fails_on_iso_c(method, *args, **kwargs):
        if method.key == "iso-c":
            raise RuntimeError("CUDA out of memory (planted)")
        return run_method(method, *args, **kwargs)

    monkeypatch.setattr(merge_speed, "run_method", fails_on_iso_c)
    out = tmp_path / "keep.json"
    argv = [*TINY, "--no-topk", "--no-reference", "--methods", "iso-c", "ties", "--json", str(out)]
    report = merge_speed.main([*argv, "--keep-going"])
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["ties"]
    assert data["errors"] == {"iso-c": "RuntimeError: CUDA out of memory (planted)"}
    assert "iso-c FAILED: RuntimeError" in merge_speed.format_report(report)
    with pytest.raises(RuntimeError, match="planted"):  # without --keep-going the run stops there
        merge_speed.main(argv)


@pytest.mark.parametrize(("slow_call_s", "calls"), [(None, 3), (1e9, 3), (0.0, 2)])
def test_slow_warmup_counts_as_the_first_run(slow_call_s: float | None, calls: int) -> None:
    """--slow-call-s: a warm-up at least that long is the first of the timed runs; never with None."""
    counts = {"q": 0, "k": 0}

    def call(name: str) -> torch.Tensor:
        counts[name] += 1
        return torch.zeros(2)

    result = merge_speed.measure(
        call, list(counts), None, merge_speed.Timer(torch.device("cpu")), 2, "auto", slow_call_s
    )
    assert counts == {"q": calls, "k": calls}
    assert len(result.repeats_seconds) == 2 and set(result.seconds_per_matrix) == {"q", "k"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "tpu"], "--device"),
        (["--scale", "0"], "--scale"),
        (["--tasks", "0"], "--tasks"),
        (["--repeats", "0"], "--repeats"),
        (["--methods", "drm-x"], "drm-x"),
        (["--layers", "lm_head"], "lm_head"),
        (["--impls", "mergekit"], "mergekit"),
        (["--dtype", "float16"], "--dtype"),
        (["--memory", "valgrind"], "--memory"),
        (["--threads", "0"], "--threads"),
        (["--clock", "sundial"], "--clock"),
        (["--wudi-steps", "0"], "--wudi-steps"),
        (["--slow-call-s", "-1"], "--slow-call-s"),
        (["--methods", "learn-task", "--layers", "q", "k"], "--layers"),
        (["--methods", "learn-layer", "--scale", "3"], "--scale 3"),
    ],
)
def test_bad_arguments_name_the_option(argv: list[str], message: str) -> None:
    args = ["--device", "cpu", *argv] if argv[0] != "--device" else argv
    with pytest.raises(ValueError, match=message):
        merge_speed.main(args)


def test_synthetic_grams_are_input_grams_of_the_right_shape() -> None:
    """RegMean's benchmark statistics: symmetric, positive definite ``[in, in]`` means of unit-variance rows."""
    shapes = merge_speed.scaled_shapes(["k", "down"], 64)
    grams = merge_speed.make_grams(shapes, 2, torch.device("cpu"), seed=0)
    for name, (_, cols) in shapes.items():
        assert len(grams[name]) == 2 and not torch.equal(grams[name][0], grams[name][1])
        for gram in grams[name]:
            assert gram.shape == (cols, cols) and gram.dtype == torch.float32
            torch.testing.assert_close(gram, gram.mT)
            assert float(torch.linalg.eigvalsh(gram.double()).min()) > 0
            assert abs(float(gram.diagonal().mean()) - 1.0) < 0.15  # N = 2·in rows of variance 1


def test_learner_floor_runs_the_learner_forward_at_fixed_weights() -> None:
    """The floor times the learner's own forward (same loss at the same merged weights) without the coefficients,
    and one learner step moves every coefficient (the gradient reaches them through the layer set)."""
    deltas = merge_speed.make_deltas(merge_speed.scaled_shapes(list(merge_speed.LLAMA31_8B_LAYER), 128), 3,
                                     torch.float32, torch.device("cpu"), seed=0)  # fmt: skip
    bench = merge_speed.LearnerBench.build(deltas, 128, torch.device("cpu"), seed=0)
    for form, columns in (("layer", 1), ("task", 3)):
        module = bench.module(form)
        assert tuple(module.coefficients.shape) == (7, columns)
        weights = module.merged_parameters()
        learner = sum(module.task_loss(t, bench.batch[t], weights) for t in bench.batch)
        fixed = {name: w.detach() for name, w in weights.items()}
        floor = sum(module.task_loss(t, bench.batch[t], fixed) for t in bench.batch)
        assert float(learner.detach()) == float(floor) and math.isfinite(float(floor))
        before = module.coefficients.detach().clone()
        merge_speed.learner_step(module, bench.batch)()
        assert bool((module.coefficients.detach() != before).all())


# -- the straightforward implementations are the reference, so they are checked on their own ---------------------


def _deltas(tasks: int, shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(tasks)]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("drm", {"direction": "vertical", "drop_rate": 0.7}),
        ("drm", {"direction": "horizontal", "drop_rate": 0.7}),
        ("iso_c", {}),
        ("iso_cts", {"common_fraction": 0.6}),
        ("tsv_m", {}),
    ],
)
@pytest.mark.parametrize("shape", [(14, 9), (9, 14)])
def test_naive_float64_agrees_with_library(method: str, params: dict, shape: tuple[int, int]) -> None:
    """Two independent float64 evaluations of the contract (SVD vs Gram eigh, kthvalue vs topk) must coincide."""
    deltas = _deltas(3, shape)
    coefficients = [0.5, 1.0, 1.5]
    expected = getattr(reference, method)(deltas, coefficients=coefficients, **params, dtype=torch.float64)
    actual = getattr(functional, method)(deltas, coefficients=coefficients, **params)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize(("numel", "fraction"), [(100, 0.2), (101, 0.5), (7, 0.0), (7, 1.0), (10, 0.05)])
def test_keep_top_fraction_keeps_exactly_round_q_n(numel: int, fraction: float) -> None:
    order = torch.randperm(numel, generator=torch.Generator().manual_seed(1)).double()
    x = (order + 1) * (-1) ** order  # distinct non-zero magnitudes, both signs
    kept = reference.keep_top_fraction(x, fraction)
    count = round(fraction * numel)
    assert int((kept != 0).sum()) == count
    if count:
        assert float(kept.abs()[kept != 0].min()) >= float(x.abs().sort(descending=True).values[count - 1])


def test_elect_and_merge_by_hand() -> None:
    blocks = torch.tensor([[2.0, -1.0, 0.0, 1.0], [-3.0, -1.0, 0.0, -1.0], [4.0, 5.0, 0.0, 0.0]])
    coefficients = torch.tensor([1.0, 2.0, 0.5]).view(3, 1)
    # sums 3 (+), 3 (+), 0 (+, nothing survives), 0 (+): survivors {0,2}, {2}, {}, {0}
    expected = torch.tensor([(2.0 + 0.5 * 4.0) / 2, 0.5 * 5.0, 0.0, 1.0])
    torch.testing.assert_close(reference.elect_and_merge(blocks, coefficients), expected)


@pytest.mark.parametrize("method", ["drm", "iso_c", "iso_cts", "tsv_m"])
def test_naive_zero_deltas_give_zero(method: str) -> None:
    merged = getattr(reference, method)([torch.zeros(6, 4)] * 2, dtype=torch.float64)
    assert merged.shape == (6, 4) and not merged.any()


def test_naive_tsv_m_of_one_task_is_the_task() -> None:
    (delta,) = _deltas(1, (8, 5))
    torch.testing.assert_close(reference.tsv_m([delta], dtype=torch.float64), delta)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: reference.task_arithmetic([]), "empty"),
        (lambda: reference.ties([torch.ones(2), torch.ones(3)]), "one shape"),
        (lambda: reference.drm([torch.ones(2, 2)], direction="diagonal"), "direction"),
        (lambda: reference.iso_c([torch.ones(2)]), "2-D"),
        (lambda: reference.task_arithmetic([torch.ones(2)], coefficients=[1.0, 2.0]), "coefficients"),
        (lambda: reference.tsv_m([torch.ones(2, 2)] * 3), "TSV-M"),
    ],
)
def test_naive_bad_input_raises(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# -- measuring ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["procfs", "psutil"])
def test_peak_memory_sees_a_temporary_allocation(backend: str) -> None:
    if backend == "procfs" and not merge_speed.procfs_peak_available():
        pytest.skip("no resettable peak RSS on this system")
    with merge_speed.PeakMemory(torch.device("cpu"), backend) as memory:
        block = torch.ones(16 * 2**20 // 8, dtype=torch.float64)  # 16 MiB, touched
        time.sleep(0.2)  # long enough for the psutil sampler, even on a loaded machine
        del block
    assert memory.peak_bytes >= 15 * 2**20


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        ("rows", (7, 3), lambda ds: sum(d.T @ d for d in ds)),  # sum_i D_i^T D_i, 3 x 3
        ("rows", (2, 9), lambda ds: torch.cat(ds) @ torch.cat(ds).T),  # the stack is 4 x 9: its 4 x 4 side
        ("columns", (3, 7), lambda ds: sum(d @ d.T for d in ds)),  # sum_i D_i D_i^T, 3 x 3
        ("columns", (9, 2), lambda ds: torch.cat(ds, 1).T @ torch.cat(ds, 1)),  # the stack is 9 x 4
        ("sum", (7, 3), lambda ds: sum(ds).T @ sum(ds)),
        ("each", (3, 7), lambda ds: torch.stack([d @ d.T for d in ds])),
    ],
)
def test_floor_grams_take_the_smaller_side(kind: str, shape: tuple[int, int], expected) -> None:
    deltas = _deltas(2, shape)
    torch.testing.assert_close(merge_speed.FLOOR_GRAMS[kind](torch.stack(deltas)), expected(deltas))


# -- merge_scaling.py ---------------------------------------------------------------------------------------------

TINY_MODEL = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--vocab", "32", "--head-dim", "16"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--processes", "1", "0"], "--processes"),
        (["--threads", "0"], "--threads"),
        (["--hidden", "40"], "--hidden"),
        (["--layers", "0"], "--layers"),
        (["--device", "tpu"], "--device"),
        (["--params", "{drop"], "--params"),
        (["--params", "[0.9]"], "--params"),
        (["--method", "drm_z"], "drm_z"),
        (["--params", '{"drop_rate": 2}'], "drop_rate"),
    ],
)
def test_scaling_bad_arguments_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_scaling.main(argv)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_scaling_one_process_in_process_two_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole harness: inputs, the worker, a real 2-process torchrun (gloo, CPU), speed-ups, the bit-for-bit check.

    The 1-process merge runs in this process (one interpreter start-up fewer); it must still equal the 2-process one.
    """
    real_launch = merge_scaling.launch

    def launch(processes: int, spec: dict, folder: Path, timeout_s: float) -> tuple[float, list[dict]]:
        if processes > 1:
            return real_launch(processes, spec, folder, timeout_s)
        Path(spec["results"]).mkdir(parents=True)
        (folder / "spec.json").write_text(json.dumps(spec))
        merge_scaling.worker(folder / "spec.json")
        return 0.5, [json.loads((Path(spec["results"]) / "rank0.json").read_text())]

    for var in merge_scaling.LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(merge_scaling, "launch", launch)
    out = tmp_path / "scaling.json"
    args = [*TINY_MODEL, "--tasks", "2", "--processes", "1", "2", "--method", "iso_c", "--timeout", "300"]
    report = merge_scaling.main([*args, "--workdir", str(tmp_path / "work"), "--json", str(out)])
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert [run["processes"] for run in runs] == [1, 2]
    assert [len(run["rank_seconds"][0]) for run in runs] == [1, 2]
    assert [run["identical"] for run in runs] == [None, True]
    assert runs[0]["speedup"] == 1.0 and math.isfinite(runs[1]["speedup"])
    for run in runs:
        assert len(run["repeats_merge_seconds"]) == 1 and run["launch_seconds"] > 0
        assert run["merge_seconds"] > 0 and 0 < run["math_seconds"] <= run["merge_seconds"]
        assert run["cpu_seconds"] > 0
    # 1 layer: q, o 32x32; k, v 16x32 (one k/v head of 16); gate, up, down 64x32; 2 norms; embeddings 32x32; norm
    assert data["parameters"] == 2 * 1024 + 2 * 512 + 3 * 2048 + 2 * 32 + 32 * 32 + 32
    assert data["task_vector_bytes"] > 2 * 4 * data["parameters"]
    assert "identical to 1" in merge_scaling.format_report(report)


def test_param_sweep_runs_and_matches_separate_merges(tmp_path: Path) -> None:
    """The sweep benchmark on tiny shapes: every method, finite times, sweep outputs equal to separate merges."""
    import param_sweep

    out = tmp_path / "sweep.json"
    results = param_sweep.main(
        ["--device", "cpu", "--scale", "128", "--tasks", "3", "--repeats", "1", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == list(param_sweep.SWEEPS)
    for r in results:
        assert r.one_merge_s > 0 and r.sweep_s > 0 and len(r.values) == 4
        assert r.max_difference <= (0.0 if r.method.startswith("drm") else 1e-6), r  # DRM: the same computation
    with pytest.raises(SystemExit):
        param_sweep.main(["--methods", "ties"])


# -- merge_memory.py and merge_precision.py: tiny runs, so a refactor cannot silently break them ------------------


def test_merge_memory_in_process_table_has_every_method_and_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every method on every shape at Llama / 256 (T = 3): one row per pair, finite ratios, the printed table."""
    import merge_memory

    out = tmp_path / "memory.json"
    rows = merge_memory.main(["--device", "cpu", "--in-process", "--scale", "256", "--tasks", "3", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["scale"] == 256 and data["tasks"] == 3 and data["rows"] == rows
    shapes = {name: merge_memory.scaled(shape, 256) for name, (shape, _) in merge_memory.LLAMA31_8B.items()}
    assert shapes == {"q": (16, 16), "down": (16, 56), "gate": (56, 16), "embed": (501, 16)}
    assert [(r["method"], tuple(r["shape"])) for r in rows] == [
        (method, shape) for method in merge_memory.VARIANTS for shape in shapes.values()
    ]
    for row in rows:
        expected_rule = merge_memory.LLAMA31_8B[next(k for k, s in shapes.items() if s == tuple(row["shape"]))][1]
        assert row["rule"] == expected_rule and row["tasks"] == 3 and row["device"] == "cpu"
        assert row["input_bytes"] == 3 * row["shape"][0] * row["shape"][1] * 4
        assert row["peak_bytes"] >= 0 and math.isfinite(row["ratio"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("T = 3, cpu, Llama-3.1-8B shapes / 256")
    assert table[1] == "| method | q 16×16 | down 16×56 | gate 56×16 | embed 501×16 (elementwise) |"
    body = [line for line in table[3:] if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in body] == list(merge_memory.VARIANTS)
    assert all(line.count("×") == len(shapes) for line in body)


def test_merge_memory_keep_going_reports_a_failed_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merge_memory

    measure = merge_memory.measure_in_process

    def fails_on_ties(variant, *args, **kwargs):
        if variant == "ties":
            raise RuntimeError("CUDA out of memory (planted)")
        return measure(variant, *args, **kwargs)

    monkeypatch.setattr(merge_memory, "measure_in_process", fails_on_ties)
    out = tmp_path / "memory.json"
    argv = ["--device", "cpu", "--in-process", "--scale", "256", "--tasks", "2", "--methods", "ties", "iso_c"]
    with pytest.raises(SystemExit, match=r"1 measurement\(s\) failed: RuntimeError: CUDA out of memory"):
        merge_memory.main([*argv, "--shapes", "q", "--keep-going", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [row["method"] for row in data["rows"]] == ["iso_c"] and [e["method"] for e in data["errors"]] == ["ties"]


def test_merge_memory_fresh_child_measures_one_method(tmp_path: Path) -> None:
    """The default CPU path: one fresh interpreter per measurement (``--child``), read back as JSON."""
    import merge_memory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out = tmp_path / "memory.json"
    rows = merge_memory.main(
        ["--device", "cpu", "--methods", "drm_v", "--shapes", "q", "--scale", "64", "--tasks", "2", "--threads", "1"]
        + ["--json", str(out)]
    )
    assert len(rows) == 1 and json.loads(out.read_text())["rows"] == rows
    (row,) = rows
    assert row["method"] == "drm_v" and row["shape"] == [64, 64] and row["rule"] == "matrix"
    assert row["input_bytes"] == 2 * 64 * 64 * 4 and row["peak_bytes"] >= 0 and math.isfinite(row["ratio"])
    with pytest.raises(SystemExit, match="unknown"):
        merge_memory.main(["--device", "cpu", "--methods", "drm_x"])


def test_merge_precision_random_deltas_every_method_and_route(tmp_path: Path) -> None:
    """Both float32 routes for every SVD method at Llama / 128: finite errors, and the float32 routes really ran in
    float32 (an error far above float64 rounding: a refactor that stops ``library_in`` from switching the working
    dtype would show up as a float32-gram error of ~1e-16)."""
    import merge_precision

    out = tmp_path / "precision.json"
    results = merge_precision.main(["--scale", "128", "--tasks", "3", "--threads", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["errors"] == results and "T = 3" in data["source"]
    assert list(results) == list(merge_precision.METHODS)
    for method, row in results.items():
        assert set(row) == set(merge_precision.ROUTES), method
        for route, error in row.items():
            assert math.isfinite(error) and 1e-10 < error < 1.0, (method, route, error)


def test_merge_precision_reads_real_task_vectors(tmp_path: Path) -> None:
    """``--task_vectors``: the 2-D parameters every folder holds, embeddings left out, ``--limit`` respected."""
    import merge_precision
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    folders = []
    for task in range(3):
        folder = tmp_path / f"task{task}"
        folder.mkdir()
        tensors = {
            "layer.0.dense.weight": torch.randn(12, 8, generator=generator),
            "layer.1.dense.weight": torch.randn(8, 12, generator=generator),
            "embeddings.word_embeddings.weight": torch.randn(20, 8, generator=generator),
            "layer.0.dense.bias": torch.randn(12, generator=generator),
        }
        if task == 0:
            tensors["only_in_one.weight"] = torch.randn(4, 4, generator=generator)
        save_file(tensors, str(folder / "task_vector.safetensors"))
        folders.append(folder)
    deltas = merge_precision.real_deltas(folders, None)
    assert sorted(deltas) == ["layer.0.dense.weight", "layer.1.dense.weight"]
    assert all(len(ds) == 3 and ds[0].dtype == torch.float32 for ds in deltas.values())
    assert list(merge_precision.real_deltas(folders, 1)) == ["layer.0.dense.weight"]
    argv = ["--task_vectors", *map(str, folders), "--methods", "drm-v", "iso-c", "--threads", "1"]
    results = merge_precision.main(argv)
    assert list(results) == ["drm-v", "iso-c"]
    assert all(math.isfinite(e) for row in results.values() for e in row.values())


def test_statistics_size_per_config_is_the_hand_count() -> None:
    """benchmarks/statistics_size.py against counts by hand from the architectures: MiniLM (6 layers: five 384-wide
    inputs and one 1536-wide per layer) and Llama-3.1-8B with LoRA on all seven projections (32 layers: six 4096-wide
    inputs and down_proj's 14336)."""
    import statistics_size

    root = BENCHMARKS.parent
    minilm, llama = statistics_size.main([str(root / "configs/model/minilm.yaml"),
                                          str(root / "configs/model/llama31_8b_lora.yaml")])  # fmt: skip
    assert minilm["layers"] == 36 and minilm["bytes_per_task"] == 6 * (5 * 384**2 + 1536**2) * 4
    assert llama["layers"] == 224 and llama["bytes_per_task"] == 32 * (6 * 4096**2 + 14336**2) * 4
    down = llama["kinds"]["layers.*.mlp.down_proj.weight"]
    assert (down["count"], down["width"], down["bytes_each"]) == (32, 14336, 14336**2 * 4)
