"""Faults during long runs: a SIGKILLed merge or fit, an output that cannot be written, a full disk, and
determinism (the same inputs give the same bytes).

What is promised, and shown here:

- A merge killed at any moment leaves nothing at its output path; running the same command again completes and
  gives the same bytes as an uninterrupted run, and removes the temporary folder the killed run left behind
  (``format.remove_stale_temporaries``).
- A fit killed part-way leaves no task vector; ``--ckpt_path`` resumes it from its last checkpoint to the end, and
  gives the same task vector as an uninterrupted run, bit for bit, dropout included (the checkpoint keeps the
  generators' states, ``ExpertModule.on_save_checkpoint``; the train order depends only on (seed, epoch)).
- An output that cannot be written is refused before any model is loaded; a disk that fills up mid-merge leaves
  nothing at the output path.
- Merges are byte-deterministic; DARE's random drop follows its seed.

Why the kills are done by the killed process itself (a patched hook or a callback calls ``os.kill(getpid(),
SIGKILL)``): the moment is then exact (after the n-th merged tensor, after the first epoch's checkpoint), so the
test never races the process it kills, and a SIGKILL is a SIGKILL whoever sends it: nothing in the process runs
after it. The killed processes are real ``drm-lightning`` runs in subprocesses (``slow``); re-runs are in-process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from drm_lightning.cli import main
from drm_lightning.io import shards
from drm_lightning.io.atomic import atomic_dir, remove_stale_temporaries
from drm_lightning.io.merged_delta import MERGED_DIR
from drm_lightning.io.task_vector import DELTAS_FILE, HEAD_FILE
from drm_lightning.merging.engine import apply, setup
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.record import MERGE_FILE
from drm_lightning.models.expert import ExpertModule
from tests.helpers.merge_inputs import write_task_vectors
from tests.helpers.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "drm-lightning: error: "


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DRM_LIGHTNING_DEBUG", None)
    return env


def _list(paths: list[Path]) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


def _hidden(folder: Path) -> list[str]:
    """Dot-files beside outputs: the temporaries ``atomic_dir`` makes (``.<name>.tmp-*`` / ``.<name>.old-*``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _comparable(folder: Path) -> dict[str, Any]:
    """Every file's bytes under ``folder``; ``merge.json`` parsed, without its timings and its own location."""
    out: dict[str, Any] = {}
    for name, data in _files(folder).items():
        if Path(name).name == MERGE_FILE:
            record = json.loads(data)
            record.pop("timings")
            record.pop("merged_delta", None)  # the absolute path of <output>_delta, which differs between outputs
            out[name] = record
        else:
            out[name] = data
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    bert = make_tiny_model("encoder", root / "bert")
    tvs = write_task_vectors(bert, root / "tv", 3, tasks=["alpha", "beta", "gamma"])
    return {"root": root, "bert": bert, "tvs": tvs}


# ------------------------------------------------------------------------------------------ killed merges

#: Runs ``drm-lightning`` with one hook patched to SIGKILL the process at a chosen moment:
#: ``merge K``: after the K-th merged tensor is added to the model (a fixed λ: no Δ folder is written);
#: ``delta K``: after the K-th merged tensor is written to Δ (shards of 16 kB, so several are already on disk): a
#: kept Δ (``--keep_delta``), or the temporary Δ of a λ search (``search``: its datamodules are stubbed out, it dies
#: before any validation);
#: ``apply``: after the merged model's weights and tokenizer are written, just before the final rename.
KILLER = """
import os, signal, sys
from drm_lightning.io import shards
from drm_lightning.export import checkpoint_base, folder_writer, model_folder

phase, k, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
def counted(deltas):
    for i, item in enumerate(deltas, 1):
        yield item
        if i == k:
            die()
if phase == "merge":  # whichever way the base is merged into: its model class or its own checkpoint
    add_all, add_to_checkpoint = model_folder.add_merged_delta, checkpoint_base.CheckpointBase.add
    def add_then_die(model, merged, lam, *, deltas=None):
        return add_all(model, merged, lam, deltas=counted(deltas))
    def add_to_checkpoint_then_die(self, lam, deltas, source):
        return add_to_checkpoint(self, lam, counted(deltas), source)
    model_folder.add_merged_delta = add_then_die
    checkpoint_base.CheckpointBase.add = add_to_checkpoint_then_die
elif phase in ("delta", "search"):
    if phase == "search":
        from drm_lightning.commands import merge as merge_command
        merge_command.task_datamodules = lambda tasks, task_vectors: {}
    init, add, count = shards.ShardWriter.__init__, shards.ShardWriter.add, [0]
    def small_shards(self, folder, max_shard_bytes=0, prefix="delta"):
        init(self, folder, 16_000, prefix)
    def add_then_die(self, name, tensor):
        add(self, name, tensor)
        count[0] += 1
        if count[0] == k:
            die()
    shards.ShardWriter.__init__, shards.ShardWriter.add = small_shards, add_then_die
else:
    save = folder_writer.save_tokenizer
    def save_then_die(base, folder):
        save(base, folder)
        die()
    folder_writer.save_tokenizer = save_then_die
from drm_lightning.cli import main
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def reference_merge(world: dict[str, Any]) -> Path:
    """An uninterrupted ``drm-lightning merge`` (TIES): what every re-run after a kill must reproduce."""
    out = world["root"] / "reference" / "out"
    assert main(_merge_argv(world, out)) == 0
    return out


def _merge_argv(world: dict[str, Any], out: Path, keep_delta: bool = True) -> list[str]:
    argv = ["merge", "--task_vectors", _list(world["tvs"]), "--output", str(out), "--method", "ties", "--lam", "0.7"]
    return [*argv, "--keep_delta", "true"] if keep_delta else argv


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "k", "keep", "stray"),
    [
        ("merge", 20, False, None),
        ("delta", 20, True, ".out_delta.tmp-"),
        ("search", 20, False, ".out.tmp-"),
        ("apply", 0, False, ".out.tmp-"),
        ("apply", 0, True, ".out.tmp-"),
    ],
    ids=["while_merging", "while_writing_a_kept_delta", "while_writing_a_search_delta", "while_writing_the_model",
         "while_writing_the_model_beside_a_kept_delta"],
)  # fmt: skip
def test_killed_merge_leaves_nothing_and_a_rerun_gives_the_same_bytes(
    world: dict[str, Any], reference_merge: Path, tmp_path: Path, phase: str, k: int, keep: bool, stray: str | None
) -> None:
    out = tmp_path / "out"
    argv = _merge_argv(world, out, keep)
    killed = argv
    if phase == "search":  # a λ search over stubbed datamodules: it dies while writing its temporary Δ
        killed = [*argv[: argv.index("--lam")], "--lam", "search", "--tasks", "[stub]"]
    done = subprocess.run(
        [sys.executable, "-c", KILLER, phase, str(k), *killed], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]

    # Nothing at the output path: the model folder never appeared; a delta folder only if kept and complete.
    assert not out.exists()
    delta = Path(f"{out}_delta")
    assert delta.exists() == (phase == "apply" and keep)
    if delta.exists():
        assert _comparable(delta) == _comparable(Path(f"{reference_merge}_delta"))
    # The killed run's temporary folder is left behind (nothing runs after SIGKILL), holding partial work; a merge
    # at a fixed λ had written nothing yet.
    leftovers = [p for p in tmp_path.iterdir() if stray is not None and p.name.startswith(stray)]
    assert len(leftovers) == (stray is not None) and _hidden(tmp_path) == [p.name for p in leftovers]
    assert all(any(p.suffix == ".safetensors" for p in left.rglob("*")) for left in leftovers), "killed too early"

    assert main(argv) == 0
    assert _comparable(out) == _comparable(reference_merge)
    assert delta.exists() == keep
    if keep:
        assert _comparable(delta) == _comparable(Path(f"{reference_merge}_delta"))
    assert _hidden(tmp_path) == [], "the re-run should remove the dead run's temporary folder"


# ------------------------------------------------------------------------------------------ stale temporaries


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_new_write_removes_only_dead_local_temporaries(tmp_path: Path) -> None:
    """Kept: a live process's temporary, another host's, a foreign dot-folder, and ``.old`` when it is the only copy.
    Removed: this host's temporaries of dead processes."""
    host = socket.gethostname()
    tag = "".join(c if c.isalnum() or c == "_" else "_" for c in host) or "host"
    dead, live = _dead_pid(), os.getppid()
    names = {
        f".out.tmp-{tag}-{dead}-abc": False,
        f".out.old-{tag}-{dead}": False,
        f".out.tmp-{tag}-{live}-abc": True,
        f".out.tmp-elsewhere_{tag}-{dead}-abc": True,
        f".out.tmp-{tag}-notapid-abc": True,
        f".other.tmp-{tag}-{dead}-abc": True,
        ".out.tmp-legacy123": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.safetensors").write_bytes(b"partial")
    # With no target yet, the dead run's .old folder is the previous output itself: kept.
    assert (tmp_path / f".out.old-{tag}-{dead}") not in remove_stale_temporaries(tmp_path / "out")
    assert (tmp_path / f".out.old-{tag}-{dead}").exists()
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("done")
    assert (tmp_path / "out" / "new").read_text() == "done"
    kept = {name for name, keep in names.items() if keep}
    assert set(_hidden(tmp_path)) == kept


# ------------------------------------------------------------------------------------------ killed fits


@pytest.fixture(scope="module")
def fit_setup(world: dict[str, Any]) -> dict[str, Any]:
    """A tiny BERT with dropout 0.1 (backbone and head) and a small csv task; argv for a deterministic two-epoch
    fit of it. Dropout draws from the global generators, so resuming exactly needs their states restored."""
    root = world["root"] / "fit"
    bert = make_tiny_model("encoder", root / "bert", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    files = {}
    for split, n in (("train", 48), ("validation", 16)):
        words = ["good", "bad"] * (n // 2)
        rows = [f"the {('movie', 'plot', 'film')[i % 3]} is {w},{w}" for i, w in enumerate(words)]
        files[split] = root / f"{split}.csv"
        files[split].write_text("text,label\n" + "\n".join(rows) + "\n")
    task = {
        "class_path": "drm_lightning.data.text.TextClassificationDataModule",
        "init_args": {
            "task": "sentiment",
            "label_names": ["bad", "good"],
            "data_files": {k: str(v) for k, v in files.items()},
            "test_split": None,
            "batch_size": 8,
            "max_length": 16,
        },
    }
    model = {"backbone": bert, "pooling": "mean", "learning_rate": 0.003, "warmup_ratio": 0.0, "head_dropout": 0.1}
    (root / "fit.yaml").write_text(json.dumps({"data": task, "model": model}))
    argv = ["fit", "--config", str(root / "fit.yaml"), "--seed_everything=0", "--trainer.deterministic=true"]
    argv += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false"]
    argv += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    argv += ["--trainer.num_sanity_val_steps=0", "--trainer.max_epochs=2"]
    return {"root": root, "argv": argv}


def _fit(fit_setup: dict[str, Any], name: str, *extra: str) -> dict[str, torch.Tensor]:
    folder = fit_setup["root"] / name
    argv = [*fit_setup["argv"], f"--trainer.default_root_dir={folder}", f"--task_vector_dir={folder / 'tv'}"]
    assert main([*argv, "--trainer.enable_checkpointing=false", *extra]) == 0
    return {**load_file(str(folder / "tv" / DELTAS_FILE)), **load_file(str(folder / "tv" / HEAD_FILE))}


def _checkpointing(dirpath: Path) -> list[str]:
    return [
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={dirpath}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_epochs=1",
    ]


@pytest.fixture(scope="module")
def killed_fit(fit_setup: dict[str, Any]) -> Path:
    """A real ``drm-lightning fit`` SIGKILLed in its second epoch, after the first epoch's checkpoint was written;
    returns its ``last.ckpt``."""
    folder = fit_setup["root"] / "killed"
    argv = [*fit_setup["argv"], f"--trainer.default_root_dir={folder}", f"--task_vector_dir={folder / 'tv'}"]
    argv += [*_checkpointing(folder / "ckpt"), "--trainer.callbacks+=tests.helpers.faults.SigkillAt"]
    argv += ["--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=2"]
    # CPU float reductions depend on the thread count: train with this process's, as the in-process runs do.
    env = {**_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-m", "drm_lightning.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not (folder / "tv").exists() and _hidden(folder) == [], "a killed fit must leave no task vector"
    last = folder / "ckpt" / "last.ckpt"
    assert last.is_file()
    return last


@pytest.fixture(scope="module")
def resumed_fits(fit_setup: dict[str, Any], killed_fit: Path) -> list[dict[str, torch.Tensor]]:
    """Two in-process ``fit --ckpt_path <last.ckpt>`` runs, each to the end: their task vectors and heads."""
    return [_fit(fit_setup, f"resumed_{i}", f"--ckpt_path={killed_fit}") for i in range(2)]


@pytest.mark.slow
def test_killed_fit_resumes_from_its_last_checkpoint_deterministically(
    killed_fit: Path, resumed_fits: list[dict[str, torch.Tensor]]
) -> None:
    checkpoint = torch.load(killed_fit, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0, "the last checkpoint should be the first epoch's"
    [states] = checkpoint[ExpertModule.RNG_KEY]  # one rank
    assert {"torch", "python", "numpy"} <= states.keys()
    first, second = resumed_fits
    assert first.keys() == second.keys() and len(first) > 2
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def uninterrupted_fit(fit_setup: dict[str, Any]) -> dict[str, torch.Tensor]:
    return _fit(fit_setup, "uninterrupted")


@pytest.mark.slow
def test_resumed_fit_equals_an_uninterrupted_one(
    uninterrupted_fit: dict[str, torch.Tensor], resumed_fits: list[dict[str, torch.Tensor]]
) -> None:
    """Bit-equal with dropout on: the train order depends only on (seed, epoch), and the checkpoint brings back the
    generators' states as they were when it was saved."""
    assert resumed_fits[0].keys() == uninterrupted_fit.keys()
    assert all(torch.equal(resumed_fits[0][k], uninterrupted_fit[k]) for k in uninterrupted_fit)


@pytest.mark.slow
def test_resume_without_the_saved_generator_states_differs(
    fit_setup: dict[str, Any],
    killed_fit: Path,
    uninterrupted_fit: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: with the restore switched off (Lightning's own behaviour) the dropout masks, and so the task
    vector, differ; the equality above is the restore's doing, not dropout drawing nothing."""
    monkeypatch.setattr(ExpertModule, "set_rng_states", staticmethod(lambda states: None))
    resumed = _fit(fit_setup, "resumed_without_rng", f"--ckpt_path={killed_fit}")
    assert resumed.keys() == uninterrupted_fit.keys()
    assert not all(torch.equal(resumed[k], uninterrupted_fit[k]) for k in uninterrupted_fit)


# ------------------------------------------------------------------------------------------ unwritable outputs


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any base-model load by the merger: a refusal "before heavy work" must leave it empty."""
    loads: list[str] = []
    real = setup.load_backbone

    def recording(name: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(name)
        return real(name, *args, **kwargs)

    for module in (setup, apply):  # the merge and the model folder load the base there
        monkeypatch.setattr(module, "load_backbone", recording)
    return loads


def _regular_file_parent(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "file").write_text("I am a file")
    return tmp / "file" / "merged", []


def _regular_file_parent_delta_elsewhere(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "file").write_text("I am a file")
    return tmp / "file" / "merged", ["--delta_dir", str(tmp / "delta")]


def _read_only_folder(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return tmp / "ro" / "merged", []


@pytest.mark.parametrize(
    "make",
    [
        _regular_file_parent,
        _regular_file_parent_delta_elsewhere,
        pytest.param(
            _read_only_folder,
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555"),
        ),
    ],
    ids=["parent_is_a_file", "parent_is_a_file_delta_elsewhere", "read_only_folder"],
)
def test_unwritable_output_is_refused_before_any_model_loads(
    world: dict[str, Any], tmp_path: Path, make: Any, no_model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, extra = make(tmp_path)
    capsys.readouterr()
    try:
        assert main(["merge", "--task_vectors", _list(world["tvs"]), "--output", str(out), *extra]) == 1
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and str(out.parent) in lines[0], lines
    assert no_model_loads == []
    assert not (tmp_path / "delta").exists()


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, target: Any, attr: str, writes: int) -> None:
    """Make ``target.attr`` (a file-writing function) write half a file and fail with ENOSPC from call ``writes``."""
    real, calls = getattr(target, attr), [0]

    def write(tensors: Mapping[str, torch.Tensor], filename: str, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] < writes:
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(target, attr, write)


def test_disk_full_mid_merge_leaves_nothing(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills anyway after the up-front check passed (another writer) fails mid-write, leaves no trace."""
    _disk_full_after(monkeypatch, shards, "save_file", writes=3)
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        merge_task_vectors(world["tvs"], "ties", out, progress=False, max_shard_bytes=16_000)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_disk_full_through_the_cli_is_one_error_line(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _disk_full_after(monkeypatch, shards, "save_file", writes=1)
    out = tmp_path / "out"
    assert main(_merge_argv(world, out)) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and "No space left" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize(
    ("method", "params_a", "params_b", "same"),
    [
        ("task_arithmetic", {}, {}, True),
        ("ties", {"density": 0.3}, {"density": 0.3}, True),
        ("drm_v", {}, {}, True),
        ("dare", {"seed": 7}, {"seed": 7}, True),
        ("dare", {"seed": 7}, {"seed": 8}, False),
    ],
    ids=["task_arithmetic", "ties", "drm_v", "dare_same_seed", "dare_other_seed"],
)
def test_merges_are_byte_deterministic_and_dare_follows_its_seed(
    world: dict[str, Any], tmp_path: Path, method: str, params_a: dict, params_b: dict, same: bool
) -> None:
    outs = []
    for i, params in enumerate((params_a, params_b)):
        outs.append(merge_task_vectors(world["tvs"], method, tmp_path / str(i), params, progress=False).output)
    a, b = _comparable(outs[0]), _comparable(outs[1])
    assert a.keys() == b.keys()
    shards = sorted(k for k in a if k.startswith(f"{MERGED_DIR}/") and k.endswith(".safetensors"))
    assert shards
    differ = sorted(k for k in a if a[k] != b[k])
    if same:
        assert differ == []
    else:  # only the drawn masks differ: the delta shards, and the seed in merge.json
        assert differ == sorted([MERGE_FILE, *shards])
        assert a[MERGE_FILE]["params"].pop("seed") != b[MERGE_FILE]["params"].pop("seed")
        assert a[MERGE_FILE] == b[MERGE_FILE]
