"""Every bad input to ``drm-lightning`` gets one readable error line, a non-zero exit, and no output.

One table drives the CLI through bad inputs: corrupt or inconsistent task vectors, bad method arguments, a typo in
a YAML file, a dataset without its label column. Each row checks the same promise:

- the exit status is not zero;
- stderr holds exactly one ``drm-lightning: error: ...`` line, which names the offending file, key or value, and
  no ``Traceback``;
- nothing is written at the output path (neither ``<output>``, ``<output>_delta`` nor a ``.<output>.tmp-*``
  sibling).

Why most rows run in-process: a ``python -m drm_lightning.cli`` subprocess pays ~10 s of CPU for the torch /
Lightning / transformers imports, so only the ``SUBPROCESS`` rows (one per command family: a corrupt file for
``merge``, a YAML typo, a data error for ``fit``) run as real processes; the others call ``main(argv)``, the console
script's own function, and read stderr through ``capsys``. The tiny model and the good task vectors are built once
per module; each row corrupts a copy in its own folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.cli import main
from drm_lightning.io.task_vector import DELTAS_FILE, META_FILE
from drm_lightning.merging.methods.registry import METHODS
from tests.helpers import recipes
from tests.helpers.merge_inputs import write_task_vectors
from tests.helpers.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
QUERY = "encoder.layer.0.attention.self.query.weight"
LATE = "encoder.layer.1.output.dense.weight"
ERROR_PREFIX = "drm-lightning: error: "
QUIET_TRAINER = [*recipes.QUIET_TRAINER, "--trainer.max_steps=1"]


@dataclass
class World:
    """What the rows corrupt copies of: a tiny BERT, good dense and LoRA task vectors, one of another base."""

    root: Path
    bert: str
    dense: list[Path]
    lora: list[Path]
    foreign: Path
    model_yaml: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    bert = make_tiny_model("encoder", root / "bert")
    other = make_tiny_model("encoder", root / "other_bert", seed=1)
    dense = write_task_vectors(bert, root / "tv_dense", 2, tasks=["alpha", "beta"])
    lora = write_task_vectors(bert, root / "tv_lora", 2, kind="lora", rank=2, alpha=4.0, tasks=["gamma", "delta"])
    foreign = write_task_vectors(other, root / "tv_other", 1, tasks=["foreign"])[0]
    model_yaml = root / "model.yaml"
    model_yaml.write_text(json.dumps({"model": {"backbone": bert, "pooling": "mean", "warmup_ratio": 0.0}}))
    return World(root, bert, dense, lora, foreign, model_yaml)


# ------------------------------------------------------------------------------------------- corruptions


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_deltas(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of task vector ``src`` at ``dst`` whose deltas went through ``edit`` (in place on the dict)."""
    _copy(src, dst)
    deltas = load_file(str(src / DELTAS_FILE))
    edit(deltas)
    save_file(deltas, str(dst / DELTAS_FILE))
    return dst


