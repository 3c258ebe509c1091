"""TaskVectorCallback and apply_task_vector: base weights + task vector (+ head) reproduce the fine-tuned expert."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from drm_lightning.callbacks.task_vector import TaskVectorCallback, build_task_vector
from drm_lightning.io.statistics import STATISTICS_FILE
from drm_lightning.io.task_vector import (
    DELTAS_FILE,
    HEAD_FILE,
    META_FILE,
    LoraMeta,
    TaskVectorError,
    TaskVectorMeta,
    read_meta,
    write_task_vector,
)
from drm_lightning.models.backbone import load_backbone
from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.lora import LoraSettings
from drm_lightning.task_vectors.apply import apply_task_vector
from drm_lightning.task_vectors.fingerprint import fingerprint
from tests.helpers.expert_marks import KNOWN_DEPRECATIONS
from tests.helpers.tiny_models import SyntheticDataModule, tiny_trainer

pytestmark = KNOWN_DEPRECATIONS
LABELS = ("negative", "positive")


CASES = [
    pytest.param("encoder", None, False, None, id="encoder-full"),
    pytest.param("encoder", LoraSettings(r=2, alpha=4, dropout=0.1), False, None, id="encoder-lora"),
    pytest.param("encoder", None, True, None, id="encoder-pairs-full"),
    pytest.param(
        "encoder",
        LoraSettings(r=2, use_rslora=True, target_modules=["query", "dense"]),
        True,
        None,
        id="encoder-pairs-lora",
    ),
    pytest.param("decoder", None, False, None, id="decoder-full"),
    pytest.param("decoder", None, False, "bfloat16", id="decoder-full-bf16"),
    pytest.param("decoder", LoraSettings(r=4), False, None, id="decoder-lora"),
    pytest.param("seq2seq", None, False, None, id="seq2seq-full"),
    pytest.param("seq2seq", LoraSettings(r=2), False, None, id="seq2seq-lora"),
    pytest.param("vision", None, False, None, id="vision-full"),
    pytest.param("vision", LoraSettings(r=2), False, None, id="vision-lora"),
]


@pytest.mark.parametrize(("family", "lora", "pairs", "dtype"), CASES)
def test_task_vector_reproduces_the_expert(tiny, tmp_path, family, lora, pairs, dtype):
    dm = SyntheticDataModule(family, tiny[family], n=16, batch_size=8, pairs=pairs, label_names=LABELS)
    expert = ExpertModule(
        tiny[family], family, task="sent", lora=lora, learning_rate=5e-2, pooling="mean", torch_dtype=dtype
    )
    callback = TaskVectorCallback(str(tmp_path / "tv"))
    tiny_trainer(max_steps=2, callbacks=[callback]).fit(expert, dm)
    folder = callback.written
    files = {DELTAS_FILE, HEAD_FILE, META_FILE, STATISTICS_FILE}
    assert folder == tmp_path / "tv" and {p.name for p in folder.iterdir()} == files

    base = load_backbone(tiny[family], family, torch_dtype=getattr(torch, dtype) if dtype else None)
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    meta = read_meta(folder)
    assert (meta.task, meta.family, meta.label_names) == ("sent", family, list(LABELS))
    assert meta.base_model == tiny[family] and meta.base_fingerprint == fingerprint(base)
    assert "val/sent/accuracy" in meta.metrics and {"torch", "transformers", "peft"} <= set(meta.versions)
    assert meta.head == expert.head_config()

    deltas = load_file(str(folder / DELTAS_FILE))
    assert deltas
    assert not [k for k in deltas if "base_model" in k or "base_layer" in k or ".default" in k]
    if lora is None:
        assert meta.kind == "dense" and meta.lora is None
        assert all(base_shapes[k] == tuple(v.shape) for k, v in deltas.items())
        assert all(v.dtype == torch.float32 and v.any() for v in deltas.values())
    else:
        assert meta.kind == "lora"
        assert meta.lora.r == lora.r and meta.lora.scale == lora.scale and meta.lora.dropout == lora.dropout
        assert meta.lora.target_modules == lora.resolved_targets(family, base)
        weights = {k.rsplit(".lora_", 1)[0] for k in deltas}
        assert len(deltas) == 2 * len(weights)
        for name in weights:
            assert name.rsplit(".", 2)[-2] in meta.lora.target_modules
            out_features, in_features = base_shapes[name]
            assert deltas[name + ".lora_A"].shape == (lora.r, in_features)
            assert deltas[name + ".lora_B"].shape == (out_features, lora.r)
    head = load_file(str(folder / HEAD_FILE))
    assert set(head) == {k[len("head.") :] for k in expert.state_dict() if k.startswith("head.")}

    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        reference = expert.eval()(batch)
        rebuilt = ExpertModule.from_task_vector(folder, with_task_vector=True, torch_dtype=dtype)(batch)
        untouched = ExpertModule.from_task_vector(folder, torch_dtype=dtype)(batch)
    # Dense deltas are exact differences (float32, also of bfloat16 weights): W_0 + delta rounds back to W_ft.
    tolerance = 1e-6 if lora is None else 1e-5
    torch.testing.assert_close(rebuilt, reference, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(untouched, reference, rtol=1e-3, atol=1e-3)  # the deltas matter


def test_default_folder_and_merged_backbone_folder(tiny, tmp_path):
    """No output_dir: <default_root_dir>/task_vectors/<task>. A saved fine-tuned backbone works as ``backbone``."""
    dm = SyntheticDataModule("vision", tiny["vision"], n=16)
    expert = ExpertModule(tiny["vision"], "vision", task="shapes", learning_rate=1e-2)
    callback = TaskVectorCallback()
    tiny_trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path).fit(expert, dm)
    assert callback.written == tmp_path / "task_vectors" / "shapes"
    expert.backbone.save_pretrained(tmp_path / "finetuned")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        from_folder = ExpertModule.from_task_vector(callback.written, backbone=str(tmp_path / "finetuned"))(batch)
        module = load_backbone(tiny["vision"], "vision")
        from_module = ExpertModule.from_task_vector(callback.written, backbone=module, with_task_vector=True)(batch)
        reference = expert.eval()(batch)
    torch.testing.assert_close(from_folder, reference, rtol=0, atol=0)
    torch.testing.assert_close(from_module, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("skip_zero", "expected"), [(True, 1), (False, None)])
def test_build_task_vector_keeps_only_changed_weights(tiny, skip_zero, expected):
    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS))
    state = {k: v.clone() for k, v in expert.state_dict().items()}
    state["backbone.encoder.layer.1.output.dense.weight"] += 0.5
    deltas, head, meta = build_task_vector(expert, state, {"val/t/accuracy": 0.5}, skip_zero=skip_zero)
    trained = {n for n, p in expert.backbone.named_parameters()}
    assert len(deltas) == (expected if expected is not None else len(trained))
    torch.testing.assert_close(deltas["encoder.layer.1.output.dense.weight"], torch.full((32, 64), 0.5))
    assert meta.metrics == {"val/t/accuracy": 0.5} and meta.kind == "dense"
    assert set(head) == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}


def _fake_trainer(rank_zero: bool, root, collectives: list[str], rank0_failed: bool = False) -> SimpleNamespace:
    """A trainer whose strategy records collectives; ``broadcast`` answers what rank 0 would send."""

    def broadcast(obj, src=0):
        collectives.append("broadcast")
        return obj if rank_zero else rank0_failed

    return SimpleNamespace(
        is_global_zero=rank_zero,
        strategy=SimpleNamespace(broadcast=broadcast),
        callback_metrics={},
        default_root_dir=str(root),
        train_dataloader=None,  # no training data: no input statistics
    )


def test_only_global_rank_zero_writes_and_every_rank_joins_the_collective(tiny, tmp_path):
    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS))
    collectives: list[str] = []
    for rank_zero in (False, True):
        TaskVectorCallback().on_fit_end(_fake_trainer(rank_zero, tmp_path, collectives), expert)
        assert (tmp_path / "task_vectors" / "t").exists() == rank_zero
    assert collectives == ["broadcast", "broadcast"]


def test_a_failure_on_rank_zero_reaches_every_rank_instead_of_hanging(tiny, tmp_path):
    """Rank 0 cannot write (its output parent is a file): it raises its error, the other ranks raise too."""
    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    collectives: list[str] = []
    with pytest.raises(OSError):
        TaskVectorCallback(output_dir=str(blocker / "tv")).on_fit_end(
            _fake_trainer(True, tmp_path, collectives), expert
        )
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        TaskVectorCallback(output_dir=str(blocker / "tv")).on_fit_end(
            _fake_trainer(False, tmp_path, collectives, rank0_failed=True), expert
        )
    assert collectives == ["broadcast", "broadcast"]


def test_deepspeed_stage_3_is_refused(tiny):
    from drm_lightning.callbacks.task_vector import gather_state_dict

    strategy = type("DeepSpeedStrategy", (), {"zero_stage_3": True})()
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        gather_state_dict(SimpleNamespace(strategy=strategy), ExpertModule(tiny["encoder"]))


def test_from_task_vector_in_another_dtype_is_refused(tiny, tmp_path):
    """The fingerprint covers the dtype: the base loaded in bfloat16 is not the float32 base it was taken against."""
    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS))
    state = {k: v.clone() for k, v in expert.state_dict().items()}
    deltas, head, meta = build_task_vector(expert, state)
    folder = write_task_vector(tmp_path / "tv", deltas, head, meta)
    with pytest.raises(TaskVectorError, match="not the base model"):
        ExpertModule.from_task_vector(folder, with_task_vector=True, torch_dtype="bfloat16")


def test_callback_needs_an_expert(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    with pytest.raises(ValueError, match="needs an ExpertModule, got BoringModel"):
        TaskVectorCallback().setup(SimpleNamespace(), BoringModel(), "fit")


# ---- apply_task_vector -------------------------------------------------------------------------------------------


def _folder(tmp_path, base, deltas, lora: LoraMeta | None = None, name: str = "tv"):
    meta = TaskVectorMeta(
        task="t",
        kind="lora" if lora else "dense",
        base_model="tiny",
        base_fingerprint=fingerprint(base),
        lora=lora,
    )
    return write_task_vector(tmp_path / name, deltas, {}, meta)


def test_apply_task_vector_dense_and_lora_with_lambda(tiny, tmp_path):
    base = load_backbone(tiny["encoder"])
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    q, v = "encoder.layer.0.attention.self.query.weight", "embeddings.LayerNorm.bias"
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    lora = LoraMeta(r=2, alpha=3.0, scale=1.5, target_modules=["query"])
    folder = _folder(tmp_path, base, {q + ".lora_A": a, q + ".lora_B": b, v: torch.ones(32)}, lora)
    apply_task_vector(base, folder, lam=0.5)
    state = base.state_dict()
    torch.testing.assert_close(state[q], w0[q] + 0.5 * 1.5 * (b @ a))
    torch.testing.assert_close(state[v], w0[v] + 0.5)
    changed = [k for k in w0 if not torch.equal(w0[k], state[k])]
    assert sorted(changed) == sorted([q, v])


def test_apply_task_vector_refuses_another_base(tiny, tmp_path):
    folder = _folder(tmp_path, load_backbone(tiny["encoder"]), {"embeddings.LayerNorm.bias": torch.ones(32)})
    with pytest.raises(TaskVectorError, match="not the base model"):
        apply_task_vector(load_backbone(tiny["encoder_other"]), folder)


Q = "encoder.layer.0.attention.self.query.weight"
LORA = LoraMeta(r=2, alpha=2.0, scale=1.0, target_modules=["query"])


@pytest.mark.parametrize(
    ("deltas", "lora", "match"),
    [
        ({"no.such.weight": torch.ones(3)}, None, "'no.such.weight'"),
        ({Q: torch.ones(31, 32)}, None, r"shape \(31, 32\)"),
        ({Q + ".lora_A": torch.ones(2, 32)}, LORA, "no matching"),
        ({Q + ".lora_B": torch.ones(32, 2)}, LORA, "no matching"),
        ({Q + ".lora_A": torch.ones(2, 32), Q + ".lora_B": torch.ones(32, 2)}, None, "no 'lora' section"),
        ({Q + ".lora_A": torch.ones(2, 31), Q + ".lora_B": torch.ones(32, 2)}, LORA, "do not factor"),
        ({Q + ".lora_A": torch.ones(3, 32), Q + ".lora_B": torch.ones(32, 2)}, LORA, "do not factor"),
    ],
)
def test_apply_task_vector_bad_folder_changes_nothing(tiny, tmp_path, deltas, lora, match):
    base = load_backbone(tiny["encoder"])
    before = fingerprint(base)
    # A valid entry that sorts first: it must not be applied when a later entry is bad.
    deltas = {"embeddings.LayerNorm.bias": torch.ones(32), **deltas}
    folder = _folder(tmp_path, base, deltas, lora)
    with pytest.raises(TaskVectorError, match=match):
        apply_task_vector(base, folder)
    assert fingerprint(base) == before


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2)], ids=["full", "lora"])
def test_sharded_model_is_gathered_in_full(tiny, tmp_path, lora):
    """FSDP2 (``fully_shard``, what ModelParallelStrategy uses) on CPU: the gather returns every weight, unsharded,
    under the unwrapped module's names, and the task vector is built from it."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.models.bert.modeling_bert import BertLayer

    from drm_lightning.callbacks.task_vector import gather_state_dict

    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS), lora=lora)
    reference = {k: v.clone() for k, v in expert.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", world_size=1, rank=0)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in [m for m in expert.modules() if isinstance(m, BertLayer)]:
            fully_shard(layer, mesh=mesh)
        fully_shard(expert, mesh=mesh)
        strategy = ModelParallelStrategy()
        strategy.model = expert
        state = gather_state_dict(SimpleNamespace(strategy=strategy), expert)
        deltas, head, meta = build_task_vector(expert, state, skip_zero=False)
    finally:
        dist.destroy_process_group()
    assert state.keys() == reference.keys()
    assert all(type(state[k]) is torch.Tensor and torch.equal(state[k], reference[k]) for k in reference)
    # Nothing was trained: dense deltas are zero; LoRA's B factors are still their zero initialisation.
    zero = [v for k, v in deltas.items() if lora is None or k.endswith(".lora_B")]
    assert deltas and zero and all(not v.any() for v in zero)
    assert meta.kind == ("dense" if lora is None else "lora")
    assert set(head) == {k[len("head.") :] for k in reference if k.startswith("head.")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_gathers_full_weights(tiny, tmp_path):
    """Under FSDP the callback gathers full (unsharded) weights under the backbone's own names."""
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=16)
    expert = ExpertModule(tiny["encoder"], task="t", learning_rate=1e-2)
    callback = TaskVectorCallback(str(tmp_path / "tv"))
    trainer = tiny_trainer(max_steps=2, accelerator="cuda", devices=1, strategy="fsdp", callbacks=[callback])
    trainer.fit(expert, dm)
    deltas = load_file(str(callback.written / DELTAS_FILE))
    base = load_backbone(tiny["encoder"]).state_dict()
    assert set(deltas) <= set(base) and len(deltas) == len(base)
    assert all(tuple(deltas[k].shape) == tuple(base[k].shape) for k in deltas)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_every_rank_joins_and_one_task_vector_is_written(tiny, tmp_path):
    """Two CPU processes (gloo): both reach the barrier, rank 0 writes, and the result reproduces the expert."""
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=16, batch_size=4)
    expert = ExpertModule(tiny["encoder"], task="t", learning_rate=1e-2, label_names=list(LABELS))
    callback = TaskVectorCallback(str(tmp_path / "tv"))
    trainer = tiny_trainer(max_steps=2, devices=2, strategy="ddp_spawn", callbacks=[callback])
    trainer.fit(expert, dm)  # ddp_spawn copies rank 0's trained weights back into ``expert``
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv"]
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        rebuilt = ExpertModule.from_task_vector(tmp_path / "tv", with_task_vector=True)(batch)
        reference = expert.eval()(batch)
    torch.testing.assert_close(rebuilt, reference, rtol=1e-6, atol=1e-6)


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2)], ids=["full", "lora"])
def test_a_small_disk_is_refused_before_the_base_is_reloaded(tiny, tmp_path, monkeypatch, lora):
    """The estimate bounds what is written (all deltas kept); one byte short of it plus the margin, rank 0 refuses
    before reloading W_0, names the folder and writes nothing."""
    from drm_lightning.callbacks import task_vector as callback_module
    from drm_lightning.callbacks.task_vector import estimate_task_vector_bytes
    from drm_lightning.io import disk as io_disk
    from drm_lightning.io.disk import InsufficientSpaceError, human_bytes, with_margin

    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS), lora=lora)
    estimate = estimate_task_vector_bytes(expert, expert.state_dict())
    TaskVectorCallback(str(tmp_path / "tv"), skip_zero=False).on_fit_end(_fake_trainer(True, tmp_path, []), expert)
    written = _folder_bytes(tmp_path / "tv")
    assert written <= estimate <= written + 80 * 1024

    free = with_margin(estimate) - 1
    monkeypatch.setattr(io_disk, "disk_free_bytes", lambda path: free)
    reloads: list[str] = []
    monkeypatch.setattr(callback_module, "load_backbone", lambda name, *a, **k: reloads.append(name))
    with pytest.raises(InsufficientSpaceError) as err:
        TaskVectorCallback(str(tmp_path / "small")).on_fit_end(_fake_trainer(True, tmp_path, []), expert)
    assert str(tmp_path / "small") in str(err.value)
    assert f"needs {human_bytes(with_margin(estimate))}, {human_bytes(free)} free" in str(err.value)
    assert reloads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tv"]
