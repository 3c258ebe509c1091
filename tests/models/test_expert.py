"""ExpertModule: training mode, metrics, T5 label-word scoring, LoRA checkpoints (trainable only) and resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.lora import LoraSettings
from drm_lightning.models.optim import linear_warmup_decay
from tests.helpers.expert_marks import EXPERT_TEST_MARKS
from tests.helpers.tiny_models import SyntheticDataModule, tiny_trainer

pytestmark = EXPERT_TEST_MARKS
LABELS = ["negative", "positive"]


def _batch(datamodule: SyntheticDataModule) -> dict[str, torch.Tensor]:
    datamodule.setup("fit")
    return next(iter(datamodule.val_dataloader()))


class _RecordingExpert(ExpertModule):
    """Records, inside training_step, the modes of all modules and whether two forwards differ."""

    def training_step(self, batch, batch_idx):
        self.dropout_modes = [m.training for m in self.modules() if isinstance(m, nn.Dropout)]
        self.all_training = all(m.training for m in self.modules())
        with torch.no_grad():
            self.forwards_differ = not torch.equal(self(batch), self(batch))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("family", "lora"),
    [("encoder", None), ("encoder", LoraSettings(r=2, dropout=0.1)), ("decoder", None), ("vision", LoraSettings(r=2))],
)
def test_dropout_active_in_training_step(tiny, family, lora):
    model = _RecordingExpert(tiny[family], family, label_names=LABELS, lora=lora)
    assert not all(m.training for m in model.backbone.modules())  # from_pretrained leaves eval mode
    tiny_trainer(max_steps=1).fit(model, SyntheticDataModule(family, tiny[family], n=8))
    assert model.all_training  # every submodule, frozen LoRA base included (Llama has no nn.Dropout at all)
    assert all(model.dropout_modes)
    if family == "encoder":  # BERT has dropout 0.1: two forwards in training mode must differ
        assert model.dropout_modes and model.forwards_differ


def test_validate_and_test_log_every_metric(tiny):
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=16)
    model = ExpertModule(tiny["encoder"], task="sent", metrics=["accuracy", "mcc", "f1"], label_names=LABELS)
    trainer = tiny_trainer()
    val = trainer.validate(model, dm, verbose=False)[0]
    test = trainer.test(model, dm, verbose=False)[0]
    for stage, out in (("val", val), ("test", test)):
        assert set(out) == {f"{stage}/sent/{m}" for m in ("loss", "accuracy", "mcc", "f1")}
    # The logged accuracy is that of the logits on the whole split (all in one batch here).
    dm.setup("validate")
    data = dm.val_data
    with torch.no_grad():
        logits = model.eval()(data)
    assert val["val/sent/accuracy"] == pytest.approx((logits.argmax(-1) == data["labels"]).float().mean().item())
    assert val["val/sent/loss"] == pytest.approx(F.cross_entropy(logits, data["labels"]).item(), rel=1e-5)


def test_labels_and_metrics_come_from_the_datamodule(tiny):
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=8, label_names=("no", "yes", "maybe"))
    dm.metrics = ["mcc"]
    model = ExpertModule(tiny["encoder"], task="t")
    assert model.head is None
    out = tiny_trainer().validate(model, dm, verbose=False)[0]
    assert model.label_names == ["no", "yes", "maybe"] and model.head.num_labels == 3
    assert model.hparams.label_names == ["no", "yes", "maybe"]  # saved with checkpoints
    assert set(out) == {"val/t/loss", "val/t/mcc"}
    assert model.hparams.metrics == ["mcc"]
    # Given label names but no metrics: the datamodule's metrics still apply.
    model = ExpertModule(tiny["encoder"], task="t", label_names=["no", "yes", "maybe"])
    assert set(tiny_trainer().validate(model, dm, verbose=False)[0]) == {"val/t/loss", "val/t/mcc"}


def test_label_names_disagreeing_with_the_datamodule(tiny):
    model = ExpertModule(tiny["encoder"], label_names=["a", "b"])
    with pytest.raises(ValueError, match=r"label_names=\['a', 'b'\] differ"):
        tiny_trainer().validate(model, SyntheticDataModule("encoder", tiny["encoder"], n=8), verbose=False)


def test_seq2seq_scores_are_label_word_log_likelihoods(tiny):
    labels = ["positive", "negative", "very bad"]  # label words of different token lengths
    model = ExpertModule(tiny["seq2seq"], "seq2seq", label_names=labels).eval()
    batch = _batch(SyntheticDataModule("seq2seq", tiny["seq2seq"], n=8, label_names=tuple(labels)))
    with torch.no_grad():
        scores = model(batch)
        loss, _ = model._step(batch)
        for c in range(len(labels)):
            n_tokens = int(model.label_target_mask[c].sum())
            target = model.label_target_ids[c, :n_tokens].expand(len(batch["labels"]), -1)
            for i in range(len(batch["labels"])):
                out = model.backbone(
                    input_ids=batch["input_ids"][i : i + 1],
                    attention_mask=batch["attention_mask"][i : i + 1],
                    labels=target[i : i + 1],
                )
                assert scores[i, c].item() == pytest.approx(-out.loss.item() * n_tokens, rel=1e-4, abs=1e-4)
        # The evaluation loss is T5's own seq2seq cross-entropy on the true label words.
        true = model.label_target_ids[batch["labels"]].masked_fill(model.label_target_mask[batch["labels"]] == 0, -100)
        reference = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=true)
    assert loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)


def test_seq2seq_label_words_must_differ_as_tokens(tiny):
    with pytest.raises(ValueError, match="tokenise identically"):
        ExpertModule(tiny["seq2seq"], "seq2seq", label_names=["good", "good "])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"family": "audio"}, "family='audio'"),
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"warmup_ratio": 1.0}, "warmup_ratio=1.0"),
        ({"metrics": ["accuracy", "auc"]}, "metrics="),
        ({"metrics": []}, "metrics="),
        ({"pooling": "max"}, "pooling='max'"),
        ({"torch_dtype": "int8"}, "torch_dtype='int8'"),
        ({"task": "a/b"}, "task='a/b'"),
        ({"label_names": ["only"]}, "label_names="),
        ({"label_names": ["a", "a"]}, "label_names="),
        ({"lora": "r8"}, "lora='r8'"),
    ],
)
def test_bad_arguments_name_the_argument(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertModule(tiny["encoder"], **kwargs)


def test_bfloat16_backbone_under_float32_head(tiny):
    model = ExpertModule(tiny["decoder"], "decoder", label_names=LABELS, torch_dtype="bfloat16").eval()
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(_batch(SyntheticDataModule("decoder", tiny["decoder"], n=8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("step", "warmup", "total", "factor"),
    [(0, 3, 10, 0.25), (2, 3, 10, 0.75), (3, 3, 10, 1.0), (5, 3, 10, 5 / 7), (10, 3, 10, 0.0), (0, 0, 4, 1.0)],
)
def test_linear_warmup_decay(step, warmup, total, factor):
    assert linear_warmup_decay(step, warmup, total) == pytest.approx(factor)


def test_scheduler_steps_per_batch(tiny):
    model = ExpertModule(tiny["vision"], "vision", label_names=LABELS, learning_rate=0.1, warmup_ratio=0.5)
    trainer = tiny_trainer(max_steps=4)
    trainer.fit(model, SyntheticDataModule("vision", tiny["vision"], n=32))
    # 4 steps, warmup 2: after 4 scheduler steps the factor is (4 - 4) / (4 - 2) = 0.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
    groups = trainer.optimizers[0].param_groups
    assert {g["weight_decay"] for g in groups} == {0.01, 0.0}
    assert all(p.ndim < 2 for p in groups[1]["params"])


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_lora_checkpoint_holds_only_trained_weights_and_resumes(tiny, tmp_path):
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=32)
    lora = LoraSettings(r=2, alpha=4)
    model = ExpertModule(tiny["encoder"], label_names=LABELS, lora=lora, learning_rate=1e-2)
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(model, dm)
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=True)  # plain values only: nothing executable
    saved = set(ckpt["state_dict"])
    assert saved == model.trainable_names()
    assert all(".lora_A." in k or ".lora_B." in k or k.startswith("head.") for k in saved)
    assert ckpt["hyper_parameters"]["lora"] == {
        "r": 2,
        "alpha": 4.0,
        "dropout": 0.0,
        "target_modules": None,
        "use_rslora": False,
    }

    restored = ExpertModule.load_from_checkpoint(path)
    trained = _params(model)
    assert restored.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in restored.state_dict().items())

    # --ckpt_path resume: continues from step 2 with the adapter weights of the checkpoint.
    resumed = ExpertModule(tiny["encoder"], label_names=LABELS, lora=lora, learning_rate=1e-2)
    seen: dict[str, torch.Tensor] = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.update(_params(pl_module) if not seen else {})

    trainer2 = tiny_trainer(max_steps=4, callbacks=[Peek()])
    trainer2.fit(resumed, dm, ckpt_path=path)
    assert trainer2.global_step == 4
    assert all(torch.equal(seen[k], trained[k]) for k in trained)


def test_lora_checkpoint_refuses_another_base_model(tiny, tmp_path):
    model = ExpertModule(tiny["encoder"], label_names=LABELS, lora=LoraSettings(r=2))
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, SyntheticDataModule("encoder", tiny["encoder"], n=8))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="frozen base weights"):
        ExpertModule.load_from_checkpoint(tmp_path / "a.ckpt", backbone=tiny["encoder_other"])


def test_full_checkpoint_keeps_every_weight(tiny, tmp_path):
    model = ExpertModule(tiny["vision"], "vision", label_names=LABELS)
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, SyntheticDataModule("vision", tiny["vision"], n=8))
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    ckpt = torch.load(tmp_path / "full.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(model.state_dict())


def _draws(cuda: bool = False) -> list:
    """One draw from each generator the checkpoint keeps."""
    out = [torch.rand(4), random.random(), np.random.rand(2).tolist()]
    return [*out, torch.rand(4, device="cuda").cpu()] if cuda else out


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("fn", "restores"),
    [(TrainerFn.FITTING, True), (TrainerFn.VALIDATING, False), (None, False)],
    ids=["resumed_fit_restores", "evaluation_leaves_them", "load_from_checkpoint_leaves_them"],
)
def test_checkpoint_keeps_the_generator_states(tiny, tmp_path, fn, restores):
    """Saved through ``torch.save`` and read back with ``weights_only=True``: after ``on_load_checkpoint`` of a
    resumed fit the next draws are those that followed the save; otherwise the caller's generators are untouched."""
    model = ExpertModule(tiny["encoder"], label_names=LABELS)
    if fn is not None:
        model.trainer = tiny_trainer()
        model.trainer.state.fn = fn
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    after_save = _draws()
    torch.save(checkpoint, tmp_path / "rng.ckpt")
    loaded = torch.load(tmp_path / "rng.ckpt", weights_only=True)
    [states] = loaded[ExpertModule.RNG_KEY]  # one rank
    assert {"torch", "python", "numpy"} <= states.keys()

    model.on_load_checkpoint(loaded)
    assert _same(_draws(), after_save) == restores


