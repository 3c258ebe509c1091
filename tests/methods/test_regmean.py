"""RegMean (docs/methods.md, RegMean) against its float64 reference, its rule for a singular ``Σ G̃``, LoRA factors,
and merges of task vectors that carry input statistics (``io/statistics.py``), good and bad.

The Grams of the method tables come from random inputs ``X_i`` with fewer rows than columns (every single Gram is
singular, the sum is not), with per-feature scales spread over two orders of magnitude, so α matters.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

from drm_lightning.io.merged_delta import iter_merged_delta
from drm_lightning.io.statistics import STATISTICS_FILE, add_statistics, statistics_meta
from drm_lightning.io.task_vector import META_FILE, TaskVectorError, read_meta
from drm_lightning.merging import reference as ref
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.methods.registry import get_method
from drm_lightning.merging.methods.regmean import regmean
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers import delta_cases
from tests.helpers.merge_inputs import add_random_statistics, build_tiny_model, write_task_vectors

TOL_F32 = 1e-5
COEFFS = [1.0, 0.5, -0.3, 2.0]
F64 = torch.float64


def grams_for(cols: int, tasks: int, seed: int = 0, rows: int | None = None) -> list[Tensor]:
    """Per-row mean Grams ``X_iᵀX_i / rows`` of random inputs with spread feature scales."""
    gen = torch.Generator().manual_seed(seed)
    rows = rows if rows is not None else max(2, cols // 2)
    scales = torch.logspace(-1, 1, cols, dtype=F64)
    out = []
    for _ in range(tasks):
        x = torch.randn(rows, cols, generator=gen, dtype=F64) * scales + torch.randn(cols, generator=gen, dtype=F64)
        out.append(x.T @ x / rows)
    return out


def _case(case: str, shape: tuple[int, int], tasks: int = 4) -> tuple[list[Tensor], list[Tensor]]:
    seed = zlib.crc32(f"{case}{shape}".encode()) % 1000
    return delta_cases.make_deltas(case, shape, tasks, seed=seed), grams_for(shape[1], tasks, seed)


# --------------------------------------------------------------------------------------------------------------------
# The method against its reference
# --------------------------------------------------------------------------------------------------------------------

ISOTROPIC = (lambda x: x.T @ x / 64)(torch.randn(64, 16, generator=torch.Generator().manual_seed(1), dtype=F64))
CASES = ("random", "rank_deficient", "zero_task", "tiny_task", "all_zero", "clustered_tasks")


@pytest.mark.parametrize("alpha", [0.9, 0.0, 1.0])
@pytest.mark.parametrize("shape", [(48, 32), (32, 80)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, shape: tuple[int, int], alpha: float) -> None:
    deltas, grams = _case(case, shape)
    expected = ref.regmean(deltas, grams, alpha, COEFFS)
    out = regmean([d.float() for d in deltas], alpha, coefficients=COEFFS, statistics=[g.float() for g in grams])
    assert out.dtype == torch.float32 and out.shape == shape and torch.isfinite(out).all()
    assert ref.relative_error(out, expected) <= TOL_F32
    exact = regmean(deltas, alpha, coefficients=COEFFS, statistics=grams)
    assert exact.dtype == F64 and ref.relative_error(exact, expected) <= 1e-10
    if case == "all_zero":
        assert not out.any()


IDENTITIES = {
    "one task returns its delta": lambda d, g: (regmean(d[:1], statistics=g[:1]), d[0]),
    "equal Grams give the mean": lambda d, g: (regmean(d, statistics=[g[0]] * 4), ref.task_mean(d)),
    "no statistics give the mean": lambda d, g: (regmean(d), ref.task_mean(d)),
    "zero Grams give the mean": lambda d, g: (regmean(d, statistics=[0 * x for x in g]), ref.task_mean(d)),
    "a task's Gram scales its weight": lambda d, g: (regmean(d[:2], statistics=[ISOTROPIC, 1e8 * ISOTROPIC]), d[1]),
}


@pytest.mark.parametrize("name", list(IDENTITIES))
def test_identities(name: str) -> None:
    """What the equations give in special cases (the ridge's pull, ``ridge × condition``, stays under 1e-5)."""
    deltas, grams = _case("random", (24, 16))
    assert ref.relative_error(*IDENTITIES[name](deltas, grams)) <= 1e-5, name


def test_regression_optimum() -> None:
    """α = 1, tiny ridge: the gradient of ``Σ_i ‖X_i (Δ − Δ_i)ᵀ‖²`` vanishes at the result (RegMean's definition)."""
    deltas, grams = _case("random", (12, 10), tasks=3)
    grams = grams_for(10, 3, seed=3, rows=40)  # full-rank Grams: the exact optimum is unique
    merged = regmean(deltas, 1.0, 1e-12, statistics=grams)
    gradient = sum((merged - d) @ g for d, g in zip(deltas, grams, strict=True))
    assert float(gradient.norm()) <= 1e-9 * float(sum(d @ g for d, g in zip(deltas, grams, strict=True)).norm())


def test_singular_sum_rule() -> None:
    """A feature no task's inputs reach (a zero row and column in every Gram, α = 1: ``Σ G̃`` singular): the result
    is finite, matches the reference, and that input column is the plain mean; elsewhere the ridge moves nothing."""
    deltas, _ = _case("random", (12, 10), tasks=3)
    grams = grams_for(10, 3, seed=4, rows=40)
    for g in grams:
        g[:, 3] = 0
        g[3, :] = 0
    merged = regmean(deltas, 1.0, statistics=grams)
    assert torch.isfinite(merged).all()
    assert ref.relative_error(merged, ref.regmean(deltas, grams, 1.0)) <= 1e-10
    assert ref.relative_error(merged[:, 3], ref.task_mean(deltas)[:, 3]) <= 1e-10
    keep = [i for i in range(10) if i != 3]
    sub = [g[keep][:, keep] for g in grams]
    exact = sum(d[:, keep] @ g for d, g in zip(deltas, sub, strict=True)) @ torch.linalg.inv(sum(sub))
    assert ref.relative_error(merged[:, keep], exact) <= 1e-5


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((48, 32), [2, 3, 2, 4]), ((32, 80), [4, 4, 4]), ((40, 24), [8, 8, 8, 8])],
    ids=["tall-mixed-ranks", "wide", "joint-rank-exceeds-width"],
)
def test_lora_factors_match_dense_and_stay_low_rank(shape: tuple[int, int], ranks: list[int]) -> None:
    factors = delta_cases.low_rank_factors(shape, ranks)
    grams = grams_for(shape[1], len(ranks), seed=len(ranks))
    low_rank = [LowRankDelta(b.float(), a.float(), s) for b, a, s in factors]
    dense = [s * b.float().double() @ a.float().double() for b, a, s in factors]
    coeffs = COEFFS[: len(ranks)]
    out = regmean(low_rank, coefficients=coeffs, statistics=grams)
    expected = ref.regmean(dense, grams, 0.9, coeffs)
    assert out.dtype == torch.float32 and ref.relative_error(out, expected) <= TOL_F32
    assert int(torch.linalg.matrix_rank(out.double(), rtol=1e-6)) <= min(sum(ranks), *shape)
    basis = torch.linalg.qr(torch.cat([b for b, _, _ in factors], dim=1))[0]  # columns stay in span[B_i]
    assert ref.relative_error(basis @ (basis.T @ out.double()), out) <= TOL_F32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\], got 1.5"),
        ({"ridge": 0.0}, r"ridge must lie in \(0, 1\], got 0.0"),
        ({"statistics": "gram"}, "statistics must be a sequence of 2 Gram matrices"),
        ({"statistics": [torch.eye(4)]}, "1 Gram matrices for 2 deltas"),
        ({"statistics": [torch.eye(4), torch.eye(3)]}, r"statistics\[1\] must be a float \[4, 4\] Gram"),
        ({"statistics": [torch.eye(4), torch.full((4, 4), float("nan"))]}, r"statistics\[1\] contains NaN"),
    ],
    ids=["alpha", "ridge0", "not-a-list", "count", "shape", "nan"],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        regmean([torch.randn(3, 4), torch.randn(3, 4)], **kwargs)