def _edit_meta(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    _copy(src, dst)
    meta = json.loads((src / META_FILE).read_text())
    edit(meta)
    (dst / META_FILE).write_text(json.dumps(meta))
    return dst


def _poke(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(deltas: dict[str, torch.Tensor]) -> None:
        tensor = deltas[key].clone()
        tensor.view(-1)[5] = value
        deltas[key] = tensor

    return edit


def _list(paths: list[Path] | tuple[Path, ...]) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


# ------------------------------------------------------------------------------------------- rows

#: A row builds its inputs under its own folder and returns (argv, words the error line must contain).
Build = Callable[[World, Path], tuple[list[str], list[str]]]


def _merge(world: World, tmp: Path, folders: list[Path], *extra: str) -> list[str]:
    return ["merge", "--task_vectors", _list(folders), "--output", str(tmp / "out"), *extra]


def truncated_safetensors(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _copy(w.dense[1], tmp / "beta")
    data = (bad / DELTAS_FILE).read_bytes()
    (bad / DELTAS_FILE).write_bytes(data[: len(data) // 2])
    return _merge(w, tmp, [w.dense[0], bad]), [str(bad / DELTAS_FILE), "not a readable safetensors file"]


def lora_missing_b(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _edit_deltas(w.lora[1], tmp / "delta", lambda d: d.pop(QUERY + ".lora_B"))
    return _merge(w, tmp, [w.lora[0], bad]), [str(bad / DELTAS_FILE), QUERY + ".lora_A", "no matching"]


def dense_key_not_in_base(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    typo = QUERY.replace("query", "qurey")
    bad = _edit_deltas(w.dense[1], tmp / "beta", lambda d: d.update({typo: torch.zeros(32, 32)}))
    return _merge(w, tmp, [w.dense[0], bad]), [str(bad / DELTAS_FILE), typo, "not parameters of the base model"]


def wrong_shape(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _edit_deltas(w.dense[1], tmp / "beta", lambda d: d.update({QUERY: torch.zeros(32, 31)}))
    return _merge(w, tmp, [w.dense[0], bad]), [str(bad / DELTAS_FILE), QUERY, "[32, 31]", "[32, 32]"]


def nan_delta(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _edit_deltas(w.dense[1], tmp / "beta", _poke(LATE, math.nan))
    return _merge(w, tmp, [w.dense[0], bad]), [str(bad / DELTAS_FILE), LATE, "non-finite"]


def inf_delta(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _edit_deltas(w.dense[1], tmp / "beta", _poke(QUERY, -math.inf))
    return _merge(w, tmp, [w.dense[0], bad]), [str(bad / DELTAS_FILE), QUERY, "non-finite"]


def two_base_models(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    return _merge(w, tmp, [w.dense[0], w.foreign]), ["disagree", str(w.dense[0]), str(w.foreign)]


def lora_rank_differs_from_meta(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _edit_meta(w.lora[1], tmp / "delta", lambda m: m["lora"].update(r=3))
    return _merge(w, tmp, [w.lora[0], bad]), [str(bad / DELTAS_FILE), "lora.r=3"]


def lora_targets_differ_from_meta(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _edit_meta(w.lora[1], tmp / "delta", lambda m: m["lora"].update(target_modules=["query"]))
    return _merge(w, tmp, [w.lora[0], bad]), [str(bad / DELTAS_FILE), "target_modules", "value"]


def invalid_meta_json(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    bad = _copy(w.dense[1], tmp / "beta")
    (bad / META_FILE).write_text('{"task": "beta",')
    return _merge(w, tmp, [w.dense[0], bad]), [str(bad / META_FILE), "invalid JSON"]


def empty_task_list(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    return _merge(w, tmp, []), ["task_vectors=[]"]


def unknown_method(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    return _merge(w, tmp, w.dense, "--method", "drm_x"), ["'drm_x'", *sorted(METHODS)]


def drop_rate_out_of_range(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    return _merge(w, tmp, w.dense, "--method", "dare", "--params", "{drop_rate: 1.5}"), ["drop_rate", "1.5"]


def density_out_of_range(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    return _merge(w, tmp, w.dense, "--method", "ties", "--params", "{density: -0.2}"), ["density", "-0.2"]


def merge_yaml_typo(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    config = tmp / "ties.yaml"
    config.write_text("methd: ties\nparams:\n  density: 0.2\n")
    return _merge(w, tmp, w.dense, "--config", str(config)), ["methd"]


def fit_yaml_typo(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    config = tmp / "model.yaml"
    config.write_text(f"model:\n  backbone: {w.bert}\n  learning_rat: 0.001\n")
    return ["fit", "--config", str(config), "--task_vector_dir", str(tmp / "out")], ["learning_rat"]


def dataset_without_label_column(w: World, tmp: Path) -> tuple[list[str], list[str]]:
    files = {}
    for split in ("train", "validation"):
        path = tmp / f"{split}.csv"
        path.write_text("text,sentiment\n" + "".join(f"the movie is {w},{w}\n" for w in ("good", "bad") * 4))
        files[split] = str(path)
    task = {
        "data": {
            "class_path": "drm_lightning.data.text.TextClassificationDataModule",
            "init_args": {"task": "nolabel", "label_names": ["bad", "good"], "data_files": files, "test_split": None},
        }
    }
    task_yaml = tmp / "task.yaml"
    task_yaml.write_text(json.dumps(task))
    argv = ["fit", "--config", str(w.model_yaml), "--config", str(task_yaml), *QUIET_TRAINER]
    argv += [f"--trainer.default_root_dir={tmp / 'runs'}", "--task_vector_dir", str(tmp / "out")]
    return argv, ["'label'", "available", "'text'", "'sentiment'"]


@dataclass(frozen=True)
class Row:
    build: Build
    subprocess: bool = False
    xfail: str | None = None


ROWS: dict[str, Row] = {
    "truncated safetensors": Row(truncated_safetensors, subprocess=True),
    "LoRA task vector missing its lora_B half": Row(lora_missing_b),
    "dense key that is not a base parameter": Row(dense_key_not_in_base),
    "parameter with a different shape": Row(wrong_shape),
    "NaN in a delta": Row(nan_delta),
    "Inf in a delta": Row(inf_delta),
    "task vectors of two base models": Row(two_base_models),
    "LoRA rank differs from meta.json": Row(lora_rank_differs_from_meta),
    "LoRA targets differ from meta.json": Row(lora_targets_differ_from_meta),
    "meta.json is not JSON": Row(invalid_meta_json),
    "empty task list": Row(empty_task_list),
    "unknown method lists the known ones": Row(unknown_method),
    "drop rate out of range": Row(drop_rate_out_of_range),
    "density out of range": Row(density_out_of_range),
    "merge YAML with a typo in a key": Row(merge_yaml_typo, subprocess=True),
    "fit YAML with a typo in a key": Row(fit_yaml_typo),
    "dataset without its label column": Row(dataset_without_label_column, subprocess=True),
}


def _params() -> list:
    out = []
    for name, row in ROWS.items():
        marks = []
        if row.subprocess:
            marks.append(pytest.mark.slow)
        if row.xfail is not None:
            marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=row.xfail))
        out.append(pytest.param(name, marks=marks, id=name.replace(" ", "_")))
    return out


def run_cli(argv: list[str], in_subprocess: bool, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``drm-lightning argv``; return (exit status, stderr)."""
    if in_subprocess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("DRM_LIGHTNING_DEBUG", None)
        done = subprocess.run(
            [sys.executable, "-m", "drm_lightning.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        return done.returncode, done.stderr
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, words: list[str]) -> None:
    """Non-zero exit, no traceback, exactly one error line that contains every word."""
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, err
    missing = [w for w in words if w not in errors[0]]
    assert not missing, f"{missing} not in {errors[0]!r}"


def leftovers(tmp: Path) -> list[str]:
    """Anything at the output path or derived from it: ``out``, ``out_delta``, ``.out*.tmp-*`` siblings."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("out", ".out")))


@pytest.mark.parametrize("name", _params())
def test_bad_input_is_one_error_line_and_writes_nothing(
    world: World, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = ROWS[name]
    argv, words = row.build(world, tmp_path)
    code, err = run_cli(argv, row.subprocess, capsys)
    assert_refused(code, err, words)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("keep", [False, True], ids=["model", "model_and_kept_delta"])
@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_a_disk_too_small_for_the_merge_is_one_error_line_and_exit_1(
    world: World,
    kind: str,
    keep: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The free-space probe says 100 KiB: refused before any model loads, one line naming the folders it would
    write (the delta folder only where kept) and the sizes."""
    from drm_lightning.io import disk as io_disk

    monkeypatch.setattr(io_disk, "disk_free_bytes", lambda path: 100 * 1024)
    folders = world.dense if kind == "dense" else world.lora
    argv = [*_merge(world, tmp_path, folders), *(["--keep_delta", "true"] if keep else [])]
    code, err = run_cli(argv, False, capsys)
    assert code == 1
    assert_refused(code, err, [str(tmp_path / "out"), "MiB, 100 KiB free"])
    assert (str(tmp_path / "out_delta") in err) == keep
    assert leftovers(tmp_path) == []