def _as_rank(monkeypatch, model: ExpertModule, rank: int, world: int) -> None:
    monkeypatch.setattr(type(model.trainer), "global_rank", property(lambda self: rank))
    monkeypatch.setattr(type(model.trainer), "world_size", property(lambda self: world))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize(
    ("world_at_load", "rank_at_load", "restores_rank"),
    [(2, 0, 0), (2, 1, 1), (3, 2, 0)],
    ids=["rank0_gets_its_own", "rank1_gets_its_own", "other_world_size_gets_rank0s_with_a_warning"],
)
def test_checkpoint_keeps_every_ranks_generator_states(tiny, monkeypatch, world_at_load, rank_at_load, restores_rank):
    """Two DDP ranks played in one process: ``all_gather`` is faked with what rank 0 sent when it saved (under
    another seed, so the ranks' generators differ), as the collective would return it to rank 1."""
    model = ExpertModule(tiny["encoder"], label_names=LABELS)
    model.trainer = tiny_trainer()
    model.trainer.state.fn = TrainerFn.FITTING
    sent: list[torch.Tensor] = []

    def rank0_gather(tensor: torch.Tensor) -> torch.Tensor:
        sent.append(tensor)
        return torch.stack([tensor, tensor])

    def rank1_gather(tensor: torch.Tensor) -> torch.Tensor:
        sizes, data = sent  # rank 0 sent its size first, then its bytes; ours are padded to the longer of the two
        if tensor.numel() == 1:
            return torch.stack([sizes, tensor])
        return torch.stack([torch.cat([data, tensor.new_zeros(tensor.numel() - data.numel())]), tensor])

    draws = {}
    for rank, seed, gather in ((0, 7, rank0_gather), (1, 8, rank1_gather)):
        _as_rank(monkeypatch, model, rank, 2)
        monkeypatch.setattr(model, "all_gather", gather)
        _seed_all(seed)
        checkpoint: dict = {}
        model.on_save_checkpoint(checkpoint)
        draws[rank] = _draws()
    assert len(checkpoint[ExpertModule.RNG_KEY]) == 2

    _as_rank(monkeypatch, model, rank_at_load, world_at_load)
    if world_at_load == 2:
        model.on_load_checkpoint(checkpoint)
    else:
        with pytest.warns(UserWarning, match="generator states are of 2 rank"):
            model.on_load_checkpoint(checkpoint)
    assert _same(_draws(), draws[restores_rank])
    assert not _same(draws[0], draws[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_keeps_the_cuda_generator_states():
    torch.rand(1, device="cuda")  # initialises CUDA: only then are its generators saved
    states = ExpertModule.rng_states()
    assert len(states["torch.cuda"]) == torch.cuda.device_count()
    after_save = _draws(cuda=True)
    ExpertModule.set_rng_states(states)
    assert _same(_draws(cuda=True), after_save)