def test_registry_entry_takes_statistics_and_others_refuse_them() -> None:
    method = get_method("regmean")
    assert method.needs_statistics and method.check({}) == {"alpha": 0.9, "ridge": 1e-8}
    deltas, grams = _case("random", (12, 10), tasks=2)
    direct = regmean(deltas, 0.5, coefficients=[1.0, 2.0], statistics=grams)
    assert torch.equal(method.merge_matrix(deltas, [1.0, 2.0], grams, alpha=0.5), direct)
    many = method.merge_many("matrix", deltas, [{"alpha": 0.5}, {"alpha": 0.9}], [1.0, 2.0], statistics=grams)
    assert torch.equal(many[0], direct)
    with pytest.raises(ValueError, match="iso_c takes no statistics"):
        get_method("iso_c").merge_matrix(deltas, None, grams)


# --------------------------------------------------------------------------------------------------------------------
# Merging task vectors with statistics
# --------------------------------------------------------------------------------------------------------------------

T = 2
QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from drm_lightning.models.backbone import load_backbone

    root = tmp_path_factory.mktemp("regmean")
    base = build_tiny_model(root / "bert", "bert")
    shapes = {k: tuple(v.shape) for k, v in load_backbone(str(base), "encoder").state_dict().items()}
    dense = write_task_vectors(base, root / "dense", T)
    lora = write_task_vectors(base, root / "lora", T, kind="lora")
    grams = [add_random_statistics(f, seed=i, only="encoder.") for i, f in enumerate(dense)]
    lora_grams = [add_random_statistics(f, seed=i, only="encoder.") for i, f in enumerate(lora)]
    return {"root": root, "base": base, "shapes": shapes, "dense": dense, "lora": lora, "grams": grams,
            "lora_grams": lora_grams}  # fmt: skip


