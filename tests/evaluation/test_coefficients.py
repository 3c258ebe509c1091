"""Learned merging coefficients (``evaluation/coefficients.py``, ``coefficient_module.py``, ``learn.py``).

One tiny BERT expert is fine-tuned on a two-label task (``mood``); a second task vector (``noise``), under the same
head and data, changes only the embeddings of the six words that decide the label, by random vectors 25 times the
weights' size: harmful in either sign, so its coefficient of the ``embeddings`` block has its optimum at 0 (its other
blocks have a zero delta, hence no gradient). Every test runs a few optimiser steps on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from drm_lightning.evaluation.coefficients import (
    CoefficientLayout,
    LearnSettings,
    combine,
    group_of,
    task_form_methods,
    ties_terms,
)
from drm_lightning.evaluation.learn import COEFFICIENTS_JSON, learn_coefficients, read_coefficients
from drm_lightning.io.merged_delta import iter_merged_delta
from drm_lightning.io.task_vector import TaskVectorError
from drm_lightning.merging import reference as R

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LABELS = ["neg", "pos"]
WORDS = [["bad", "awful", "dull"], ["good", "great", "fun"]]
FILLER = ["the", "movie", "was", "a", "very", "cat", "dog", "one", "two"]


def write_csv(folder: Path, seed: int = 0) -> dict[str, str]:
    """Tiny seeded splits: filler words plus one word that decides the label."""
    import csv
    import random

    rng = random.Random(seed)
    files = {}
    for split, rows in (("train", 48), ("validation", 16), ("test", 16)):
        path = folder / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(rows):
                words = rng.sample(FILLER, 3) + [rng.choice(WORDS[i % 2])]
                rng.shuffle(words)
                writer.writerow([" ".join(words), LABELS[i % 2]])
        files[split] = str(path)
    return files


def datamodule(base: str, files: dict[str, str], task: str):
    from drm_lightning.data.text import TextClassificationDataModule

    return TextClassificationDataModule(
        task=task, tokenizer=base, label_names=LABELS, data_files=files, max_length=16, batch_size=8,
        eval_batch_size=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The ``mood`` expert (fine-tuned), the harmful ``noise`` task vector, their datamodules and two merges."""
    from lightning.pytorch import Trainer

    from drm_lightning.callbacks.task_vector import TaskVectorCallback
    from drm_lightning.commands.statistics import add_expert_statistics
    from drm_lightning.io.safetensors import open_safetensors
    from drm_lightning.io.task_vector import DELTAS_FILE, read_head, read_meta, write_task_vector
    from drm_lightning.merging.engine.merger import merge_task_vectors
    from drm_lightning.models.expert import ExpertModule
    from tests.helpers.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("coefficients")
    base = make_tiny_model("encoder", root / "base")
    files = write_csv(root / "data")
    torch.manual_seed(0)
    expert = ExpertModule(base, "encoder", "mood", LABELS, learning_rate=5e-3, warmup_ratio=0.0, pooling="mean",
                          head_dropout=0.0)  # fmt: skip
    trainer = Trainer(max_epochs=3, callbacks=[TaskVectorCallback(str(root / "tv" / "mood"))], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(expert, datamodule=datamodule(base, files, "mood"))
    mood = root / "tv" / "mood"
    with open_safetensors(mood / DELTAS_FILE) as f:
        deltas = {k: f.get_tensor(k) for k in f.keys()}
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids([w for words in WORDS for w in words])
    assert len(set(ids)) == 6, ids  # every label word is its own token
    table = "embeddings.word_embeddings.weight"
    noise = {k: torch.zeros_like(v) for k, v in deltas.items()}
    gen = torch.Generator().manual_seed(1)
    noise[table][ids] = torch.randn(len(ids), deltas[table].shape[1], generator=gen) * NOISE
    meta = read_meta(mood)
    meta.task = "noise"
    meta.statistics = None  # the callback recorded mood's input Grams; the made-up delta's are recorded below
    write_task_vector(root / "tv" / "noise", noise, read_head(mood), meta)
    folders = [mood, root / "tv" / "noise"]
    datamodules = {t: datamodule(base, files, t) for t in ("mood", "noise")}
    add_expert_statistics(folders[1], datamodules["noise"], examples=16, device="cpu")  # RegMean's
    merged = {}
    methods = (("task_arithmetic", {}), ("ties", {"density": 0.5}), ("iso_c", {}), ("regmean", {}), ("wudi_closed", {}))
    for method, params in methods:
        merged[method] = root / "merged" / method
        merge_task_vectors(folders, method, merged[method], params, progress=False, device="cpu")
    return {"root": root, "base": base, "task_vectors": folders, "datamodules": datamodules, "merged": merged}


def learned_deltas(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_merged_delta(folder))


NOISE = 0.5
"""Standard deviation of the harmful delta on the label words' embeddings (the tiny model's weights: about 0.02)."""
QUICK = {"objective": "entropy", "max_steps": 3, "lr": 0.05}


# ---------------------------------------------------------------------------------------- settings and layout


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"objective": "mse"}, r"learn\.objective='mse'"),
        ({"form": "row"}, r"learn\.form='row'"),
        ({"granularity": "model"}, r"learn\.granularity='model'"),
        ({"epochs": 0}, r"learn\.epochs=0"),
        ({"lr": -1.0}, r"learn\.lr=-1\.0"),
        ({"lr": float("nan")}, r"learn\.lr=nan"),
        ({"max_steps": 0}, r"learn\.max_steps=0"),
        ({"batch_size": 0}, r"learn\.batch_size=0"),
        ({"split": "test"}, r"transductive: true"),
        ({"transductive": True}, r"only with split: test"),
        ({"steps": 3}, r"unknown key\(s\) \['steps'\]"),
        ("fast", r"expected a mapping"),
        ({"include": "layer.(1"}, r"learn\.include='layer\.\(1': not a regular expression"),
    ],
)
def test_bad_settings_are_named(value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearnSettings.parse(value)


def test_transductive_is_said_in_the_data_used() -> None:
    s = LearnSettings.parse({"split": "test", "transductive": True})
    assert "TRANSDUCTIVE" in s.data_used()
    assert "labels unused" in LearnSettings.parse({}).data_used()
    assert "labelled validation" in LearnSettings.parse({"objective": "cross_entropy"}).data_used()


@pytest.mark.parametrize(
    ("name", "granularity", "group"),
    [
        ("encoder.layer.3.attention.self.query.weight", "block", "encoder.layer.3"),
        ("encoder.layer.3.attention.self.query.weight", "tensor", "encoder.layer.3.attention.self.query.weight"),
        ("embeddings.word_embeddings.weight", "block", "embeddings"),
        ("model.layers.10.mlp.down_proj.weight", "block", "model.layers.10"),
        ("weight", "block", "weight"),
    ],
)
def test_group_of(name: str, granularity: str, group: str) -> None:
    assert group_of(name, granularity) == group


def test_layout_rows_follow_groups() -> None:
    names = ["a.0.x", "a.0.y", "a.1.x", "b.w"]
    layout = CoefficientLayout.build(names, "block", ["t0", "t1"])
    assert layout.groups == ("a.0", "a.1", "b")
    assert layout.rows == (0, 0, 1, 2)
    assert layout.shape == (3, 2)


@pytest.mark.parametrize("density", [0.3, 0.6, 1.0])
def test_ties_terms_sum_to_the_ties_reference(density: float) -> None:
    """Σ_i of TIES's per-task terms is TIES (float64 reference from docs/methods.md)."""
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    terms = ties_terms(torch.stack([d.reshape(-1) for d in deltas]), density)
    expected = R.ties(deltas, density)
    torch.testing.assert_close(terms.sum(dim=0).reshape(6, 5), expected, rtol=1e-12, atol=1e-12)


def test_combine_is_the_weighted_sum() -> None:
    stack = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)
    c = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(combine(c, stack), 0.5 * stack[0] - stack[1] + 2.0 * stack[2])


