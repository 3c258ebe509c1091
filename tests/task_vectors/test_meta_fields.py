"""meta.json records how the base was loaded (``torch_dtype``, ``gguf_file``), and the consumers reload it so.

Why it matters: the fingerprint is of the base *as loaded*; an expert fitted on a float32 checkpoint loaded in
bfloat16 has a bfloat16 fingerprint, so merging or evaluating it used to need ``torch_dtype`` again by hand. The
real case here: a tiny BERT saved in float32, its expert built with ``torch_dtype="bfloat16"`` and written by the
``TaskVectorCallback``; merge, apply, ``MergedBackbone``, ``from_task_vector`` and ``evaluate`` then load the base
in bfloat16 unaided, an explicit argument still wins, and a meta.json of the old format still reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from drm_lightning.callbacks.task_vector import TaskVectorCallback
from drm_lightning.commands.evaluate import load_base, load_model
from drm_lightning.evaluation.merged import MergedBackbone
from drm_lightning.export.model_folder import save_merged_model
from drm_lightning.io.task_vector import META_FILE, TaskVectorError, TaskVectorMeta, read_meta, write_task_vector
from drm_lightning.merging.engine.apply import apply_merged_delta
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.record import MERGE_FILE, read_merge_record
from drm_lightning.merging.engine.setup import base_load_options
from drm_lightning.models import expert as expert_module
from drm_lightning.models.backbone import load_recorded_base
from drm_lightning.models.expert import ExpertModule
from drm_lightning.task_vectors.fingerprint import fingerprint
from tests.helpers.tiny_models import make_tiny_model

LABELS = ["negative", "positive"]
REQUIRED = {"task": "t", "kind": "dense", "base_model": "m", "base_fingerprint": "f"}


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _strip(src: Path, dst: Path, *keys: str) -> Path:
    """A copy of task vector ``src`` whose meta.json lacks ``keys`` (as written before they existed)."""
    shutil.copytree(src, dst)
    data = json.loads((src / META_FILE).read_text())
    for key in keys:
        data.pop(key)
    (dst / META_FILE).write_text(json.dumps(data))
    return dst


# ------------------------------------------------------------------------------------------- the format


@pytest.mark.parametrize(
    ("torch_dtype", "gguf_file"),
    [(None, None), ("bfloat16", None), (None, "model.Q8_0.gguf"), ("float16", "smollm2.gguf")],
)
def test_fields_round_trip(tmp_path, torch_dtype, gguf_file):
    meta = TaskVectorMeta(**REQUIRED, torch_dtype=torch_dtype, gguf_file=gguf_file)
    back = read_meta(write_task_vector(tmp_path / "tv", {}, {}, meta))
    assert back == meta and (back.torch_dtype, back.gguf_file) == (torch_dtype, gguf_file)


def test_old_meta_without_the_fields_still_reads(tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({**REQUIRED, "family": "encoder", "format_version": 1}))
    meta = read_meta(tmp_path)
    assert (meta.torch_dtype, meta.gguf_file) == (None, None)
    assert meta.load_options() == {"torch_dtype": None, "gguf_file": None}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"torch_dtype": "bf16"}, "torch_dtype='bf16'"),
        ({"torch_dtype": 16}, "torch_dtype=16"),
        ({"gguf_file": ""}, "gguf_file=''"),
        ({"gguf_file": ["a.gguf"]}, r"gguf_file=\['a.gguf'\]"),
        ({"trust_remote_code": True}, "unknown key"),  # never recorded: running a folder's code stays opt-in
    ],
)
def test_bad_fields_name_the_file_and_value(tmp_path, extra, match):
    (tmp_path / META_FILE).write_text(json.dumps({**REQUIRED, **extra}))
    with pytest.raises(TaskVectorError, match=match) as err:
        read_meta(tmp_path)
    assert str(tmp_path / META_FILE) in str(err.value)


@pytest.mark.parametrize(
    ("recorded", "given", "expected"),
    [
        ((None, None), (None, None), (None, None)),
        (("bfloat16", "a.gguf"), (None, None), ("bfloat16", "a.gguf")),
        (("bfloat16", "a.gguf"), ("float32", None), ("float32", "a.gguf")),
        (("bfloat16", "a.gguf"), (None, "b.gguf"), ("bfloat16", "b.gguf")),
        ((None, None), ("float16", "b.gguf"), ("float16", "b.gguf")),
    ],
)
def test_an_explicit_value_wins_over_the_recorded_one(recorded, given, expected):
    meta = TaskVectorMeta(**REQUIRED, torch_dtype=recorded[0], gguf_file=recorded[1])
    assert meta.load_options(*given) == dict(zip(("torch_dtype", "gguf_file"), expected, strict=True))
    assert base_load_options([meta], ["tv"], *given) == meta.load_options(*given)


def test_task_vectors_that_disagree_are_refused_unless_told():
    metas = [
        TaskVectorMeta(**REQUIRED, torch_dtype="bfloat16"),
        TaskVectorMeta(**REQUIRED),  # old format: defers to the others
        TaskVectorMeta(**REQUIRED, torch_dtype="float16"),
    ]
    with pytest.raises(ValueError, match="tv/a has torch_dtype='bfloat16', tv/c has torch_dtype='float16'"):
        base_load_options(metas, ["tv/a", "tv/b", "tv/c"])
    assert base_load_options(metas[:2], ["tv/a", "tv/b"])["torch_dtype"] == "bfloat16"
    assert base_load_options(metas, ["tv/a", "tv/b", "tv/c"], torch.float32)["torch_dtype"] == "float32"


# ------------------------------------------------------------------------------------------- the consumers


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """A float32 tiny BERT, an expert of it fitted in bfloat16 (its weights moved by hand, as a fit would), written
    by the callback; and the merge of that task vector."""
    root = tmp_path_factory.mktemp("meta_fields")
    bert = make_tiny_model("encoder", root / "bert")
    expert = ExpertModule(bert, task="t", label_names=LABELS, torch_dtype="bfloat16")
    with torch.no_grad():
        expert.backbone.encoder.layer[1].output.dense.weight.add_(0.5)
    trainer = SimpleNamespace(
        is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
        callback_metrics={},
        default_root_dir=str(root),
        train_dataloader=None,  # no training data: no input statistics
    )
    callback = TaskVectorCallback(str(root / "tv"))
    callback.on_fit_end(trainer, expert)
    merged = merge_task_vectors([root / "tv"], "task_arithmetic", root / "merged", progress=False).output
    return {"bert": bert, "tv": root / "tv", "merged": merged, "root": root}


def test_the_callback_records_the_dtype(bf16):
    meta = read_meta(bf16["tv"])
    assert (meta.torch_dtype, meta.gguf_file) == ("bfloat16", None)
    assert _dtype(load_recorded_base(meta)) == torch.bfloat16


def test_merge_and_apply_load_the_base_as_recorded(bf16):
    record = read_merge_record(bf16["merged"])
    assert (record["torch_dtype"], record["gguf_file"]) == ("bfloat16", None)
    model = save_merged_model(bf16["merged"], 1.0, bf16["root"] / "applied")
    assert _dtype(model) == torch.bfloat16
    assert json.loads((bf16["root"] / "applied" / MERGE_FILE).read_text())["torch_dtype"] == "bfloat16"
    assert _dtype(MergedBackbone(bf16["merged"]).at(0.5)) == torch.bfloat16
    assert _dtype(load_model(str(bf16["merged"]), 1.0, [str(bf16["tv"])])) == torch.bfloat16


def test_an_old_meta_needs_the_dtype_again_and_an_explicit_one_wins(bf16, tmp_path):
    old = _strip(bf16["tv"], tmp_path / "old", "torch_dtype", "gguf_file")
    with pytest.raises(ValueError, match="loaded in its checkpoint's dtype.*refusing to merge"):
        merge_task_vectors([old], "task_arithmetic", tmp_path / "a", progress=False)
    merge_task_vectors([old], "task_arithmetic", tmp_path / "b", progress=False, torch_dtype="bfloat16")
    assert read_merge_record(tmp_path / "b")["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="loaded with torch_dtype='float32'"):
        merge_task_vectors([bf16["tv"]], "task_arithmetic", tmp_path / "c", progress=False, torch_dtype="float32")
    with pytest.raises(ValueError, match="loaded with torch_dtype='float32'"):
        apply_merged_delta(bf16["merged"], 1.0, torch_dtype="float32")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("a", "c", ".a", ".c"))]


def test_from_task_vector_and_evaluate_load_the_base_as_recorded(bf16):
    expert = ExpertModule.from_task_vector(bf16["tv"], with_task_vector=True)  # the fingerprint check passes
    assert _dtype(expert.backbone) == torch.bfloat16 and expert.hparams.torch_dtype == "bfloat16"
    assert _dtype(load_base([str(bf16["tv"])], check_fingerprint=True)) == torch.bfloat16
    with pytest.raises(TaskVectorError, match="loaded with torch_dtype='float32'"):
        load_base([str(bf16["tv"])], "float32", check_fingerprint=True)


def test_the_pipelines_shared_backbone_loads_the_base_as_recorded(bf16):
    """evaluate_backbone (the pipeline's evaluation) shares one base between the experts: as they loaded it, so the
    experts' fingerprint check passes for a bf16-fitted base."""
    from drm_lightning.evaluation.multitask import _shared_backbone

    module = _shared_backbone(None, [read_meta(bf16["tv"])])
    assert _dtype(module) == torch.bfloat16 and fingerprint(module) == read_meta(bf16["tv"]).base_fingerprint


def test_a_recorded_gguf_file_reaches_the_loader(bf16, tmp_path, monkeypatch):
    """No GGUF model installs offline here: the loader is watched instead, and loads the tiny model."""
    calls: list[dict] = []
    real = expert_module.load_backbone

    def watch(name, family="encoder", **kwargs):
        calls.append(kwargs)
        return real(name, family, torch_dtype=kwargs.get("torch_dtype"))

    monkeypatch.setattr(expert_module, "load_backbone", watch)
    folder = shutil.copytree(bf16["tv"], tmp_path / "tv")
    data = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**data, "gguf_file": "model.gguf"}))
    ExpertModule.from_task_vector(folder)
    ExpertModule.from_task_vector(folder, gguf_file="other.gguf", torch_dtype="float32")
    ExpertModule.from_task_vector(folder, backbone=bf16["bert"])  # a model folder: never the base's GGUF file
    assert [(c["torch_dtype"], c["gguf_file"]) for c in calls] == [
        (torch.bfloat16, "model.gguf"),
        (torch.float32, "other.gguf"),
        (None, None),
    ]


def test_the_merge_command_takes_an_explicit_dtype_for_old_task_vectors(bf16, tmp_path, monkeypatch):
    """--torch_dtype reaches the merge and the saved model, on one process and through the distributed merge."""
    from drm_lightning.commands.merge import merge

    old = _strip(bf16["tv"], tmp_path / "old", "torch_dtype", "gguf_file")
    out = merge([str(old)], str(tmp_path / "out"), torch_dtype="bfloat16")
    assert read_merge_record(out)["torch_dtype"] == "bfloat16"
    assert _dtype(load_model(str(out), None, [str(old)])) == torch.bfloat16  # saved in bfloat16: loads so
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    try:  # a process group exists: merge takes the distributed path, which must pass the dtype on to rank 0's load
        again = merge([str(old)], str(tmp_path / "again"), torch_dtype="bfloat16", keep_delta=True)
    finally:
        dist.destroy_process_group()
    record = read_merge_record(tmp_path / "again_delta")
    assert record["distributed"]["world_size"] == 1 and record["torch_dtype"] == "bfloat16"
    assert _dtype(load_model(str(again), None, [str(old)])) == torch.bfloat16