def _deltas(folder: Path, name: str, shape: tuple[int, ...]) -> Tensor:
    from drm_lightning.merging.engine.reader import TaskVectorReader

    delta = TaskVectorReader(folder).get(name, shape)
    return delta.dense(F64) if isinstance(delta, LowRankDelta) else delta.double()


@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_merge_uses_each_tasks_grams(tiny: dict, kind: str, tmp_path: Path) -> None:
    folders, grams = tiny[kind], tiny["grams" if kind == "dense" else "lora_grams"]
    result = merge_task_vectors(folders, "regmean", tmp_path / "out", {"alpha": 0.8}, progress=False, device="cpu")
    merged = dict(iter_merged_delta(result.output))
    assert result.rule_counts["matrix"] > 0
    for name in (QUERY, "encoder.layer.1.output.dense.weight"):
        shape = tiny["shapes"][name]
        deltas = [_deltas(f, name, shape) for f in folders]
        expected = ref.regmean(deltas, [g[name] for g in grams], 0.8)
        assert ref.relative_error(merged[name], expected) <= TOL_F32, name
    bias = "encoder.layer.0.attention.self.query.bias"  # not a linear weight: the plain mean
    expected = ref.task_mean([_deltas(f, bias, tiny["shapes"][bias]) for f in folders])
    assert ref.relative_error(merged[bias], expected) <= TOL_F32


def _copy(tiny: dict, tmp_path: Path) -> list[Path]:
    import shutil

    out = []
    for folder in tiny["dense"]:
        shutil.copytree(folder, tmp_path / folder.name)
        out.append(tmp_path / folder.name)
    return out


def _strip(folder: Path) -> None:
    data = json.loads((folder / META_FILE).read_text())
    data["statistics"] = None
    (folder / META_FILE).write_text(json.dumps(data))


def _other_layers(folder: Path, tiny: dict) -> None:
    add_random_statistics(folder, seed=7, only="attention")


def _foreign_file(folder: Path, tiny: dict) -> None:
    import shutil

    shutil.copy(tiny["dense"][0] / STATISTICS_FILE, folder / STATISTICS_FILE)


def _wrong_width(folder: Path, tiny: dict) -> None:
    """Both task vectors record the one layer, with a Gram of another model's width."""
    for each in (folder.parent / "task0", folder):
        add_statistics(each, {QUERY: torch.eye(5)}, {QUERY: 3}, examples=1)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda f, t: _strip(f), "task1/meta.json: no input statistics, which regmean needs; add them with "
         "`drm-lightning statistics --task_vector .*task1 --task configs/task/<task>.yaml`"),
        (_other_layers, "task1: statistics record other layers than .*task0's"),
        (_foreign_file, "task1/statistics.safetensors: recorded for task='task0', but this task vector's meta.json "
         "has 'task1': statistics from another expert or base"),
        (_wrong_width, r"statistics.safetensors: Gram of .*query.weight' is \[5, 5\], the base parameter \[32, 32\]"),
    ],
    ids=["missing", "other-layers", "foreign-file", "other-model"],
)  # fmt: skip
def test_bad_statistics_one_line_nothing_written(tiny: dict, tmp_path: Path, spoil, message: str) -> None:
    folders = _copy(tiny, tmp_path)
    spoil(folders[1], tiny)
    with pytest.raises(ValueError, match=message) as err:
        merge_task_vectors(folders, "regmean", tmp_path / "out", progress=False, device="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_statistics_meta_round_trip_and_bad_sections(tiny: dict, tmp_path: Path) -> None:
    folder = tiny["dense"][0]
    stats = statistics_meta(read_meta(folder), folder)
    assert stats is not None and stats.examples == 5 and QUERY in stats.rows
    data = json.loads((folder / META_FILE).read_text())
    for section, message in [
        ({**data["statistics"], "examples": 0}, "statistics.examples=0, expected a positive integer"),
        ({**data["statistics"], "kind": "fisher"}, "statistics.kind='fisher', expected 'input_gram'"),
        ({**data["statistics"], "rows": {QUERY: -1}}, r"statistics.rows\[.*\]=-1"),
        ([1], "statistics=\\[1\\], expected an object"),
    ]:
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        (bad / META_FILE).write_text(json.dumps({**data, "statistics": section}))
        with pytest.raises(TaskVectorError, match=message):
            statistics_meta(read_meta(bad), bad)
