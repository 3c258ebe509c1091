"""Input statistics: the Grams the task-vector callback records equal ``XᵀX`` computed directly on the same examples,
for dense and LoRA experts, in one process and in two (DDP); and the file they go to.

"Directly" is a plain forward hook on the rebuilt expert's layer (``from_task_vector``, the task vector added onto
the base), the layer's input rows at non-padding positions, in float64: nothing of ``callbacks/grams.py`` but the
sample of example indices, which is what defines "the same examples".
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from drm_lightning.callbacks.grams import recorded_layers, sample_indices
from drm_lightning.callbacks.task_vector import TaskVectorCallback
from drm_lightning.io.statistics import STATISTICS_FILE, gram_bytes
from drm_lightning.io.task_vector import read_meta
from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.lora import LoraSettings
from tests.helpers.expert_marks import KNOWN_DEPRECATIONS
from tests.helpers.tiny_models import SyntheticDataModule, tiny_trainer

pytestmark = KNOWN_DEPRECATIONS
LABELS = ("negative", "positive")
EXAMPLES = 12
N = 20


def _stored(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / STATISTICS_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _direct(folder, dm: SyntheticDataModule, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``Σ x xᵀ`` (float64) and row counts of each named weight's layer input, on the sampled training examples."""
    expert = ExpertModule.from_task_vector(folder, with_task_vector=True).eval()
    dataset = dm.train_dataloader().dataset
    indices = sample_indices(len(dataset), EXAMPLES)
    sums = {n: torch.zeros(0) for n in names}
    rows = dict.fromkeys(names, 0)
    captured: dict[str, torch.Tensor] = {}
    handles = [
        expert.backbone.get_submodule(n.removesuffix(".weight")).register_forward_hook(
            lambda m, i, o, n=n: captured.__setitem__(n, i[0].detach().double())
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=5, sampler=indices):
            captured.clear()
            expert(batch)
            mask = batch["attention_mask"].bool()
            for n in names:
                x = captured[n]
                x = x[mask] if x.dim() == 3 else x
                sums[n] = x.T @ x if not sums[n].numel() else sums[n] + x.T @ x
                rows[n] += x.shape[0]
    for h in handles:
        h.remove()
    return sums, rows


def _fit(tiny, tmp_path, lora, learning_rate: float = 1e-2, **trainer_kwargs):
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=N, batch_size=4, label_names=LABELS)
    expert = ExpertModule(tiny["encoder"], task="t", lora=lora, learning_rate=learning_rate, label_names=list(LABELS))
    callback = TaskVectorCallback(str(tmp_path / "tv"), statistics_examples=EXAMPLES)
    tiny_trainer(max_steps=2, callbacks=[callback], **trainer_kwargs).fit(expert, dm)
    dm.setup("fit")
    return tmp_path / "tv", dm


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2, dropout=0.5)], ids=["dense", "lora"])
def test_callback_gram_equals_xtx_on_the_same_examples(tiny, tmp_path, lora) -> None:
    folder, dm = _fit(tiny, tmp_path, lora)
    meta = read_meta(folder)
    stored = _stored(folder)
    assert meta.statistics is not None and meta.statistics["examples"] == EXAMPLES
    assert set(stored) == set(meta.statistics["rows"])
    if lora is None:  # every trained nn.Linear the examples reach (the pooler is not used: mean pooling)
        assert "encoder.layer.0.intermediate.dense.weight" in stored and not any("pooler" in k for k in stored)
    else:  # the adapted layers only, under the base weight's name
        assert sorted(stored) == sorted(k for k in stored if k.rsplit(".", 2)[-2] in ("query", "value"))
        assert len(stored) == 2 * 2  # query and value of two layers
    with safe_open(str(folder / STATISTICS_FILE), "pt") as f:  # one metadata key: safetensors orders several
        assert list(f.metadata()) == ["recorded_for"]  # differently in each process (not the same bytes)
    direct, rows = _direct(folder, dm, sorted(stored))
    for name, gram in stored.items():
        assert gram.dtype == torch.float32 and meta.statistics["rows"][name] == rows[name], name
        torch.testing.assert_close(gram.double(), direct[name], rtol=1e-4, atol=1e-4 * float(direct[name].abs().max()))


def test_gram_bytes_is_the_hand_count_of_the_recorded_layers(tiny) -> None:
    """What a recording will weigh, from the layers the recorder picks on the tiny encoder (2 layers, hidden 32,
    MLP 64): per layer q, k, v, the attention output and the MLP's first matrix read 32 wide, the MLP's second 64."""
    expert = ExpertModule(tiny["encoder"], task="t", label_names=list(LABELS))
    widths = {name: layer.in_features for name, layer in recorded_layers(expert.backbone, lora=False).items()}
    assert len(widths) == 2 * 6
    assert gram_bytes(widths) == 2 * (5 * 32 * 32 + 64 * 64) * 4 == 73728
    only_mlp = recorded_layers(expert.backbone, lora=False, layers=[r"\.output\.dense\.", r"intermediate"])
    assert gram_bytes({n: m.in_features for n, m in only_mlp.items()}) == 2 * (32 * 32 + 32 * 32 + 64 * 64) * 4
    assert gram_bytes({}) == 0
    with pytest.raises(ValueError, match="q.weight: input width 0, expected a positive integer"):
        gram_bytes({"q.weight": 0})


def test_statistics_off_and_bad_settings(tiny, tmp_path) -> None:
    dm = SyntheticDataModule("encoder", tiny["encoder"], n=8, batch_size=4, label_names=LABELS)
    expert = ExpertModule(tiny["encoder"], task="t", learning_rate=1e-2, label_names=list(LABELS))
    tiny_trainer(max_steps=1, callbacks=[TaskVectorCallback(str(tmp_path / "off"), statistics_examples=0)]).fit(
        expert, dm
    )
    assert read_meta(tmp_path / "off").statistics is None and not (tmp_path / "off" / STATISTICS_FILE).exists()
    with pytest.raises(ValueError, match="statistics_examples=-1: expected an integer >= 0"):
        TaskVectorCallback(statistics_examples=-1)
    callback = TaskVectorCallback(str(tmp_path / "bad"), statistics_layers=["("])
    with pytest.raises(ValueError, match=r"statistics_layers: invalid regex '\('"):
        tiny_trainer(max_steps=1, callbacks=[callback]).fit(expert, dm)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_gram_equals_one_process(tiny, tmp_path) -> None:
    """Each rank runs every other example of the same sample; the all-reduced sum is the one-process Gram. The
    learning rate is 1e-12 so that both fits end with the same weights (DDP would average other gradients)."""
    one, _ = _fit(tiny, tmp_path / "one", None, learning_rate=1e-12)
    two, _ = _fit(tiny, tmp_path / "two", None, learning_rate=1e-12, devices=2, strategy="ddp_spawn")
    a, b = _stored(one), _stored(two)
    assert set(a) == set(b) and len(a) > 0
    assert read_meta(one).statistics == read_meta(two).statistics  # examples and every layer's row count
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5 * float(a[name].abs().max()))
