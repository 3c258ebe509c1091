"""``drm-lightning`` end to end on a tiny BERT and tiny csv tasks: fit, validate, merge, evaluate, and errors.

Everything runs in-process through ``main(args)`` (the console script's own function) except one subprocess check
of ``python -m drm_lightning.cli --help``. Two experts are fitted once per module (a few seconds each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from drm_lightning.cli import main
from tests.helpers.recipes import QUIET_TRAINER
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import TINY_TASKS, write_model_yaml, write_tiny_tasks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny BERT, two tiny tasks, and one expert fitted per task through ``drm-lightning fit``."""
    tmp = tmp_path_factory.mktemp("cli")
    backbone = make_tiny_model("encoder", tmp / "tiny_bert")
    tasks = write_tiny_tasks(tmp / "data")
    model_yaml = write_model_yaml(tmp, backbone)
    folders = {}
    for task, task_yaml in tasks.items():
        args = ["fit", "--config", str(model_yaml), "--config", str(task_yaml), *QUIET_TRAINER]
        args.append("--trainer.max_epochs=4")
        if task == "sentiment":  # an explicit folder
            folders[task] = tmp / "tv" / task
            args += [f"--trainer.default_root_dir={tmp}", f"--task_vector_dir={folders[task]}"]
        else:  # the default: <default_root_dir>/task_vectors/<task>
            folders[task] = tmp / "root" / "task_vectors" / task
            args += [f"--trainer.default_root_dir={tmp / 'root'}"]
        assert main(args) == 0
    return {"tmp": tmp, "backbone": backbone, "tasks": tasks, "model_yaml": model_yaml, "tv": folders}


def _list(paths) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_console_script_points_at_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["drm-lightning"] == "drm_lightning.cli:main"


