"""Up-front free-space checks: a disk that clearly cannot hold the output is refused before any model is loaded.

A small disk is simulated by replacing the one probe, ``io.disk.disk_free_bytes``; nothing is filled. Each table
checks the same promises for one writer (the merged delta, the merged model, a task vector):

- the estimate covers what is really written, and not by much (so a disk that fits is never refused);
- with less free space than the estimate plus its margin, ``InsufficientSpaceError`` (an ``OSError``, ENOSPC) names
  the folder and the sizes, no model is loaded and nothing is left at the target;
- with exactly the estimate plus its margin free, the write goes through.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from drm_lightning.export import folder_writer
from drm_lightning.export.model_folder import save_merged_model
from drm_lightning.io import disk as io_disk
from drm_lightning.io.disk import (
    SKIP_SPACE_CHECK_ENV,
    InsufficientSpaceError,
    check_free_space,
    human_bytes,
    with_margin,
)
from drm_lightning.io.task_vector import TaskVectorMeta, safetensors_bytes, write_task_vector
from drm_lightning.merging.engine import apply, record, setup, space
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.plan import MergePlan
from drm_lightning.merging.engine.space import check_merge_space, estimate_merge_bytes, estimate_model_bytes
from drm_lightning.models.backbone import load_backbone
from tests.helpers.merge_inputs import write_task_vectors
from tests.helpers.tiny_models import make_tiny_model

#: Estimates may err high by this much (headers, index and merge.json are bounded generously), never low.
SLACK = 64 * 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("disk_space")
    bert = make_tiny_model("encoder", root / "bert")
    tvs = {
        "dense-f32": write_task_vectors(bert, root / "dense32", 2),
        "dense-bf16": write_task_vectors(bert, root / "dense16", 2, dtype=torch.bfloat16),
        "lora-f32": write_task_vectors(bert, root / "lora", 2, kind="lora", rank=2, alpha=4.0),
    }
    return {"bert": bert, "tvs": tvs, "merged": {}}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _small_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(io_disk, "disk_free_bytes", lambda path: free)


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loads: list[str] = []

    def refuse(name: str, *args: object, **kwargs: object) -> None:
        loads.append(name)
        raise AssertionError(f"loaded {name} before the space check")

    for module in (setup, apply):  # the merge and the model folder load the base there
        monkeypatch.setattr(module, "load_backbone", refuse)
    return loads


def _refused(err: pytest.ExceptionInfo[InsufficientSpaceError], folder: Path, needed: int, free: int) -> None:
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert str(folder) in message
    assert f"needs {human_bytes(needed)}, {human_bytes(free)} free" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------- merged delta

KINDS = ["dense-f32", "dense-bf16", "lora-f32"]


def _merged(world: dict, kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real merge per kind (shared by the tests below): ties, so LoRA deltas are densified as well."""
    cache = world["merged"]
    if kind not in cache:
        out = tmp_path_factory.mktemp(f"merged-{kind}") / "out"
        merge_task_vectors(world["tvs"][kind], "ties", out, progress=False)
        cache[kind] = out
    return cache[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_merge_estimate_covers_the_merged_folder(world, kind, tmp_path_factory):
    """Δ_merged is float32 whatever the task vectors store (bf16 deltas, LoRA factors): the estimate says so."""
    written = _size(_merged(world, kind, tmp_path_factory))
    estimate = estimate_merge_bytes(world["tvs"][kind])
    assert written <= estimate <= written + SLACK


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("spare", "refused"), [(-1, True), (0, False)], ids=["one-byte-short", "just-enough"])
def test_merge_on_a_small_disk(world, kind, spare, refused, tmp_path, monkeypatch):
    estimate = estimate_merge_bytes(world["tvs"][kind])
    free = with_margin(estimate) + spare
    _small_disk(monkeypatch, free)
    out = tmp_path / "deep" / "out"
    if not refused:
        merge_task_vectors(world["tvs"][kind], "task_arithmetic", out, progress=False)
        assert (out / record.MERGE_FILE).is_file()
        return
    loads = _no_model_loads(monkeypatch)
    with pytest.raises(InsufficientSpaceError) as err:
        merge_task_vectors(world["tvs"][kind], "task_arithmetic", out, progress=False)
    _refused(err, out, with_margin(estimate), free)
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_replacing_a_merge_does_not_count_the_old_one_as_free(world, tmp_path, monkeypatch):
    """The new output is complete before the old one goes (atomic_dir): the old bytes are not free meanwhile."""
    tvs = world["tvs"]["dense-f32"]
    out = tmp_path / "out"
    merge_task_vectors(tvs, "task_arithmetic", out, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _small_disk(monkeypatch, with_margin(estimate_merge_bytes(tvs)) - 1)
    with pytest.raises(InsufficientSpaceError):
        merge_task_vectors(tvs, "ties", out, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("copies", "refused"), [(1, False), (2, True)])
def test_distributed_staging_needs_a_second_copy(world, copies, refused, tmp_path, monkeypatch):
    """A canonical distributed merge holds rank shards and the rewritten output at once: ``copies=2``."""
    tvs = world["tvs"]["dense-f32"]
    _small_disk(monkeypatch, with_margin(estimate_merge_bytes(tvs)))
    if refused:
        with pytest.raises(InsufficientSpaceError):
            check_merge_space(tvs, tmp_path / "out", copies=copies)
    else:
        assert check_merge_space(tvs, tmp_path / "out", copies=copies) == estimate_merge_bytes(tvs)
    assert list(tmp_path.iterdir()) == []


def test_plan_skipped_parameters_take_no_space(world):
    tvs = world["tvs"]["dense-f32"]
    skipped = MergePlan(skip=[r"embeddings\.word_embeddings"])
    assert estimate_merge_bytes(tvs) - estimate_merge_bytes(tvs, skipped) >= 64 * 32 * 4  # vocab 64 × hidden 32


# ------------------------------------------------------------------------------------------- merged model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_model_estimate_covers_save_pretrained_in_each_dtype(world, dtype, tmp_path):
    model = load_backbone(world["bert"], "encoder", torch_dtype=dtype)
    model.save_pretrained(tmp_path / "model")
    folder_writer.save_tokenizer(world["bert"], tmp_path / "model")
    written = _size(tmp_path / "model")
    estimate = estimate_model_bytes(world["bert"], dtype)
    assert estimate is not None and written <= estimate <= written + SLACK
    assert space.model_bytes(model) <= written


def test_model_estimate_is_unknown_without_local_safetensors(world):
    assert estimate_model_bytes("some-org/some-model") is None
    assert estimate_model_bytes(world["bert"], gguf_file="model.gguf") is None


@pytest.mark.parametrize(("spare", "refused"), [(-1, True), (0, False)], ids=["one-byte-short", "just-enough"])
def test_apply_on_a_small_disk_is_refused_before_the_base_loads(
    world, spare, refused, tmp_path, tmp_path_factory, monkeypatch
):
    merged = _merged(world, "dense-f32", tmp_path_factory)
    estimate = estimate_model_bytes(world["bert"]) + space.tree_bytes(merged / record.HEADS_DIR)
    free = with_margin(estimate) + spare
    _small_disk(monkeypatch, free)
    out = tmp_path / "model"
    if not refused:
        save_merged_model(merged, 1.0, out)
        assert (out / "model.safetensors").is_file()
        return
    loads = _no_model_loads(monkeypatch)
    with pytest.raises(InsufficientSpaceError) as err:
        save_merged_model(merged, 1.0, out)
    _refused(err, out, with_margin(estimate), free)
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_merge_command_sums_delta_and_model_on_one_filesystem(world, tmp_path, monkeypatch):
    """Each folder alone would fit; both together do not: the merge command refuses before merging."""
    from drm_lightning.commands.merge import check_space

    tvs = [str(p) for p in world["tvs"]["dense-f32"]]
    delta = estimate_merge_bytes(tvs)
    model = estimate_model_bytes(world["bert"]) + space.heads_bytes(tvs)
    _small_disk(monkeypatch, with_margin(max(delta, model)))
    loads = _no_model_loads(monkeypatch)
    with pytest.raises(InsufficientSpaceError) as err:
        check_space(tvs, tmp_path / "out_delta", tmp_path / "out")
    _refused(err, tmp_path / "out_delta", with_margin(delta + model), with_margin(max(delta, model)))
    assert str(tmp_path / "out") in str(err.value) and loads == []
    _small_disk(monkeypatch, with_margin(delta + model))
    check_space(tvs, tmp_path / "out_delta", tmp_path / "out")


# ------------------------------------------------------------------------------------------- task vectors


def _meta() -> TaskVectorMeta:
    return TaskVectorMeta(task="t", kind="dense", base_model="m", base_fingerprint="f", label_names=["a", "b"])


TENSORS = {
    "dense-f32": ({"a.weight": torch.randn(64, 32), "a.bias": torch.randn(64)}, {"w": torch.randn(2, 32)}),
    "dense-f64": ({"a.weight": torch.randn(64, 32, dtype=torch.float64)}, {"w": torch.randn(2, 32)}),
    "lora-bf16": (
        {"a.weight.lora_A": torch.randn(2, 32).bfloat16(), "a.weight.lora_B": torch.randn(64, 2).bfloat16()},
        {"w": torch.randn(2, 32)},
    ),
    "head-only": ({}, {"w": torch.randn(2, 32), "b": torch.zeros(2)}),
}


@pytest.mark.parametrize("case", sorted(TENSORS))
@pytest.mark.parametrize(("spare", "refused"), [(-1, True), (0, False)], ids=["one-byte-short", "just-enough"])
def test_task_vector_write_on_a_small_disk(case, spare, refused, tmp_path, monkeypatch):
    deltas, head = TENSORS[case]
    meta = _meta()
    estimate = safetensors_bytes(deltas) + safetensors_bytes(head) + len(meta.to_json().encode())
    free = with_margin(estimate) + spare
    _small_disk(monkeypatch, free)
    folder = tmp_path / "runs" / "tv"
    if not refused:
        write_task_vector(folder, deltas, head, meta)
        assert _size(folder) <= estimate <= _size(folder) + 1024
        return
    with pytest.raises(InsufficientSpaceError) as err:
        write_task_vector(folder, deltas, head, meta)
    _refused(err, folder, with_margin(estimate), free)
    assert list(tmp_path.iterdir()) == []


def test_skip_env_turns_the_check_off(tmp_path, monkeypatch):
    _small_disk(monkeypatch, 0)
    deltas, head = TENSORS["dense-f32"]
    with pytest.raises(InsufficientSpaceError):
        write_task_vector(tmp_path / "tv", deltas, head, _meta())
    monkeypatch.setenv(SKIP_SPACE_CHECK_ENV, "1")
    write_task_vector(tmp_path / "tv", deltas, head, _meta())
    assert (tmp_path / "tv" / "meta.json").is_file()


def test_the_default_probe_reads_the_nearest_existing_folder(tmp_path):
    import shutil

    assert io_disk.disk_free_bytes(tmp_path / "not" / "yet") > 0
    assert abs(io_disk.disk_free_bytes(tmp_path / "not") - shutil.disk_usage(tmp_path).free) < 64 * 1024**2
    check_free_space({tmp_path / "a": 1, tmp_path / "b": 0}, "test")  # a few bytes fit on any test machine


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (300 * 1024**2, "300 MiB"),
        (int(1.2 * 1024**3), "1.2 GiB"),
        (int(12.34 * 1024**3), "12.3 GiB"),
        (5 * 1024**5, "5120 TiB"),
    ],
)
def test_human_bytes(nbytes, text):
    assert human_bytes(nbytes) == text