# ------------------------------------------------------------------------------------------- learning, end to end


@pytest.mark.parametrize(
    ("method", "form", "granularity", "include"),
    [
        ("iso_c", "layer", "tensor", None),
        ("task_arithmetic", "task", "block", None),
        ("ties", "task", "tensor", None),
        ("task_arithmetic", "task", "block", r"layer\.1\."),  # the rest stays at λ
        ("wudi_closed", "layer", "tensor", None),
        ("wudi_closed", "task", "tensor", None),
        ("regmean", "layer", "block", None),
        ("regmean", "task", "tensor", None),
    ],
)
def test_zero_learning_rate_gives_the_fixed_lambda_merge(
    setup: dict, tmp_path: Path, method: str, form: str, granularity: str, include: str | None
) -> None:
    lam = 0.7
    out = tmp_path / "learned"
    settings = {**QUICK, "lr": 0.0, "form": form, "granularity": granularity, "include": include}
    learn_coefficients(setup["merged"][method], lam, setup["task_vectors"], setup["datamodules"], settings, out,
                       trainer_kwargs={"accelerator": "cpu"}, plots=False)  # fmt: skip
    table = read_coefficients(out)
    assert {x for row in table["coefficients"] for x in row} == {torch.tensor(lam).item()}  # float32 λ, unmoved
    if include is not None:
        assert table["rows"] == ["encoder.layer.1"]
    fixed = learned_deltas(setup["merged"][method])
    got = learned_deltas(out)
    assert list(got) == list(fixed)
    for name, delta in fixed.items():
        torch.testing.assert_close(got[name], lam * delta, rtol=1e-5, atol=1e-7, msg=name)


def test_a_seeded_run_is_reproducible_bit_for_bit(setup: dict, tmp_path: Path) -> None:
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        learn_coefficients(setup["merged"]["task_arithmetic"], 0.5, setup["task_vectors"], setup["datamodules"],
                           {**QUICK, "form": "task", "split": "train", "batch_size": 5}, out,
                           trainer_kwargs={"accelerator": "cpu"}, plots=False)  # fmt: skip
        runs.append(out)
    a, b = (read_coefficients(r) for r in runs)
    assert a["coefficients"] == b["coefficients"]
    assert a["coefficients"] != [[0.5, 0.5]] * len(a["rows"])  # it moved
    da, db = learned_deltas(runs[0]), learned_deltas(runs[1])
    assert all(torch.equal(da[n], db[n]) for n in da)
    assert not torch.are_deterministic_algorithms_enabled()  # the fit's deterministic mode does not outlive it


