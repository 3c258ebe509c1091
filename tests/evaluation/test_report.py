"""The run report (report.md / report.json) and its plots, from synthetic results: no model is trained here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from drm_lightning.evaluation.plots import (
    ACCURACY_PNG,
    LAMBDA_PNG,
    SPECTRA_PNG,
    layer_spectra,
    pick_layers,
    plot_lambda_curves,
    plot_task_accuracy,
    write_plots,
)
from drm_lightning.evaluation.report import (
    REPORT_JSON,
    REPORT_MD,
    build_report,
    fmt_lambda,
    fmt_percent,
    read_report,
    render_markdown,
    report_dict,
    write_report,
)
from drm_lightning.evaluation.results import (
    EvaluationResults,
    LambdaPoint,
    ResultsError,
    average_normalised,
)
from drm_lightning.io.merged_delta import INDEX_FILE, MERGED_DIR
from drm_lightning.io.task_vector import LoraMeta, TaskVectorMeta, write_task_vector
from tests.helpers.results import acc, make_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("source", "task", "normalised", "expected"),
    [
        ("ta", "sst2", True, 0.75),
        ("ta", "cola", True, 0.90),
        ("drm_v", "sst2", True, 0.90),
        ("drm_v", "cola", True, 0.80),
        ("ta", None, True, 0.825),  # mean of ratios, not ratio of means (1.05 / 1.30)
        ("drm_v", None, True, 0.85),
        ("ta", None, False, 0.525),
        ("expert", None, False, 0.65),
        ("pretrained", None, False, 0.325),
        ("pretrained", "cola", True, 0.5),
    ],
)
def test_normalised_and_averages(source: str, task: str | None, normalised: bool, expected: float) -> None:
    r = make_results()
    got = r.average(source, normalised) if task is None else r.normalised(source, task)
    assert got == pytest.approx(expected, abs=1e-12)


def test_average_is_missing_when_a_task_is_missing() -> None:
    r = make_results()
    r.pretrained = {"sst2": acc(0.4)}
    assert r.average("pretrained") is None
    assert r.value("pretrained", "cola") is None and r.normalised("pretrained", "cola") is None


def test_average_normalised_uses_given_metric_and_tasks() -> None:
    merged = {"a": {"accuracy": 0.5, "f1": 0.2}, "b": {"accuracy": 0.9, "f1": 0.9}}
    expert = {"a": {"accuracy": 1.0, "f1": 0.4}, "b": {"accuracy": 0.9, "f1": 0.9}}
    assert average_normalised(merged, expert) == pytest.approx(0.75)
    assert average_normalised(merged, expert, "f1") == pytest.approx(0.75)
    assert average_normalised(merged, expert, tasks=["a"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["expert"].pop("cola"), r"expert: no 'accuracy' for task\(s\) \['cola'\]"),
        (lambda d: d["methods"][0]["metrics"].pop("sst2"), r"methods\['ta'\].metrics: no 'accuracy'.*'sst2'"),
        (lambda d: d["methods"][1].update(label="ta"), r"duplicate labels"),
        (lambda d: d.update(tasks=["sst2", "sst2"]), r"tasks: duplicate"),
        (lambda d: d.update(tasks=[]), r"tasks: must name"),
        (lambda d: d["expert"]["sst2"].update(accuracy="high"), r"expert\['sst2'\]\['accuracy'\]: expected a number"),
        (lambda d: d.pop("expert"), r"missing key 'expert'"),
        (lambda d: d["methods"][0]["curve"][0].pop("score"), r"missing key 'score'"),
    ],
)
def test_bad_results_raise_naming_the_key(mutate, match: str) -> None:
    data = make_results().to_dict()
    mutate(data)
    with pytest.raises(ResultsError, match=match):
        EvaluationResults.from_dict(data)


def test_expert_at_zero_cannot_normalise() -> None:
    r = make_results()
    r.expert["cola"]["accuracy"] = 0.0
    with pytest.raises(ResultsError, match=r"task 'cola' is 0.0"):
        r.normalised("ta", "cola")


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.3, "0.3"), (1.0, "1"), (0.1375, "0.1375"), (2.00004, "2"), (0.0, "0"), (None, "n/a")],
)
def test_fmt_lambda(value: float | None, text: str) -> None:
    assert fmt_lambda(value) == text


@pytest.mark.parametrize(("value", "text"), [(0.825, "82.50"), (1.0, "100.00"), (None, "n/a"), (math.nan, "nan")])
def test_fmt_percent(value: float | None, text: str) -> None:
    assert fmt_percent(value) == text


def test_markdown_tables() -> None:
    md = render_markdown(make_results(), images=["accuracy_by_task.png"])
    lines = md.splitlines()
    assert "| task | pretrained | expert | ta | ta norm. | drm_v | drm_v norm. |" in lines
    assert "| sst2 | 40.00 | 80.00 | 60.00 | 75.00 | 72.00 | 90.00 |" in lines
    assert "| cola | 25.00 | 50.00 | 45.00 | 90.00 | 40.00 | 80.00 |" in lines
    assert "| **average** | 32.50 | 65.00 | 52.50 | 82.50 | 56.00 | 85.00 |" in lines
    # Per-model summary: λ, number of λ evaluations, merge time, averages; params as sorted JSON.
    assert "| ta | task_arithmetic |  | 0.3 | 3 | 1.23 | 52.50 | 82.50 |" in lines
    assert '| drm_v | drm | {"direction": "vertical", "drop_rate": 0.8} | 1.2 | 0 | 10.00 | 56.00 | 85.00 |' in lines
    # λ curve: sorted by λ, chosen one in bold, only models that were searched get a column.
    start = lines.index("| λ | ta |")
    assert lines[start + 2 : start + 5] == ["| 0.1 | 60.00 |", "| 0.3 | **82.50** |", "| 0.5 | 70.00 |"]
    assert md.endswith("![accuracy_by_task](accuracy_by_task.png)\n")


def test_markdown_without_methods_or_pretrained() -> None:
    r = EvaluationResults(tasks=["a|b"], expert={"a|b": acc(0.9)})
    md = render_markdown(r)
    assert "| a\\|b | n/a | 90.00 |" in md.splitlines()
    assert "## Merged models" not in md and "λ search" not in md and "## Plots" not in md


def test_write_report_files_and_roundtrip(tmp_path: Path) -> None:
    r = make_results()
    md = write_report(r, tmp_path / "run")
    assert (tmp_path / "run" / REPORT_MD).read_text(encoding="utf-8") == md
    data = json.loads((tmp_path / "run" / REPORT_JSON).read_text())
    assert data["format_version"] == 1
    summary = data["summary"]["methods"]
    assert summary["ta"]["average_normalised"] == pytest.approx(0.825)
    assert summary["ta"]["normalised"] == pytest.approx({"sst2": 0.75, "cola": 0.9})
    assert summary["drm_v"] | {"normalised": None} == pytest.approx(
        {"lambda": 1.2, "merge_seconds": 10.0, "average": 0.56, "average_normalised": 0.85, "normalised": None}
        | {"evaluations": 0}
    )
    assert data["summary"]["pretrained"]["average"] == pytest.approx(0.325)
    back = read_report(tmp_path / "run")
    assert back.to_dict() == r.to_dict()
    assert [p.lam for p in back.method("ta").curve] == [0.5, 0.3, 0.1]  # evaluation order is kept
    # Deterministic: writing again gives identical bytes.
    first = (tmp_path / "run" / REPORT_JSON).read_bytes()
    write_report(read_report(tmp_path / "run"), tmp_path / "run")
    assert (tmp_path / "run" / REPORT_JSON).read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [REPORT_JSON, REPORT_MD]  # no temp files left


def test_non_finite_metrics_become_null_and_back(tmp_path: Path) -> None:
    r = make_results()
    r.methods[1].metrics["cola"]["f1"] = math.nan
    write_report(r, tmp_path)
    text = (tmp_path / REPORT_JSON).read_text()
    assert "NaN" not in text and json.loads(text)["results"]["methods"][1]["metrics"]["cola"]["f1"] is None
    assert math.isnan(read_report(tmp_path).method("drm_v").metrics["cola"]["f1"])
    assert report_dict(r)["summary"]["methods"]["drm_v"]["average"] == pytest.approx(0.56)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "not found"), ("{", "invalid JSON"), ('{"format_version": 1}', "no 'results'")],
)
def test_read_report_errors_name_the_file(tmp_path: Path, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / REPORT_JSON).write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_report(tmp_path)
    assert REPORT_JSON in str(err.value)


# ---------------------------------------------------------------- plots


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, f"{path}: only {len(data)} bytes"


def test_accuracy_and_lambda_plots(tmp_path: Path) -> None:
    r = make_results()
    assert plot_task_accuracy(r, tmp_path / "a.png") == tmp_path / "a.png"
    assert plot_lambda_curves(r, tmp_path / "l.png") == tmp_path / "l.png"
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "l.png")
    r.methods = [m for m in r.methods if not m.curve]
    assert plot_lambda_curves(r, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(
    ("n", "count", "expected"),
    [(7, 3, [0, 3, 6]), (2, 3, [0, 1]), (10, 1, [5]), (5, 5, [0, 1, 2, 3, 4]), (10, 4, [0, 3, 6, 9])],
)
def test_pick_layers(n: int, count: int, expected: list[int]) -> None:
    names = [f"l{i}" for i in range(n)]
    assert pick_layers(names, count) == [names[i] for i in expected]


LAYERS = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(4)]


def make_task_vectors(tmp_path: Path) -> tuple[list[Path], dict[str, dict[str, torch.Tensor]]]:
    """A dense and a LoRA (r=2, scale 0.5) task vector over four 6x5 matrices plus an embedding and a bias."""
    gen = torch.Generator().manual_seed(0)
    dense = {name: torch.randn(6, 5, generator=gen) for name in LAYERS}
    dense["embeddings.word_embeddings.weight"] = torch.randn(11, 5, generator=gen)
    dense["encoder.layer.0.attention.self.query.bias"] = torch.randn(6, generator=gen)
    lora: dict[str, torch.Tensor] = {}
    full_lora: dict[str, torch.Tensor] = {}
    for name in LAYERS:
        a, b = torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen)
        lora[name + ".lora_A"], lora[name + ".lora_B"] = a, b
        full_lora[name] = 0.5 * (b.double() @ a.double())
    meta = dict(base_model="tiny", base_fingerprint="x", label_names=["no", "yes"])
    lora_meta = LoraMeta(r=2, alpha=1.0, scale=0.5, target_modules=["query"])
    folders = [
        write_task_vector(tmp_path / "tv_a", dense, {}, TaskVectorMeta(task="a", kind="dense", **meta)),
        write_task_vector(tmp_path / "tv_b", lora, {}, TaskVectorMeta(task="b", kind="lora", lora=lora_meta, **meta)),
    ]
    return folders, {"a": {n: dense[n].double() for n in LAYERS}, "b": full_lora}


def make_merged(tmp_path: Path, deltas: dict[str, torch.Tensor], name: str) -> Path:
    """A merged folder in ``merge_task_vectors``' layout: sharded Δ_merged under ``merged_delta/`` with its index."""
    folder = tmp_path / name
    (folder / MERGED_DIR).mkdir(parents=True)
    items = sorted(deltas.items())
    half = len(items) // 2
    weight_map = {}
    for shard, part in (("delta-00001.safetensors", items[:half]), ("delta-00002.safetensors", items[half:])):
        save_file(dict(part), str(folder / MERGED_DIR / shard))
        weight_map |= {n: shard for n, _ in part}
    (folder / MERGED_DIR / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_layer_spectra_values(tmp_path: Path) -> None:
    folders, truth = make_task_vectors(tmp_path)
    summed = {n: truth["a"][n] + truth["b"][n] for n in LAYERS}
    merged = {"ta": make_merged(tmp_path, {n: t.float() for n, t in summed.items()}, "merged_ta")}
    spectra = layer_spectra(folders, merged)
    # Embeddings and 1-D parameters are never picked; first / middle / last of the four shared matrices.
    assert [s.name for s in spectra] == [LAYERS[0], LAYERS[2], LAYERS[3]]
    for s in spectra:
        assert set(s.before) == {"a", "b"} and set(s.after) == {"ta"}
        assert s.before["a"].dtype == torch.float64
        torch.testing.assert_close(s.before["a"], torch.linalg.svdvals(truth["a"][s.name]))
        torch.testing.assert_close(s.before["b"], torch.linalg.svdvals(truth["b"][s.name]))
        assert (s.before["b"][2:] < 1e-10).all()  # LoRA r=2: dense via scale·B@A keeps rank 2
        torch.testing.assert_close(s.after["ta"], torch.linalg.svdvals(summed[s.name]), rtol=1e-5, atol=1e-5)
    explicit = layer_spectra(folders, merged, names=[LAYERS[1]])
    assert [s.name for s in explicit] == [LAYERS[1]]
    with pytest.raises(ValueError, match=r"names: \['embeddings"):
        layer_spectra(folders, merged, names=["embeddings.word_embeddings.weight"])
    with pytest.raises(ValueError, match=r"delta.safetensors.index.json: not found"):
        layer_spectra(folders, {"x": tmp_path})


def test_build_report_writes_plots_and_embeds_them(tmp_path: Path) -> None:
    folders, truth = make_task_vectors(tmp_path)
    merged = {"ta": make_merged(tmp_path, {n: truth["a"][n].float() for n in LAYERS}, "m")}
    md = build_report(make_results(), tmp_path / "run", folders, merged)
    for name in (ACCURACY_PNG, LAMBDA_PNG, SPECTRA_PNG):
        assert_png(tmp_path / "run" / name)
        assert f"]({name})" in md
    assert (tmp_path / "run" / REPORT_MD).read_text(encoding="utf-8") == md


def test_missing_matplotlib_skips_plots_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.warns(UserWarning, match="'matplotlib' package is not installed"):
        assert write_plots(make_results(), tmp_path) == []
    with pytest.warns(UserWarning, match="matplotlib"):
        md = build_report(make_results(), tmp_path)
    assert "## Plots" not in md and not list(tmp_path.glob("*.png"))


def test_parameter_search_landscape_table_notes_and_roundtrip(tmp_path: Path) -> None:
    """A searched method: one row per parameter set, one column per λ, the chosen pair bold, the evaluations of
    every set counted, the notes listed; report.json reads back to the same results."""
    from drm_lightning.evaluation.results import VariantResult

    r = make_results()
    low = VariantResult("drop_rate-0.5", {"drop_rate": 0.5}, 1.0, 0.8, [LambdaPoint(0.5, 0.7), LambdaPoint(1.0, 0.8)])
    high = VariantResult(
        "drop_rate-0.9", {"drop_rate": 0.9}, 2.0, 0.85, [LambdaPoint(1.0, 0.75), LambdaPoint(2.0, 0.85)], ["grew"]
    )
    drm = r.method("drm_v")
    drm.params, drm.lam, drm.curve = {"direction": "vertical", "drop_rate": 0.9}, 2.0, high.curve
    drm.variants, drm.notes = [low, high], ["best parameters at the edge of their grid: added drop_rate-0.9"]
    assert drm.chosen() is high and drm.evaluations == 4
    md = write_report(r, tmp_path / "run")
    assert "## Parameter search: drm_v (4 evaluations)" in md
    assert "| drop_rate-0.5 | 70.00 | 80.00 |  | 1 | 80.00 | 2 |" in md
    assert "| drop_rate-0.9 |  | 75.00 | **85.00** | 2 | 85.00 | 2 |" in md
    assert "- drm_v: best parameters at the edge of their grid: added drop_rate-0.9" in md
    again = read_report(tmp_path / "run")
    assert again.to_dict() == r.to_dict() and again.method("drm_v").chosen().name == "drop_rate-0.9"
