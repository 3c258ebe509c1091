"""Shared test helpers: tiny Hugging Face models saved to disk, and fake task vectors for them.

Why on disk: the real loading code (``load_backbone``, ``from_pretrained``, ``safe_open``) must run in tests, so
models are built from a config (hidden size 32 by default), saved with ``save_pretrained`` and read back like any
checkpoint. Task vectors are written with the project's own ``format.write_task_vector``, fingerprinted against the
backbone exactly as the extraction callback does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel

from drm_lightning.io.task_vector import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LoraMeta,
    TaskVectorMeta,
    library_versions,
    write_task_vector,
)
from drm_lightning.models.backbone import load_backbone
from drm_lightning.task_vectors.fingerprint import fingerprint

#: architecture -> (config class, model class, family)
ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], str]] = {
    "bert": (BertConfig, BertModel, "encoder"),
    "llama": (LlamaConfig, LlamaModel, "decoder"),
}

#: The tiny configs of each architecture (also what ``interop_models`` builds its hub-style experts from).
TINY_CONFIGS: dict[str, dict] = {
    "bert": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
    ),
    "llama": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
}

#: Linear weights a LoRA expert adapts by default (BERT and Llama names).
DEFAULT_LORA_TARGETS = r"\.(query|key|value|dense|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "a", "was", "not"]


def tiny_config(arch: str = "bert", **overrides) -> PretrainedConfig:
    """A tiny config of ``arch`` (``"bert"`` or ``"llama"``); ``overrides`` replace any field."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(ARCHS)}")
    config_cls = ARCHS[arch][0]
    return config_cls(**{**TINY_CONFIGS[arch], **overrides})


def family_of(arch: str) -> str:
    """The ``load_backbone`` family of ``arch``."""
    return ARCHS[arch][2]


def build_tiny_model(
    folder: str | Path, arch: str = "bert", *, seed: int = 0, tokenizer: bool = False, **config_overrides
) -> Path:
    """Build a randomly initialised tiny model of ``arch`` and ``save_pretrained`` it (float32) to ``folder``.

    Args:
        folder: where the checkpoint goes (created).
        arch: ``"bert"`` or ``"llama"``.
        seed: weights are a deterministic function of it.
        tokenizer: also save a tiny WordPiece tokenizer (BERT vocabulary), so code that copies a base model's
            tokenizer has one to copy.
        config_overrides: fields of the config (e.g. ``hidden_size=512``).
    """
    folder = Path(folder)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = ARCHS[arch][1](config).eval()
    model.save_pretrained(folder)
    if tokenizer:
        from transformers import BertTokenizer

        BertTokenizer(vocab={tok: i for i, tok in enumerate(_VOCAB)}).save_pretrained(folder)
    return folder


def base_state(folder: str | Path, family: str = "encoder") -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's ``state_dict()`` (as ``load_backbone`` sees it, cloned) and its fingerprint."""
    model = load_backbone(str(folder), family)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, fingerprint(model)


