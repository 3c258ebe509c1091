"""A search over a method's own parameters: grids in ``params``, and one streaming pass writing one merged folder
per parameter set that equals a separate ``merge_task_vectors`` at each set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drm_lightning.io.merged_delta import iter_merged_delta
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.record import MERGE_FILE
from drm_lightning.merging.engine.sweep import ParamGrid, edge_extension, merge_task_vectors_many, variant_name
from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("sweep")
    bert = build_tiny_model(root / "bert", "bert")
    return {
        "dense": write_task_vectors(bert, root / "dense", 3),
        "lora": write_task_vectors(bert, root / "lora", 3, kind="lora"),
    }


def test_param_grid_parses_lists_and_checks_every_value() -> None:
    grid = ParamGrid.parse("drm_v", {"drop_rate": [0.5, 0.9], "renormalise": [True, False], "rank_tol": 0.02})
    assert grid.fixed == {"rank_tol": 0.02} and grid.axes == {"drop_rate": [0.5, 0.9], "renormalise": [True, False]}
    combos = grid.combinations()
    assert combos[1] == {"drop_rate": 0.5, "renormalise": False} and len(combos) == 4
    assert grid.params(combos[1])["rank_tol"] == 0.02 and grid.params(combos[1])["renormalise"] is False
    assert variant_name(combos[1]) == "drop_rate-0.5+renormalise-false"
    assert not ParamGrid.parse("ties", {"density": 0.3}).searched
    assert grid.extended("drop_rate", 0.7).axes["drop_rate"] == [0.5, 0.7, 0.9]
    for params, message in [
        ({"drop_rate": []}, r"methods\[0\].params.drop_rate=\[\]: give at least one value"),
        ({"drop_rate": [0.5, 1.0]}, r"drop_rate=\[0.5, 1.0\]: drm_v: drop_rate must lie in \[0, 1\)"),
        ({"drop_rate": [0.5, 0.5]}, "a value repeats"),
        ({"drop_rat": [0.5]}, r"unknown parameter\(s\) \['drop_rat'\]"),
        ({"direction": ["horizontal"]}, "direction is fixed"),
    ]:
        with pytest.raises(ValueError, match=message):
            ParamGrid.parse("drm_v", params, where="methods[0].params")


@pytest.mark.parametrize(
    ("method", "key", "values", "best", "expected"),
    [
        ("drm_v", "drop_rate", [0.5, 0.7, 0.9], 0.9, 0.95),  # 1.1 and 1.0 are refused: the midpoint to the bound
        ("drm_v", "drop_rate", [0.5, 0.7, 0.9], 0.5, 0.3),
        ("drm_v", "drop_rate", [0.5, 0.7, 0.9], 0.7, None),  # inside: nothing to extend
        ("ties", "density", [0.1, 0.2], 0.1, 0.05),  # 0 is refused
        ("iso_cts", "common_fraction", [0.8, 1.0], 1.0, None),  # 1 is the bound itself
        ("drm_v", "renormalise", [True, False], True, None),  # not numeric
    ],
)
def test_edge_extension(method: str, key: str, values: list, best: float, expected: float | None) -> None:
    assert edge_extension(method, key, values, best) == expected


@pytest.mark.parametrize(
    ("method", "kind", "sets"),
    [
        ("drm_v", "dense", [{"drop_rate": p} for p in (0.5, 0.8, 0.9)] + [{"drop_rate": 0.8, "elect_sign": False}]),
        ("drm_h", "lora", [{"drop_rate": p} for p in (0.0, 0.7)]),
        ("ties", "dense", [{"density": d} for d in (0.1, 0.4)]),
        ("iso_cts", "lora", [{"common_fraction": f} for f in (0.5, 0.9)]),
    ],
)
def test_one_pass_equals_one_merge_per_set(
    inputs: dict[str, list[Path]], tmp_path: Path, method: str, kind: str, sets: list[dict]
) -> None:
    folders = inputs[kind]
    outputs = [tmp_path / f"sweep{i}" for i in range(len(sets))]
    results = merge_task_vectors_many(folders, method, outputs, sets, progress=False)
    assert [r.output for r in results] == outputs
    for out, params in zip(outputs, sets, strict=True):
        single = merge_task_vectors(folders, method, tmp_path / "single", params, progress=False)
        record = json.loads((out / MERGE_FILE).read_text())
        assert record["params"] == json.loads(json.dumps(single.params)) and record["sweep"] == {"sets": len(sets)}
        expected = dict(iter_merged_delta(tmp_path / "single"))
        got = dict(iter_merged_delta(out))
        assert sorted(got) == sorted(expected)
        for name, tensor in got.items():  # DRM, TIES: the same computation; Iso-CTS shares a wider decomposition
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7)
        assert (out / "heads" / "task0" / "head.safetensors").is_file()


def test_bad_sweep_arguments_write_nothing(inputs: dict[str, list[Path]], tmp_path: Path) -> None:
    folders = inputs["dense"]
    with pytest.raises(ValueError, match="need one output per set"):
        merge_task_vectors_many(folders, "drm_v", [tmp_path / "a"], [{}, {}], progress=False)
    with pytest.raises(ValueError, match="an output repeats"):
        merge_task_vectors_many(folders, "drm_v", [tmp_path / "a", tmp_path / "a"], [{}, {}], progress=False)
    with pytest.raises(ValueError, match="drop_rate"):
        merge_task_vectors_many(folders, "drm_v", [tmp_path / "a", tmp_path / "b"], [{}, {"drop_rate": 2}])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