def test_top_level_help_in_a_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "drm_lightning.cli", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("fit", "validate", "test", "merge", "evaluate", "pipeline"):
        assert f"  {command} " in done.stdout
    assert "--debug" in done.stdout and "DRM_LIGHTNING_VERBOSE=1" in done.stdout  # how to see the libraries' output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("fit", ["--task_vector_dir", "--model.backbone", "--data", "--trainer.max_epochs", "--print_config"]),
        ("merge", ["--task_vectors", "--method", "--lam", "--lambdas", "--coefficients", "scaling coefficient"]),
        ("evaluate", ["--model", "--task_vectors", "--tasks", "--experts", "--split"]),
        ("pipeline", ["--config", "--tasks", "--methods", "--model.backbone", "--trainer.max_epochs", "fit --help"]),
    ],
)
def test_subcommand_help(command: str, expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, f"{command} --help lacks {text!r}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 1
    assert "commands:" in capsys.readouterr().err


def test_fit_writes_one_task_vector_per_task(experts: dict) -> None:
    from drm_lightning.io.task_vector import read_meta

    for task, folder in experts["tv"].items():
        meta = read_meta(folder)
        assert (meta.task, meta.label_names, meta.base_model) == (task, TINY_TASKS[task], experts["backbone"])
        assert (folder / "task_vector.safetensors").is_file() and (folder / "head.safetensors").is_file()
    assert (experts["tmp"] / "root" / "config.yaml").is_file(), "fit records its config in default_root_dir"


@pytest.mark.parametrize("config", ["configs/trainer/cpu.yaml", "configs/trainer/gpu.yaml"])
def test_fit_with_a_logger_logs_model_and_data_hyperparameters(experts: dict, tmp_path: Path, config: str) -> None:
    """The GPU/DDP/FSDP trainer configs log with CSVLogger: the model's and the datamodule's hyperparameters share
    ``tokenizer`` and ``metrics`` with other values, which Lightning refuses to merge; data settings go under data/."""
    import yaml

    args = ["fit", "--config", str(experts["model_yaml"]), "--config", str(experts["tasks"]["animal"])]
    args += ["--config", str(ROOT / config), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += ["--trainer.precision=32"]
    args += ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    args += ["--trainer.max_epochs=1", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}"]
    assert main(args) == 0
    (hparams,) = tmp_path.rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["task"] == "animal" and logged["metrics"] == ["accuracy"] and logged["tokenizer"] is None
    assert logged["data/max_length"] == 16 and logged["data/tokenizer"] == experts["backbone"]
    assert (tmp_path / "task_vectors" / "animal" / "meta.json").is_file()


def test_print_config_shows_linked_and_given_values(experts: dict, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(experts["model_yaml"]), "--config", str(experts["tasks"]["animal"])]
    assert main([*args, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert f"backbone: {experts['backbone']}" in out and "task: animal" in out and "task_vector_dir:" in out


def test_validate_loads_the_expert_from_its_task_vector(
    experts: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    task_yaml = experts["tasks"]["sentiment"]
    args = ["validate", "--config", str(experts["model_yaml"]), "--config", str(task_yaml), *QUIET_TRAINER]
    monkeypatch.chdir(tmp_path)
    assert main([*args, f"--task_vector_dir={experts['tv']['sentiment']}"]) == 0
    assert "val/sentiment/accuracy" in capsys.readouterr().out
    assert not list(tmp_path.iterdir()), "validate writes nothing into the working folder"


def test_merge_writes_model_heads_and_record(experts: dict) -> None:
    out = experts["tmp"] / "merged" / "ties"
    args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(out)]
    assert main([*args, "--method", "ties", "--params", "{density: 0.5}", "--lam", "0.7"]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert (record["method"], record["lam"], record["params"]["density"]) == ("ties", 0.7, 0.5)
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert sorted(p.name for p in (out / "heads").iterdir()) == sorted(TINY_TASKS)
    # a fixed λ writes the model straight from the merge: no delta folder, none named, nothing left beside it
    assert not Path(f"{out}_delta").exists() and record["merged_delta"] is None
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    # --keep_delta keeps one, and the model folder is the same, byte for byte
    kept = experts["tmp"] / "merged" / "ties_kept"
    args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(kept), "--keep_delta", "true"]
    assert main([*args, "--method", "ties", "--params", "{density: 0.5}", "--lam", "0.7"]) == 0
    assert (Path(f"{kept}_delta") / "merge.json").is_file()
    assert json.loads((kept / "merge.json").read_text())["merged_delta"] == str(Path(f"{kept}_delta").resolve())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in kept.glob("*.safetensors"))
    assert all((out / name).read_bytes() == (kept / name).read_bytes() for name in shards)


def test_merge_searches_lambda_on_validation(experts: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = experts["tmp"] / "merged" / "ta_search"
    args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(out), "--lam", "search"]
    args += ["--lambdas", "[0.5, 1.0]", "--tasks", _list(experts["tasks"].values()), "--extend_edges", "0"]
    capsys.readouterr()
    assert main(args) == 0
    search = json.loads((out / "lambda_search.json").read_text())
    assert [p["lambda"] for p in search["curve"]] == [0.5, 1.0]
    assert search["evaluations"] == 2 and search["notes"] == []  # the cost of the search, said
    assert "2 λ evaluations" in capsys.readouterr().err
    record = json.loads((out / "merge.json").read_text())
    assert record["lam"] == search["best_lambda"]
    # the searched Δ lived in a temporary folder beside the output, removed once the model was written
    assert record["merged_delta"] is None and not Path(f"{out}_delta").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    best = next(p for p in search["curve"] if p["lambda"] == search["best_lambda"])
    card = (out / "README.md").read_text(encoding="utf-8").split("## Results", 1)[1]  # the model card's results
    for task, metrics in best["metrics"].items():
        assert f"| {task} | accuracy | {metrics['accuracy']:.4f} |" in card


def test_merge_searches_method_parameters_with_lambda(experts: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """A list in --params: every set merged into <delta>/<values>/, each with its λ search, the best pair written,
    the landscape in lambda_search.json. A two-point grid's best is always at an edge: one round (the default
    --extend_edges 1) adds two λ beyond it per set and, as in pipeline, one drop rate beyond the best one."""
    out = experts["tmp"] / "merged" / "drm_search"
    args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(out), "--lam", "search"]
    args += ["--method", "drm_v", "--params", "{drop_rate: [0.3, 0.7]}", "--lambdas", "[0.5, 1.0]"]
    args += ["--keep_delta", "true"]  # every set's Δ kept in <out>_delta/<values>/
    capsys.readouterr()
    assert main([*args, "--tasks", _list(experts["tasks"].values())]) == 0
    err = capsys.readouterr().err
    search = json.loads((out / "lambda_search.json").read_text())
    names = [v["name"] for v in search["variants"]]
    assert names[:2] == ["drop_rate-0.3", "drop_rate-0.7"] and len(names) == 3, names
    first_best = max(search["variants"][:2], key=lambda v: v["best_score"])["values"]["drop_rate"]
    # a step of 0.4 beyond the edge leaves [0, 1): half a step instead (sweep.edge_extension)
    assert names[2] == {0.3: "drop_rate-0.1", 0.7: "drop_rate-0.9"}[first_best]
    assert all(len(v["curve"]) == 4 and v["notes"] for v in search["variants"])  # one λ round: two more λ each
    assert search["evaluations"] == 12 == sum(v["evaluations"] for v in search["variants"])
    assert any(f"added {names[2]}" in note for note in search["notes"])
    assert f"added {names[2]}" in err and "12 λ evaluations in all" in err
    chosen = next(v for v in search["variants"] if v["name"] == search["chosen"])
    assert chosen["best_score"] == max(v["best_score"] for v in search["variants"]) == search["best_score"]
    record = json.loads((out / "merge.json").read_text())
    assert record["lam"] == chosen["best_lambda"] and record["params"]["drop_rate"] == chosen["values"]["drop_rate"]
    for name in names:
        assert json.loads((Path(f"{out}_delta") / name / "merge.json").read_text())["params"]["drop_rate"] == float(
            name.split("-")[1]
        )


def test_merge_parameter_search_edges_are_bounded(experts: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """A fixed λ scores each set once; --extend_edges 0 adds nothing, --extend_edges 2 at most two sets, each said."""
    tvs, tasks = _list(experts["tv"].values()), _list(experts["tasks"].values())
    seen = {}
    for rounds in (0, 2):
        out = experts["tmp"] / "merged" / f"ties_edges_{rounds}"
        args = ["merge", "--task_vectors", tvs, "--output", str(out), "--lam", "1.0", "--method", "ties"]
        args += ["--params", "{density: [0.4, 0.6]}", "--tasks", tasks, "--extend_edges", str(rounds)]
        capsys.readouterr()
        assert main(args) == 0
        err = capsys.readouterr().err
        search = json.loads((out / "lambda_search.json").read_text())
        assert all(len(v["curve"]) == 1 and v["best_lambda"] == 1.0 for v in search["variants"])
        assert search["evaluations"] == len(search["variants"])
        added = [note for note in search["notes"] if "added" in note]
        assert len(added) == len(search["variants"]) - 2 <= rounds and all(note in err for note in added)
        seen[rounds] = [v["name"] for v in search["variants"]]
    assert seen[0] == ["density-0.4", "density-0.6"] and seen[2][:2] == seen[0] and len(seen[2]) > 2


@pytest.mark.parametrize("mode", ["merged_model", "merged_delta", "experts", "pretrained"])
def test_evaluate_reports_every_task(experts: dict, mode: str) -> None:
    merged = experts["tmp"] / "merged" / "eval_ta"
    if not merged.exists():
        args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(merged), "--lam", "0.5"]
        assert main([*args, "--keep_delta", "true"]) == 0
    extra = {
        "merged_model": ["--model", str(merged)],
        "merged_delta": ["--model", f"{merged}_delta", "--lam", "0.5"],
        "experts": ["--experts", "true"],
        "pretrained": [],
    }[mode]
    output = experts["tmp"] / f"metrics_{mode}.json"
    args = ["evaluate", "--task_vectors", _list(experts["tv"].values()), "--tasks", _list(experts["tasks"].values())]
    assert main([*args, *extra, "--split", "test", "--output", str(output)]) == 0
    metrics = json.loads(output.read_text())
    assert sorted(metrics) == sorted(TINY_TASKS)
    assert all(0.0 <= metrics[t]["accuracy"] <= 1.0 for t in metrics)
    if mode == "experts":  # the tiny tasks are learnable: each expert beats chance on its own task
        assert all(metrics[t]["accuracy"] > 0.6 for t in metrics), metrics


def test_merged_model_and_delta_at_the_same_lambda_agree(experts: dict) -> None:
    merged = experts["tmp"] / "merged" / "eval_ta"
    a, b = experts["tmp"] / "metrics_merged_model.json", experts["tmp"] / "metrics_merged_delta.json"
    if not (a.is_file() and b.is_file()):
        pytest.skip("needs test_evaluate_reports_every_task to have run first")
    assert merged.exists()
    from_model, from_delta = json.loads(a.read_text()), json.loads(b.read_text())
    assert sorted(from_model) == sorted(from_delta)
    for task, values in from_model.items():
        assert values == pytest.approx(from_delta[task], abs=1e-5), task


def _bad_merge_cases() -> list:
    return [
        ("unknown_method", ["--method", "nope"], ["nope", "drm_v", "drm_h", "iso_c", "iso_cts", "tsv_m", "ties"]),
        ("bad_param", ["--method", "ties", "--params", "{density: 2.0}"], ["density"]),
        ("other_base", ["--base", "{other}"], ["fingerprint", "{other}"]),
        ("missing_folder", ["--task_vectors", "[{tmp}/nowhere]"], ["nowhere"]),
        ("search_without_tasks", ["--lam", "search"], ["tasks"]),
        ("bad_option", ["--no_such_option", "1"], ["no_such_option"]),
        ("bad_lam", ["--lam", "big"], ["lam"]),
    ]


@pytest.mark.parametrize(("case", "extra", "words"), _bad_merge_cases(), ids=[c[0] for c in _bad_merge_cases()])
def test_merge_errors_are_one_line_exit_1_and_write_nothing(
    experts: dict, case: str, extra: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = experts["tmp"]
    other = tmp / "other_bert"
    if case == "other_base" and not other.exists():
        make_tiny_model("encoder", other, seed=1)
    fill = {"{other}": str(other), "{tmp}": str(tmp)}

    def sub(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    out = tmp / "bad" / case
    args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(out)]
    capsys.readouterr()
    assert main([*args, *[sub(e) for e in extra]]) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("drm-lightning: error: "), lines
    for word in words:
        assert sub(word) in lines[0]
    assert not out.exists() and not Path(f"{out}_delta").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["frobnicate"], ["frobnicate", "merge"]),
        (["evaluate", "--task_vectors", "[]", "--tasks", "[]"], ["task_vectors"]),
        (["pipeline", "--config", "/nonexistent/recipe.yaml"], ["recipe.yaml"]),
        (["fit", "--model.backbone", "x"], ["data"]),
    ],
)
def test_other_user_errors(args: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("drm-lightning: error: "), lines
    assert all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(experts: dict, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["merge", "--task_vectors", _list(experts["tv"].values()), "--output", str(experts["tmp"] / "dbg")]
    args += ["--method", "nope"]
    if how == "flag":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("DRM_LIGHTNING_DEBUG", "1")
    with pytest.raises(ValueError, match="nope"):
        main(args)


def _load_refused(path: str) -> None:
    """What ``torch.load(path, weights_only=True)`` does with an unsafe pickle, without writing one."""
    import pickle

    def load(f: str) -> None:
        raise pickle.UnpicklingError("Weights only load failed.\n  Unsupported global: GLOBAL builtins.exec")

    path_or_url = path  # the name Lightning's loader keeps the path under
    load(path_or_url)


def _raise(err: BaseException):
    def run(command: str, args: list[str], quiet) -> None:
        raise err

    return run


def _refuse_pickle(command: str, args: list[str], quiet) -> None:
    _load_refused("/ckpts/evil.ckpt")


#: (what ``_run`` does, words the one error line must hold); every row exits 1 with one line and no traceback.
ENVIRONMENT_ERRORS = [
    (_raise(OSError(28, "No space left on device", "/out/model.safetensors")), ["No space left", "model.safetensors"]),
    (_raise(OSError(28, "No space left on device")), ["No space left on device"]),
    (_raise(FileNotFoundError(2, "No such file or directory", "/x/meta.json")), ["No such file", "/x/meta.json"]),
    (_raise(PermissionError(13, "Permission denied", "/ro/out")), ["Permission denied", "/ro/out"]),
    (_raise(IsADirectoryError(21, "Is a directory", "/tmp")), ["Is a directory", "/tmp"]),
    (_refuse_pickle, ["/ckpts/evil.ckpt", "Weights only load failed", "Unsupported global"]),
]


@pytest.mark.parametrize(("run", "words"), ENVIRONMENT_ERRORS)
def test_environment_errors_are_one_line(
    run, words: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("drm_lightning.cli._run", run)
    monkeypatch.delenv("DRM_LIGHTNING_DEBUG", raising=False)
    assert main(["merge"]) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("drm-lightning: error: "), err
    assert all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("error", [TypeError("bad type"), AttributeError("no attr"), KeyError("k"), RuntimeError("x")])
def test_programming_errors_keep_their_traceback(error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("drm_lightning.cli._run", _raise(error))
    monkeypatch.delenv("DRM_LIGHTNING_DEBUG", raising=False)
    with pytest.raises(type(error)):
        main(["merge"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--params", "{density:0.2}"], ["--params", "{density: 0.2}"]),  # as one types JSON
        (["--params={drop_rate:[0.3,0.6],seed:3}"], ["--params={drop_rate: [0.3,0.6],seed: 3}"]),
        (["--eval_trainer", "{ devices:1 }"], ["--eval_trainer", "{ devices: 1 }"]),
        (["--params", "{density: 0.2}"], ["--params", "{density: 0.2}"]),  # already YAML: unchanged
        (["--params", '{"density":0.2}'], ["--params", '{"density":0.2}']),  # JSON with quoted keys: YAML reads it
        (["--base", "{url:https://x}"], ["--base", "{url: https://x}"]),  # the key only, not the URL's colon
        (["--output", "runs/a:b"], ["--output", "runs/a:b"]),  # not a mapping
    ],
)
def test_flow_mappings_without_a_space_after_the_colon_are_read_as_mappings(given: list[str], expected) -> None:
    import yaml

    from drm_lightning.cli import spaced_flow_mappings

    assert spaced_flow_mappings(given) == expected
    value = expected[-1].partition("=")[2] if expected[-1].startswith("--") else expected[-1]
    if value.startswith("{"):
        assert isinstance(yaml.safe_load(value), dict) and None not in yaml.safe_load(value).values()