def write_task_vectors(
    base_folder: str | Path,
    out_dir: str | Path,
    num_tasks: int = 3,
    *,
    kind: str = "dense",
    family: str = "encoder",
    seed: int = 0,
    scale: float = 0.01,
    rank: int = 4,
    alpha: float = 8.0,
    lora_targets: str = DEFAULT_LORA_TARGETS,
    lora_dense_1d: bool = True,
    drop: str | None = None,
    dtype: torch.dtype = torch.float32,
    num_labels: int = 2,
    tasks: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``num_tasks`` random task vectors for the model in ``base_folder``; return their folders.

    Args:
        base_folder: a ``save_pretrained`` folder (e.g. from ``build_tiny_model``).
        out_dir: task vectors go to ``out_dir/<task>``.
        kind: ``"dense"`` (a delta for every floating-point parameter) or ``"lora"`` (factors for weights matching
            ``lora_targets``, plus dense deltas of 1-D parameters if ``lora_dense_1d``).
        lora_targets: regex searched in parameter names to pick the adapted weights; meta.json records the adapted
            modules' last name parts as ``lora.target_modules`` (``peft``'s list form, as real LoRA runs write it).
        family: the ``load_backbone`` family, recorded in meta.json.
        seed: task ``i`` uses ``seed + i``.
        scale: standard deviation of the random deltas (and of the LoRA factors' product scale).
        rank, alpha: LoRA rank and alpha (``meta.lora.scale = alpha / rank``).
        drop: regex of parameters left out (a zero delta, as for frozen parameters).
        dtype: storage dtype of the deltas.
        num_labels: output size of the random linear head.
        tasks: task names (default ``task0``, ``task1``, ...).
    """
    if kind not in ("dense", "lora"):
        raise ValueError(f"kind={kind!r}: expected 'dense' or 'lora'")
    state, base_fp = base_state(base_folder, family)
    tasks = list(tasks) if tasks is not None else [f"task{i}" for i in range(num_tasks)]
    if len(tasks) != num_tasks:
        raise ValueError(f"tasks={tasks!r}: expected {num_tasks} names")
    hidden = next(v.shape[-1] for k, v in state.items() if v.ndim == 2)
    out = []
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed + i)
        deltas: dict[str, torch.Tensor] = {}
        adapted: set[str] = set()
        for name, weight in state.items():
            if not weight.is_floating_point() or (drop is not None and re.search(drop, name)):
                continue
            if kind == "lora" and weight.ndim == 2 and re.search(lora_targets, name):
                adapted.add(name.rsplit(".", 2)[-2])  # "<...>.query.weight" -> "query", as peft's target_modules
                out_f, in_f = weight.shape
                deltas[name + LORA_A_SUFFIX] = (torch.randn(rank, in_f, generator=gen) * scale**0.5).to(dtype)
                deltas[name + LORA_B_SUFFIX] = (torch.randn(out_f, rank, generator=gen) * scale**0.5).to(dtype)
            elif kind == "dense" or (lora_dense_1d and weight.ndim == 1):
                deltas[name] = (torch.randn(weight.shape, generator=gen) * scale).to(dtype)
        head = {
            "weight": torch.randn(num_labels, hidden, generator=gen),
            "bias": torch.zeros(num_labels),
        }
        meta = TaskVectorMeta(
            task=task,
            kind=kind,  # type: ignore[arg-type]
            base_model=str(base_folder),
            base_fingerprint=base_fp,
            family=family,
            label_names=[f"label{j}" for j in range(num_labels)],
            lora=LoraMeta(r=rank, alpha=alpha, scale=alpha / rank, target_modules=sorted(adapted))
            if kind == "lora"
            else None,
            metrics={"val_acc": 0.5 + 0.01 * i},
            versions=library_versions(),
        )
        out.append(write_task_vector(Path(out_dir) / task, deltas, head, meta))
    return out


def dense_deltas(folder: str | Path) -> dict[str, torch.Tensor]:
    """A task vector's deltas as dense float32 tensors (LoRA pairs multiplied out): the reference for tests."""
    from drm_lightning.io.safetensors import open_safetensors
    from drm_lightning.io.task_vector import DELTAS_FILE, read_meta

    meta = read_meta(folder)
    with open_safetensors(Path(folder) / DELTAS_FILE) as f:
        raw = {k: f.get_tensor(k).float() for k in f.keys()}
    out = {}
    for key, value in raw.items():
        if key.endswith(LORA_A_SUFFIX):
            name = key[: -len(LORA_A_SUFFIX)]
            assert meta.lora is not None
            out[name] = meta.lora.scale * (raw[name + LORA_B_SUFFIX] @ value)
        elif not key.endswith(LORA_B_SUFFIX):
            out[key] = value
    return out


def add_random_statistics(folder: str | Path, seed: int = 0, only: str = "") -> dict[str, torch.Tensor]:
    """Give a task vector input statistics, as the callback records them, for each 2-D delta whose name contains
    ``only`` and is not an embedding: ``Σ x xᵀ`` of random inputs (3·in rows) and its row count. Returns the per-row
    mean Grams the merge uses (``TaskVectorReader.gram``), by weight name."""
    from drm_lightning.io.statistics import add_statistics

    gen = torch.Generator().manual_seed(seed)
    sums, rows = {}, {}
    for name, delta in sorted(dense_deltas(folder).items()):
        if delta.ndim == 2 and only in name and "embed" not in name:
            width = delta.shape[1]
            x = torch.randn(3 * width, width, generator=gen)
            sums[name], rows[name] = x.T @ x, 3 * width + seed
    add_statistics(folder, sums, rows, examples=5)
    return {name: sums[name] / rows[name] for name in sums}


def with_random_statistics(folders: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Copies of ``folders`` under ``out_dir`` with random input statistics (``add_random_statistics``), for the
    methods that need them (RegMean); made once per ``out_dir``."""
    import shutil

    out = []
    for i, folder in enumerate(folders):
        copy = Path(out_dir) / Path(folder).name
        if not copy.exists():
            shutil.copytree(folder, copy)
            add_random_statistics(copy, seed=i)
        out.append(copy)
    return out
