"""When a base folder's stored tensors are the backbone ``load_backbone`` would build: the same names, values, dtype.

Why: loading a base through its ``transformers`` class costs the model's module import and the config machinery
(seconds on a small CPU), all to hand back tensors that sit in the folder's safetensors file as they are. Two users
read the stored tensors instead where that is safe: the merge writing a model folder (``export/checkpoint_base.py``,
which checks the task vectors' recorded fingerprint against them) and a merge of fine-tuned model folders, whose
deltas are taken against them as the merge reads each parameter (``interop/reference.py``, which checks the
names and shapes of the backbone's skeleton against them).

What must hold for loading to change nothing (``loads_as_stored``): no GGUF file; a ``config.json`` without
``auto_map`` (a model only its own code defines; code in a folder is never trusted); every stored tensor of a dtype
torch holds, every floating one of one dtype that is also the config's ``dtype`` and the requested ``torch_dtype``
(so loading casts nothing). Then the backbone is the tensors under some prefix (``""``, ``"model."``, ...;
``backbone_views``), for the encoder and vision families also without the ``pooler.*`` that ``load_backbone``
leaves out, and no tensor outside it may store a copy of one inside (``stores_a_tie``: an untied file of tied
weights, where the model class ties them on load).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from drm_lightning.interop.base import BaseInfo
from drm_lightning.interop.checkpoint import CheckpointError, SafetensorsFolder
from drm_lightning.io.safetensors import DTYPES, FLOAT_CODES
from drm_lightning.models.backbone import POOLED_FAMILIES, dtype_name
from drm_lightning.task_vectors.fingerprint import fingerprint_state

#: The module ``load_backbone`` leaves out of encoder and vision backbones (``add_pooling_layer=False``).
POOLER = "pooler."


def loads_as_stored(config: Mapping[str, Any], weights: SafetensorsFolder, load: Mapping[str, str | None]) -> bool:
    """Whether ``from_pretrained`` of this folder, loaded as ``load`` says (``torch_dtype``, ``gguf_file``), would hold
    its stored tensors unconverted (the module docstring's conditions but the prefix and the tie)."""
    if load.get("gguf_file") is not None or "auto_map" in config:
        return False
    codes = weights.dtype_codes()
    floats = {code for code in codes if code in FLOAT_CODES}
    if len(floats) != 1 or any(code not in DTYPES for code in codes):
        return False
    stored = dtype_name(DTYPES[floats.pop()])
    recorded = config.get("dtype", config.get("torch_dtype"))
    return recorded in (None, stored) and load.get("torch_dtype") in (None, stored)


def backbone_views(names: Sequence[str], family: str) -> Iterator[tuple[str, list[str]]]:
    """``(prefix, stored names)`` of every way ``names`` may hold the backbone: each first-dot prefix (and none),
    for a pooled family also without the pooler."""
    for prefix in [""] + sorted({name.split(".")[0] + "." for name in names if "." in name}):
        under = [name for name in names if name.startswith(prefix)]
        yield prefix, under
        if family in POOLED_FAMILIES:
            yield prefix, [name for name in under if not name[len(prefix) :].startswith(POOLER)]


def stores_a_tie(tensors: Mapping[str, torch.Tensor], backbone: Sequence[str]) -> bool:
    """Whether a tensor outside the backbone is stored as a copy of one inside (an untied file of tied weights, e.g.
    ``lm_head.weight`` beside ``model.embed_tokens.weight``): the model class ties them on load, so the stored
    backbone need not be what it holds, and adding Δ to the backbone's copy alone would leave the other stale.
    Matrices only: what is tied is an embedding or a projection, while a fresh model's vectors (zero biases, unit
    norms) are often equal by chance."""
    inside = set(backbone)
    seen = {_sample_key(tensors[name]) for name in backbone if tensors[name].ndim >= 2}
    return any(_sample_key(t) in seen for name, t in tensors.items() if name not in inside and t.ndim >= 2)


def _sample_key(tensor: torch.Tensor) -> str:
    return fingerprint_state({"": tensor})


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors by name, each read by its function when looked up (a mapping from its file: ``SafetensorsFolder.map``)
    and released with it: a whole checkpoint fingerprinted or sampled, never held."""

    def __init__(self, reads: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        self.reads = dict(reads)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reads[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.reads)

    def __len__(self) -> int:
        return len(self.reads)

    @classmethod
    def stored(cls, weights: SafetensorsFolder, keys: Mapping[str, str]) -> LazyTensors:
        """``weights``' tensors ``keys`` (name -> stored name) names."""
        return cls({name: functools.partial(weights.map, key) for name, key in keys.items()})


@dataclass(frozen=True)
class StoredBackbone:
    """A base folder whose stored tensors are ``load_backbone``'s state (``stored_backbone``).

    Attributes:
        weights: the base folder's safetensors weights.
        keys: backbone ``state_dict()`` name -> stored tensor name.
        fingerprint: the backbone's fingerprint (``fingerprint_state`` of the stored tensors under their backbone
            names: what loading the base and fingerprinting it gives, as the names, dtypes and values are the same).
    """

    weights: SafetensorsFolder
    keys: dict[str, str]
    fingerprint: str


def stored_backbone(info: BaseInfo, load: Mapping[str, str | None]) -> StoredBackbone | None:
    """The base ``info`` describes as its stored tensors, or ``None`` where loading it may change them (module
    docstring): the tensors under one of the ``backbone_views`` must have exactly the names and shapes of the
    backbone's skeleton (``info.shapes``, built on the meta device by ``load_backbone``'s class)."""
    try:
        weights = SafetensorsFolder(info.folder)
    except CheckpointError:
        return None
    if not loads_as_stored(info.config, weights, load):
        return None
    for prefix, names in backbone_views(weights.names(), info.family):
        keys = {name[len(prefix) :]: name for name in names}
        if keys.keys() != info.shapes.keys():
            continue
        if any(weights.tensors[key].shape != info.shapes[name] for name, key in keys.items()):
            continue
        if stores_a_tie(LazyTensors.stored(weights, {name: name for name in weights.names()}), names):
            return None
        return StoredBackbone(weights, keys, fingerprint_state(LazyTensors.stored(weights, keys)))
    return None