def test_a_harmful_delta_learns_a_coefficient_near_zero(setup: dict, tmp_path: Path) -> None:
    """``noise`` only hurts: cross-entropy drives its embeddings coefficient from 1 to ~0; ``mood``'s stays."""
    out = tmp_path / "learned"
    info = learn_coefficients(
        setup["merged"]["task_arithmetic"], 1.0, setup["task_vectors"], setup["datamodules"],
        {"objective": "cross_entropy", "form": "task", "granularity": "block", "epochs": 8, "lr": 0.05,
         "split": "train"}, out,
        trainer_kwargs={"accelerator": "cpu"}, plots=False,
    )  # fmt: skip
    table = read_coefficients(out)
    embeddings = table["coefficients"][table["rows"].index("embeddings")]
    noise, mood = (embeddings[table["columns"].index(t)] for t in ("noise", "mood"))
    assert abs(noise) < 0.1, table
    assert mood > 0.5, table
    assert info["steps"] > 0


def test_a_task_without_a_head_is_refused_and_nothing_is_written(setup: dict, tmp_path: Path) -> None:
    headless = tmp_path / "headless"
    shutil.copytree(setup["task_vectors"][1], headless)
    meta = json.loads((headless / "meta.json").read_text())
    meta["head"] = {}
    (headless / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "learned"
    with pytest.raises(TaskVectorError, match=str(headless / "meta.json")) as err:
        learn_coefficients(setup["merged"]["task_arithmetic"], 0.5, [setup["task_vectors"][0], headless],
                           setup["datamodules"], QUICK, out, plots=False)  # fmt: skip
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_learning_only_some_layers_leaves_the_others_at_lambda(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "learned"
    learn_coefficients(setup["merged"]["iso_c"], 1.5, setup["task_vectors"], setup["datamodules"],
                       {**QUICK, "include": r"layer\.1\.attention"}, out, trainer_kwargs={"accelerator": "cpu"},
                       plots=False)  # fmt: skip
    table = read_coefficients(out)
    assert table["rows"] and all("layer.1.attention" in r for r in table["rows"])
    fixed, got = learned_deltas(setup["merged"]["iso_c"]), learned_deltas(out)
    for name, delta in fixed.items():
        if "layer.1.attention" not in name:
            torch.testing.assert_close(got[name], 1.5 * delta, rtol=1e-6, atol=0, msg=name)
    assert any(not torch.allclose(got[n], 1.5 * fixed[n]) for n in fixed if "layer.1.attention" in n)


def test_an_include_that_matches_nothing_is_refused(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "learned"
    with pytest.raises(ValueError, match=r"learn\.include='decoder': matches no parameter"):
        learn_coefficients(setup["merged"]["iso_c"], 1.0, setup["task_vectors"], setup["datamodules"],
                           {**QUICK, "include": "decoder"}, out, plots=False)  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "regmean", "wudi_closed", "iso_c", "tsv_m", "drm_v"])
def test_a_recipe_takes_the_task_form_exactly_over_the_methods_with_task_terms(method: str) -> None:
    from drm_lightning.commands.pipeline_recipe import method_spec

    entry = {"method": method, "learn": {"form": "task"}}
    if method in ("task_arithmetic", "ties", "regmean", "wudi_closed"):
        assert method in task_form_methods()
        assert method_spec(entry).learn["form"] == "task"
    else:
        with pytest.raises(ValueError, match=rf"^methods\[0\]\.learn\.form='task': method '{method}' has no per-task"):
            method_spec(entry)


def test_the_task_form_over_a_method_without_task_terms_is_refused(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "learned"
    with pytest.raises(ValueError, match=r"iso_c.*form: layer"):
        learn_coefficients(setup["merged"]["iso_c"], 1.0, setup["task_vectors"], setup["datamodules"],
                           {**QUICK, "form": "task"}, out, plots=False)  # fmt: skip
    assert not out.exists()


def test_the_learned_folder_is_a_merged_folder(setup: dict, tmp_path: Path) -> None:
    """``W_0 + 1·Δ_learned`` loads like any merge; the json and the heatmap sit beside it."""
    from drm_lightning.evaluation.merged import MergedBackbone

    out = tmp_path / "learned"
    learn_coefficients(setup["merged"]["iso_c"], 1.0, setup["task_vectors"], setup["datamodules"], QUICK, out,
                       trainer_kwargs={"accelerator": "cpu"})  # fmt: skip
    assert (out / COEFFICIENTS_JSON).is_file() and (out / "coefficients.png").is_file()
    record = json.loads((out / "merge.json").read_text())
    assert record["learned"]["objective"] == "entropy" and "labels unused" in record["learned"]["data"]
    model = MergedBackbone(out).at(1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
