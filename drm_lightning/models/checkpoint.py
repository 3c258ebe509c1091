"""What an expert checkpoint holds beyond Lightning's own: every rank's generator states, and LoRA's trainable part.

Lightning 2.6 saves no RNG state, so without it a resumed fit draws other dropout masks than an uninterrupted one;
``ExpertModule.on_save_checkpoint`` stores the states of every global rank (``gather_rng_states``) and
``on_load_checkpoint`` restores this rank's (``rank_rng_states``). A LoRA checkpoint drops the frozen base weights
(``drop_frozen``) and gets them back from the freshly loaded backbone after checking their fingerprint
(``fill_frozen``), so ``--ckpt_path`` resume and ``load_from_checkpoint`` work with strict loading.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from drm_lightning.task_vectors.fingerprint import fingerprint_matches, fingerprint_state, short_fingerprint

#: Checkpoint key of the trainable-only record (``{"trainable_only": True, "frozen_fingerprint": ...}``).
CKPT_KEY = "drm_lightning"
#: Checkpoint key of the random-number-generator states, a list in global rank order.
RNG_KEY = "drm_lightning_rng"


def rng_states() -> dict[str, Any]:
    """The global generators' states, as tensors, ints, floats and lists only (``weights_only`` loading):
    torch CPU; every CUDA device's when CUDA is initialised; python ``random``; numpy's legacy global one."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch; nothing drew from it then
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what ``rng_states`` returned (CUDA: the devices present, in order)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("torch.cuda")
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def gather_rng_states(
    states: dict[str, Any],
    world_size: int,
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> list[dict[str, Any]]:
    """``states`` of every global rank, in rank order: a collective when ``world_size > 1`` (every rank saves
    together; ``all_gather`` is the ``LightningModule``'s).

    The states travel as ``torch.save`` bytes padded to the longest, since ``all_gather`` needs one shape."""
    if world_size <= 1:
        return [states]
    buffer = io.BytesIO()
    torch.save(states, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
    sizes = [int(n) for n in all_gather(torch.tensor([data.numel()], device=device)).flatten()]
    padding = torch.zeros(max(sizes) - data.numel(), dtype=torch.uint8, device=device)
    gathered = all_gather(torch.cat([data, padding]))
    return [
        torch.load(io.BytesIO(row[:size].cpu().numpy().tobytes()), weights_only=True)
        for row, size in zip(gathered, sizes, strict=True)
    ]


def rank_rng_states(saved: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's saved states; rank 0's (with a warning) when the world size changed since the save."""
    if len(saved) != world_size:
        rank_zero_warn(
            f"checkpoint: its generator states are of {len(saved)} rank(s) but this fit runs on {world_size}: every "
            "rank restores rank 0's, so dropout masks will differ from an uninterrupted run"
        )
        rank = 0
    return saved[rank]


def split_frozen(
    state: Mapping[str, torch.Tensor], trainable: Collection[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(trainable part, frozen part)`` of a state dict, by the names of the trained parameters."""
    kept = {k: v for k, v in state.items() if k in trainable}
    frozen = {k: v for k, v in state.items() if k not in trainable}
    return kept, frozen


def drop_frozen(checkpoint: dict[str, Any], trainable: Collection[str], fingerprint: str | None) -> str:
    """Keep only the trainable weights in ``checkpoint["state_dict"]`` and record the frozen ones' fingerprint
    (``fingerprint`` when already known: frozen weights never change, so they are hashed once); return it."""
    kept, frozen = split_frozen(checkpoint["state_dict"], trainable)
    if fingerprint is None:
        fingerprint = fingerprint_state(frozen)
    checkpoint["state_dict"] = kept
    checkpoint[CKPT_KEY] = {"trainable_only": True, "frozen_fingerprint": fingerprint}
    return fingerprint


def fill_frozen(checkpoint: dict[str, Any], frozen: Mapping[str, torch.Tensor], backbone: str) -> None:
    """Put the frozen weights of the backbone loaded now back into a trainable-only checkpoint (no-op for a full one),
    after checking they are those it was saved with."""
    info = checkpoint.get(CKPT_KEY) or {}
    if not info.get("trainable_only"):
        return
    expected = info.get("frozen_fingerprint")
    if expected is not None and not fingerprint_matches(dict(frozen), expected):
        raise ValueError(
            f"checkpoint: its frozen base weights (fingerprint {short_fingerprint(expected)}) differ from those "
            f"of backbone {backbone!r} loaded now (different model, revision or torch_dtype)"
        )
    checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
