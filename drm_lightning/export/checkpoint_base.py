"""The base model as its own safetensors checkpoint: merged into and written out with no ``transformers`` model class.

Why: a merge at a fixed λ (``model_folder.merge_to_model``) otherwise builds the base's architecture to load it and
``save_pretrained`` it, which costs importing the model's module and the config machinery (2–3 s on a 2-core CPU,
more than the whole arithmetic of a small model) for nothing the folder needs: the tensors go out under the names
they came in with. Here the base folder's tensors are read as stored (``interop.checkpoint.SafetensorsFolder``),
``λ·Δ`` is added to the backbone's ones with ``apply.add_scaled_`` (the arithmetic every other path uses), and they
are written as ``save_pretrained`` writes a model of one shard (``model.safetensors``, ``{"format": "pt"}``
metadata), next to the base's own ``config.json`` and ``generation_config.json`` copied byte for byte.

When it is used (``open_checkpoint_base`` returns ``None`` otherwise, and the model class path runs): the base is a
local folder with ``config.json`` naming its ``architectures`` and no ``auto_map`` (code in the folder is never trusted:
the model class path refuses it in one line); its safetensors weights fit in one output shard (``max_shard_size``:
``save_pretrained`` cuts shards in its modules' order, which a checkpoint does not keep); no GGUF file; every floating
tensor is stored in one dtype that is also the config's ``dtype`` and the requested ``torch_dtype`` (so loading would
cast nothing); and the tensors under some prefix (``""``, ``"model."``, ...; for encoder and vision families also
without the ``pooler.*`` that ``load_backbone`` leaves out) have exactly the fingerprint the task vectors recorded: the
names, dtypes, shapes and sampled values of the backbone ``load_backbone`` built. That check is what makes both paths
write the same bytes (``tests/export/test_checkpoint_base.py`` compares them per architecture): anything
``transformers`` renames, ties or converts on load (T5's shared embeddings, ViT's stored ``encoder.layer.*`` names, a
CLIP tower inside ``CLIPModel``) changes the names and so goes the model class way, as does a file that stores a tied
weight twice. The folder's ``merge.json`` records the class the config names first (``architecture``) and the prefix
(``backbone_prefix``), as the other path does. One difference remains by design: a base folder without
``generation_config.json`` gets none here, where ``save_pretrained`` of a generating model derives one from its config
(``transformers`` derives the same one when it loads the folder).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from drm_lightning.interop.checkpoint import CheckpointError, SafetensorsFolder
from drm_lightning.io.json_file import read_json_object
from drm_lightning.io.safetensors import DTYPES, FLOAT_CODES
from drm_lightning.merging.engine.apply import add_scaled_
from drm_lightning.models.backbone import POOLED_FAMILIES, dtype_name
from drm_lightning.models.resolve import resolve_pretrained
from drm_lightning.task_vectors.fingerprint import fingerprint_matches, fingerprint_state

#: Files of the base folder copied as they are (``save_pretrained`` writes these two beside the weights).
CONFIG_FILES = ("config.json", "generation_config.json")
#: The weights file of a ``save_pretrained`` folder of one shard.
WEIGHTS = "model.safetensors"
#: The module ``load_backbone`` leaves out of encoder and vision backbones (``add_pooling_layer=False``).
POOLER = "pooler."


class CheckpointBase:
    """A base checkpoint's tensors in memory, the prefix of the backbone inside them and the architecture named.

    Args:
        folder: the base folder.
        tensors: every tensor of its safetensors weights, by stored name.
        prefix: what the stored names of backbone parameters start with (``"model."`` for ``LlamaForCausalLM``).
        backbone: the stored names that make up ``load_backbone``'s module (the prefix removed gives its names).
        architecture: the config's first ``architectures`` entry.
    """

    def __init__(
        self, folder: Path, tensors: dict[str, torch.Tensor], prefix: str, backbone: Sequence[str], architecture: str
    ) -> None:
        self.folder = folder
        self.tensors = tensors
        self.prefix = prefix
        self.backbone = list(backbone)
        self.architecture = architecture

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's ``state_dict()`` as ``load_backbone`` would give it: its names, the stored tensors."""
        return {key[len(self.prefix) :]: self.tensors[key] for key in self.backbone}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @torch.no_grad()
    def add(self, lam: float, deltas: Iterable[tuple[str, torch.Tensor]], source: Path) -> None:
        """Add ``lam · Δ`` to each backbone tensor ``deltas`` names, in place (``apply.add_merged_delta``'s checks).

        Raises:
            ValueError: a name that is not a backbone parameter, or a shape that differs (naming ``source``).
        """
        backbone = set(self.backbone)
        for name, delta in deltas:
            key = self.prefix + name
            if key not in backbone:
                raise ValueError(f"{source}: key {name!r} is not a parameter of the base model")
            target = self.tensors[key]
            if tuple(target.shape) != tuple(delta.shape):
                raise ValueError(
                    f"{source}: key {name!r} has shape {list(delta.shape)}, base parameter has {list(target.shape)}"
                )
            add_scaled_(target, delta, lam)

    def save(self, folder: Path) -> None:
        """Write the config files and the weights into ``folder`` as ``save_pretrained`` writes one shard."""
        from safetensors.torch import save_file

        for name in CONFIG_FILES:
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, folder / name)
        tensors = {name: tensor.contiguous() for name, tensor in self.tensors.items()}
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def open_checkpoint_base(
    base: str, family: str, load: Mapping[str, str | None], expected: Sequence[str], max_shard_size: str | int
) -> CheckpointBase | None:
    """The base read as its checkpoint, or ``None`` where only its model class can load it (module docstring).

    Args:
        base: the base model name (a folder, ``package://...``; a hub id is never a folder here, so ``None``).
        family: the task vectors' family.
        load: ``torch_dtype`` / ``gguf_file`` as the task vectors record them.
        expected: the fingerprints the task vectors recorded; every one must match the backbone found.
        max_shard_size: ``save_pretrained``'s shard size (``"2GB"`` or bytes); a larger base is not read here.
    """
    from huggingface_hub.serialization._base import parse_size_to_int

    if load.get("gguf_file") is not None:
        return None
    try:
        folder = Path(resolve_pretrained(base))
        if not folder.is_dir() or not (folder / "config.json").is_file():
            return None
        config = read_json_object(folder / "config.json")
        weights = SafetensorsFolder(folder)
    except (CheckpointError, ValueError):
        return None
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        return None
    if "auto_map" in config:
        return None  # a model only its own code defines: the model class path refuses it in one line
    limit = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)
    if weights.nbytes() > limit:
        return None
    floats = {code for code in weights.dtype_codes() if code in FLOAT_CODES}
    if len(floats) != 1 or any(code not in DTYPES for code in weights.dtype_codes()):
        return None
    stored = dtype_name(DTYPES[floats.pop()])
    if config.get("dtype", config.get("torch_dtype")) not in (None, stored) or load.get("torch_dtype") not in (
        None,
        stored,
    ):
        return None  # loading would cast: the model class path does that
    tensors = dict(weights.iter_read(weights.names()))
    for prefix in [""] + sorted({name.split(".")[0] + "." for name in tensors if "." in name}):
        under = [name for name in tensors if name.startswith(prefix)]
        views = [under]
        if family in POOLED_FAMILIES:
            views.append([name for name in under if not name[len(prefix) :].startswith(POOLER)])
        for names in views:
            state = {name[len(prefix) :]: tensors[name] for name in names}
            if expected and all(fingerprint_matches(state, fp) for fp in expected):
                if _stores_a_tie(tensors, names):
                    return None
                return CheckpointBase(folder, tensors, prefix, names, architectures[0])
    return None


def _stores_a_tie(tensors: Mapping[str, torch.Tensor], backbone: Sequence[str]) -> bool:
    """Whether a tensor outside the backbone is stored as a copy of one inside (an untied file of tied weights, e.g.
    ``lm_head.weight`` beside ``model.embed_tokens.weight``): adding Δ to the backbone's copy alone would leave the
    other stale in the file, where the model class path ties them and saves one. Matrices only: what is tied is an
    embedding or a projection, while a fresh model's vectors (zero biases, unit norms) are often equal by chance."""
    inside = set(backbone)
    seen = {_sample_key(tensors[name]) for name in backbone if tensors[name].ndim >= 2}
    return any(_sample_key(t) in seen for name, t in tensors.items() if name not in inside and t.ndim >= 2)


def _sample_key(tensor: torch.Tensor) -> str:
    return fingerprint_state({"": tensor})
