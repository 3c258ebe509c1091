"""Rebuild an expert for evaluation from a task vector folder: its family, head, label names and base.

``ExpertModule.from_task_vector`` is the entry point. Two things reach ``ExpertModule.__init__`` here without being
constructor arguments, which must stay plain values (they are saved as hyperparameters): an already-built backbone
module (``preloaded_backbone``) and, for ``clip``, the recorded zero-shot head's config (``recorded_head``), so the
head is rebuilt from meta.json and not from a text encoder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from torch import nn

from drm_lightning.models.backbone import FAMILIES
from drm_lightning.models.heads import build_head


class Rebuildable(Protocol):
    """What ``expert_from_task_vector`` needs of the class it builds (``ExpertModule``, which calls it: this module
    does not import the expert module, so the two make no import cycle)."""

    backbone: nn.Module
    head: nn.Module | None

    def head_config(self) -> dict[str, Any]: ...

    def eval(self) -> Any: ...


E = TypeVar("E", bound=Rebuildable)

_PRELOADED_BACKBONE: ContextVar[nn.Module | None] = ContextVar("drm_lightning_preloaded_backbone", default=None)
_RECORDED_HEAD: ContextVar[dict[str, Any] | None] = ContextVar("drm_lightning_recorded_head", default=None)


def preloaded_backbone() -> nn.Module | None:
    """The backbone module ``from_task_vector`` hands to the ``ExpertModule`` it is building, else None."""
    return _PRELOADED_BACKBONE.get()


def recorded_head() -> dict[str, Any] | None:
    """The recorded head config (``meta.json["head"]``) of the ``clip`` expert being rebuilt, else None."""
    return _RECORDED_HEAD.get()


@contextmanager
def _setting(var: ContextVar[Any], value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def expert_from_task_vector(
    cls: type[E],
    folder: str | os.PathLike[str],
    backbone: str | nn.Module | None,
    with_task_vector: bool,
    *,
    torch_dtype: str | None,
    gguf_file: str | None,
    trust_remote_code: bool = False,
) -> E:
    """``cls.from_task_vector``'s work (its docstring says what each argument does), in eval mode."""
    from drm_lightning.io.task_vector import read_head, read_meta
    from drm_lightning.task_vectors.apply import apply_task_vector

    meta = read_meta(folder)
    if meta.family not in FAMILIES:
        raise ValueError(f"{folder}/meta.json: family={meta.family!r}, expected one of {FAMILIES}")
    head_cfg = dict(meta.head)
    kwargs: dict[str, Any] = {
        "family": meta.family,
        "task": meta.task,
        "label_names": list(meta.label_names),
        "pooling": head_cfg.get("pooling", "cls"),
        "head_dropout": head_cfg.get("dropout", 0.1),
        "trust_remote_code": trust_remote_code,
        "tokenizer": meta.base_model,
        "task_type": meta.task_type,
    }
    with _setting(_RECORDED_HEAD, head_cfg) if meta.family == "clip" else nullcontext():
        if isinstance(backbone, nn.Module):
            with _setting(_PRELOADED_BACKBONE, backbone):
                model = cls(backbone=meta.base_model, torch_dtype=torch_dtype, **kwargs)
        elif backbone is None:
            model = cls(backbone=meta.base_model, **meta.load_options(torch_dtype, gguf_file), **kwargs)
        else:
            model = cls(backbone=str(backbone), torch_dtype=torch_dtype, **kwargs)
    if model.head is not None:
        if head_cfg and build_head(head_cfg).config() != model.head_config():
            raise ValueError(f"{folder}/meta.json: head {head_cfg!r} does not match {model.head_config()!r}")
        model.head.load_state_dict(read_head(folder))
    if with_task_vector:
        apply_task_vector(model.backbone, folder, check_fingerprint=backbone is None)
    return model.eval()
