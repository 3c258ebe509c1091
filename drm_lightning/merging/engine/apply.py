"""Apply λ in memory: ``W_0 + λ·Δ_merged`` added to a model's weights (``add_merged_delta``) or to the base loaded
afresh (``apply_merged_delta``). The merged model written as a folder is ``drm_lightning.export.model_folder``.

Why apart from the merge: Δ_merged is computed once (the expensive part) and λ is searched on validation data, so
each λ only rescales it; the evaluator's ``MergedBackbone`` uses the same arithmetic without reloading the base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from drm_lightning.io.merged_delta import MERGED_DIR, iter_merged_delta
from drm_lightning.merging.engine.record import MERGE_FILE, read_merge_record
from drm_lightning.merging.engine.setup import describe_load
from drm_lightning.models.backbone import check_family, dtype_name, load_backbone, parse_dtype
from drm_lightning.task_vectors.fingerprint import fingerprint, fingerprint_matches

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.no_grad()
def add_merged_delta(
    model: torch.nn.Module,
    merged: str | os.PathLike[str],
    lam: float,
    *,
    deltas: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> torch.nn.Module:
    """Add ``lam · Δ_merged`` to ``model``'s weights in place, streaming Δ_merged shard by shard.

    Tied weights (one tensor under two names) are updated once. Non-float32 weights are updated in float32 and
    rounded once, so bf16 bases do not accumulate two roundings. ``deltas``: ``(name, Δ)`` pairs already in memory
    (``MergedBackbone`` keeps them across a λ search), used instead of reading ``merged``'s shards.

    Raises:
        ValueError: a merged key that is not a parameter of ``model``, or a shape that differs.
    """
    lam = check_lam(lam)
    state = model.state_dict(keep_vars=True)
    done: set[tuple[int, int]] = set()
    for name, delta in iter_merged_delta(merged) if deltas is None else deltas:
        if name not in state:
            raise ValueError(f"{Path(merged) / MERGED_DIR}: key {name!r} is not a parameter of the base model")
        target = state[name]
        target = target.data if isinstance(target, torch.nn.Parameter) else target
        if tuple(target.shape) != tuple(delta.shape):
            raise ValueError(
                f"{Path(merged) / MERGED_DIR}: key {name!r} has shape {list(delta.shape)}, "
                f"base parameter has {list(target.shape)}"
            )
        storage = (target.untyped_storage().data_ptr(), target.storage_offset())
        if storage in done:
            continue
        done.add(storage)
        add_scaled_(target, delta, lam)
    return model


@torch.no_grad()
def add_scaled_(target: torch.Tensor, delta: torch.Tensor, lam: float) -> None:
    """``target += lam · delta`` in place: float32 directly, any other dtype in float32 and rounded once (so a bf16
    base does not accumulate two roundings). Every writer of merged weights adds through here, so their bytes agree."""
    delta = delta.to(target.device)
    if target.dtype == torch.float32:
        target.add_(delta, alpha=lam)
    else:
        target.copy_((target.float() + lam * delta).to(target.dtype))


def check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam={lam!r}: expected a finite number")
    return float(lam)


def recorded_base(
    record: Mapping[str, Any],
    base: str | None = None,
    family: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> tuple[str, str, dict[str, str | None]]:
    """``(base, family, load options)`` to rebuild the base of a merged folder: each argument given wins, else what
    its ``merge.json`` (``record``) says, so a base fitted in bfloat16 is merged, applied and saved in bfloat16.

    Raises:
        ValueError: an unknown family or dtype.
    """
    name = base if base is not None else str(record["base_model"])
    family = check_family(family if family is not None else record["family"])
    load = {
        "torch_dtype": dtype_name(parse_dtype(torch_dtype)) if torch_dtype is not None else record.get("torch_dtype"),
        "gguf_file": gguf_file if gguf_file is not None else record.get("gguf_file"),
    }
    return name, family, load


def apply_merged_delta(
    merged: str | os.PathLike[str],
    lam: float,
    *,
    base: str | None = None,
    family: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    deltas: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> PreTrainedModel:
    """Load the base backbone, add ``lam · Δ_merged`` and return it (nothing is written).

    Why return the model: a λ search evaluates each λ in memory; Δ_merged was computed once and each λ only
    rescales it. The merged model as a folder is ``drm_lightning.export.model_folder.save_merged_model``.

    Args:
        merged: a folder written by ``merge_task_vectors``.
        lam: the scaling coefficient λ.
        base: the base model; default: the one recorded in ``merge.json``.
        family: the ``load_backbone`` family; default: the recorded one.
        torch_dtype, gguf_file: how to load the base; default: the ones ``merge.json`` records (the task vectors'),
            so a base fitted in bfloat16 is merged and saved in bfloat16.
        deltas: Δ_merged already in memory (as ``add_merged_delta``).

    Raises:
        ValueError: bad ``lam``, a merged folder that is not one, or a base whose fingerprint differs from the
            recorded one.
    """
    lam = check_lam(lam)
    merged = Path(merged)
    record = read_merge_record(merged)
    base_name, family, load = recorded_base(record, base, family, torch_dtype, gguf_file)
    model = load_backbone(base_name, family, **load)
    if not fingerprint_matches(model, record["base_fingerprint"]):
        base_fp = fingerprint(model)
        raise ValueError(
            f"base model {base_name!r} {describe_load(load)} has fingerprint {base_fp}, but {merged / MERGE_FILE} was "
            f"merged against {record['base_fingerprint']} ({record['base_model']}): different weights, refusing to "
            "apply"
        )
    add_merged_delta(model, merged, lam, deltas=deltas)
    return model
