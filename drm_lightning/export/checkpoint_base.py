"""The base model as its own safetensors checkpoint: merged into and written out with no ``transformers`` model class.

Why: a merge at a fixed λ (``model_folder.merge_to_model``) otherwise builds the base's architecture to load it and
``save_pretrained`` it, which costs importing the model's module and the config machinery (2–3 s on a 2-core CPU,
more than the whole arithmetic of a small model) for nothing the folder needs: the tensors go out under the names
they came in with. Here the base folder's tensors are read as stored (``interop.checkpoint.SafetensorsFolder``),
``λ·Δ`` is added to the backbone's ones with ``apply.add_scaled_`` (the arithmetic every other path uses), and they
are written as ``save_pretrained`` writes a model of one shard (``model.safetensors``, ``{"format": "pt"}``
metadata), next to the base's own ``config.json`` and ``generation_config.json`` copied byte for byte.

When it is used (``open_checkpoint_base`` returns ``None`` otherwise, and the model class path runs): the base is a
local folder with ``config.json`` naming its ``architectures``; it loads as stored (``interop/stored_base.py``: no
GGUF file, no ``auto_map``, one floating dtype that loading keeps, no tied weight stored twice); its safetensors
weights fit in one output shard (``max_shard_size``: ``save_pretrained`` cuts shards in its modules' order, which a
checkpoint does not keep); and the tensors under some prefix (``backbone_views``) have exactly the fingerprint the
task vectors recorded: the names, dtypes, shapes and sampled values of the backbone ``load_backbone`` built. That
check is what makes both paths write the same bytes (``tests/export/test_checkpoint_base.py`` compares them per
architecture): anything
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
from drm_lightning.interop.stored_base import backbone_views, loads_as_stored, stores_a_tie
from drm_lightning.io.json_file import read_json_object
from drm_lightning.merging.engine.apply import add_scaled_
from drm_lightning.models.resolve import resolve_pretrained
from drm_lightning.task_vectors.fingerprint import fingerprint_matches

#: Files of the base folder copied as they are (``save_pretrained`` writes these two beside the weights).
CONFIG_FILES = ("config.json", "generation_config.json")
#: The weights file of a ``save_pretrained`` folder of one shard.
WEIGHTS = "model.safetensors"


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
    if not loads_as_stored(config, weights, load):
        return None  # a cast, code of its own or a GGUF file: the model class path does (or refuses) that
    limit = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)
    if weights.nbytes() > limit:
        return None
    tensors = dict(weights.iter_read(weights.names()))
    for prefix, names in backbone_views(list(tensors), family):
        state = {name[len(prefix) :]: tensors[name] for name in names}
        if expected and all(fingerprint_matches(state, fp) for fp in expected):
            if stores_a_tie(tensors, names):
                return None
            return CheckpointBase(folder, tensors, prefix, names, architectures[0])
    return None
