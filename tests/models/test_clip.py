"""The ``clip`` family: CLIP's vision tower fine-tuned and merged under frozen zero-shot heads from its text tower.

A tiny ``CLIPConfig`` model (text and vision towers, hidden size 32, 16x16 images) saved to disk: the zero-shot head
reproduces ``CLIPModel``'s own image-text logits, prompt ensembles follow the CLIP recipe, task vectors hold only the
vision tower and reproduce the expert (full and LoRA), and a merged vision tower is evaluated without any text
encoder. One CPU pipeline runs end to end on real Fashion-MNIST images split into three tasks by class groups.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from drm_lightning.callbacks.task_vector import TaskVectorCallback
from drm_lightning.io.safetensors import open_safetensors
from drm_lightning.io.task_vector import DELTAS_FILE, read_head, read_meta
from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.heads import ZeroShotHead, build_head
from drm_lightning.models.lora import LoraSettings
from tests.helpers import fashion_mnist
from tests.helpers.expert_marks import EXPERT_TEST_MARKS
from tests.helpers.recipes import QUIET_CPU_TRAINER, cli_fit, run_recipe
from tests.helpers.tiny_models import IMAGE_SIZE, SyntheticDataModule, make_tiny_model, tiny_trainer

pytestmark = EXPERT_TEST_MARKS
LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return make_tiny_model("clip", tmp_path_factory.mktemp("clip") / "m")


def _pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_zero_shot_head_reproduces_clip_image_text_logits(clip):
    expert = ExpertModule(clip, "clip", label_names=LABELS).eval()
    pixels = _pixels()
    with torch.no_grad():
        mine = expert({"pixel_values": pixels})
        model = CLIPModel.from_pretrained(clip).eval()
        text = AutoTokenizer.from_pretrained(clip)(
            [f"a photo of a {c}." for c in LABELS], padding=True, return_tensors="pt"
        )
        theirs = model(**text, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    assert isinstance(expert.head, ZeroShotHead) and not list(expert.head.parameters())  # nothing to train
    assert expert.head.logit_scale == pytest.approx(model.logit_scale.exp().item())


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_text_embeddings(clip):
    templates = ["a photo of a {}.", "a bad photo of the {}.", "{}"]
    expert = ExpertModule(clip, "clip", label_names=LABELS, templates=templates)
    model = CLIPModel.from_pretrained(clip).eval().double()
    tok = AutoTokenizer.from_pretrained(clip)
    with torch.no_grad():
        rows = []
        for name in LABELS:
            enc = tok([t.format(name) for t in templates], padding=True, return_tensors="pt")
            embeds = model.get_text_features(**enc).pooler_output
            mean = (embeds / embeds.norm(dim=-1, keepdim=True)).mean(dim=0)
            rows.append(mean / mean.norm())
    torch.testing.assert_close(expert.head.weight.double(), torch.stack(rows), atol=1e-5, rtol=1e-5)
    assert expert.hparams.templates == templates


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2)], ids=["full", "lora"])
def test_task_vector_holds_the_vision_tower_and_reproduces_the_expert(clip, tmp_path, lora):
    dm = SyntheticDataModule("clip", clip, n=16, batch_size=8, label_names=tuple(LABELS))
    expert = ExpertModule(clip, "clip", task="shapes", lora=lora, learning_rate=5e-2)
    callback = TaskVectorCallback(str(tmp_path / "tv"))
    tiny_trainer(max_steps=2, callbacks=[callback]).fit(expert, dm)
    folder = callback.written
    with open_safetensors(folder / DELTAS_FILE) as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("vision_model.", "visual_projection.")) for k in keys)
    if lora is None:
        assert "visual_projection.weight" in keys  # the projection is part of the merged image encoder
    meta = read_meta(folder)
    assert meta.family == "clip" and meta.head["type"] == "zeroshot" and meta.label_names == LABELS
    torch.testing.assert_close(read_head(folder)["weight"], expert.head.weight)

    rebuilt = ExpertModule.from_task_vector(folder, with_task_vector=True)
    batch = {"pixel_values": _pixels()}
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch), expert.eval()(batch), atol=1e-5, rtol=1e-5)


def test_a_merged_vision_tower_is_evaluated_without_a_text_encoder(clip, tmp_path, monkeypatch):
    from drm_lightning.export.model_folder import save_merged_model
    from drm_lightning.merging.engine.merger import merge_task_vectors
    from drm_lightning.models import zeroshot

    folders = []
    for i in range(2):
        dm = SyntheticDataModule("clip", clip, n=16, batch_size=8, label_names=tuple(LABELS[: 2 + i]), seed=i)
        callback = TaskVectorCallback(str(tmp_path / f"tv{i}"))
        tiny_trainer(max_steps=2, callbacks=[callback]).fit(ExpertModule(clip, "clip", task=f"t{i}"), dm)
        folders.append(callback.written)
    merge_task_vectors(folders, "iso_c", tmp_path / "delta", progress=False)
    save_merged_model(tmp_path / "delta", 1.0, tmp_path / "merged")
    # A whole CLIPModel again: the merged vision tower beside the base's untouched text tower.
    merged, base = CLIPModel.from_pretrained(tmp_path / "merged"), CLIPModel.from_pretrained(clip)
    text = {k: v for k, v in base.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    assert text and all(torch.equal(merged.state_dict()[k], v) for k, v in text.items())
    assert not torch.equal(merged.visual_projection.weight, base.visual_projection.weight)

    def no_text_encoder(*args, **kwargs):
        raise AssertionError("evaluation must not need the text encoder")

    monkeypatch.setattr(zeroshot, "class_embeddings", no_text_encoder)
    for folder in folders:
        expert = ExpertModule.from_task_vector(folder, backbone=str(tmp_path / "merged"))
        assert torch.equal(expert.head.weight, read_head(folder)["weight"])
        assert expert({"pixel_values": _pixels()}).shape == (4, len(read_meta(folder).label_names))


@pytest.mark.parametrize(
    "config, match",
    [
        ({"type": "zeroshot", "embed_dim": 16, "num_labels": 1}, "num_labels"),
        ({"type": "zeroshot", "embed_dim": 16, "num_labels": 3, "logit_scale": 0}, "logit_scale"),
    ],
)
def test_zero_shot_head_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        build_head(config)


def test_templates_are_checked():
    from drm_lightning.data.checks import DataError
    from drm_lightning.data.image import ImageClassificationDataModule

    for templates in (["a photo"], ["{} and {}"], []):
        with pytest.raises(DataError, match="template"):
            ImageClassificationDataModule(task="t", image_processor="x", dataset="d", templates=templates)


@pytest.mark.slow  # real images end to end: ~9 s on 2 idle cores
@pytest.mark.skipif(
    not fashion_mnist.available(),
    reason=f"Fashion-MNIST idx files not in {fashion_mnist.FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_pipeline_on_fashion_mnist_class_groups(clip, tmp_path):
    """Three tasks of three Fashion-MNIST classes each; label names and images from imagefolders; four merges."""
    groups = {"tops": [0, 2, 4], "shoes": [5, 7, 9], "others": [1, 3, 8]}
    folders = fashion_mnist.write_imagefolders(tmp_path / "data", groups, {"train": 24, "test": 8})
    tasks = [
        {
            "class_path": "drm_lightning.data.image.ImageClassificationDataModule",
            "init_args": {
                "task": task,
                "data_dir": str(folder),
                "label_names": None,
                "validation_split": None,
                "val_fraction": 0.25,
                "templates": ["a photo of a {}.", "a photo of the {}."],
            },
        }  # fmt: skip
        for task, folder in folders.items()
    ]
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "tasks": tasks,
        "data": {"batch_size": 16, "eval_batch_size": 64},
        "model": {"backbone": clip, "family": "clip", "learning_rate": 1e-3, "warmup_ratio": 0.0},
        "trainer": {**QUIET_CPU_TRAINER, "max_steps": 4},
        "methods": [{"method": "task_arithmetic", "lambdas": [0.3, 1.0]}, {"method": "iso_c", "lambdas": [1.0, 1.5]},
                    {"method": "tsv_m", "lam": 1.0}, {"method": "ties", "lam": 1.0}],
        "plots": False,
    }  # fmt: skip
    run = run_recipe(tmp_path, recipe)
    for task, classes in groups.items():
        meta = read_meta(run / "task_vectors" / task)
        assert meta.label_names == sorted(fashion_mnist.CLASSES[c] for c in classes)  # the imagefolder's classes
        assert meta.head["type"] == "zeroshot"
    report = (run / "report.md").read_text()
    for name in ("tops", "shoes", "others", "iso_c", "tsv_m", "ties", "task_arithmetic"):
        assert name in report


def test_cli_fit_takes_the_templates_from_the_task(clip, tmp_path):
    """``drm-lightning fit`` on an imagefolder task: templates and (label_names: null) class names from the data."""
    from PIL import Image

    for split, count in (("train", 8), ("test", 4)):
        for k, name in enumerate(("cat", "dog")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 20), (40 * k + i, 100, 200 - 60 * k)).save(folder / f"{i}.png")
    templates = ["a photo of a {}.", "a bad photo of the {}."]
    data = {
        "class_path": "drm_lightning.data.image.ImageClassificationDataModule",
        "init_args": {"task": "pets", "data_dir": str(tmp_path / "images"), "validation_split": None,
                      "val_fraction": 0.25, "templates": templates, "batch_size": 4},
    }  # fmt: skip
    meta = cli_fit(tmp_path, {"backbone": clip, "family": "clip"}, data)
    assert meta.label_names == ["cat", "dog"] and meta.head["type"] == "zeroshot"
    expected = ExpertModule(clip, "clip", label_names=["cat", "dog"], templates=templates).head.weight
    torch.testing.assert_close(read_head(tmp_path / "tv")["weight"], expected)
