"""The cheap base fingerprint (``sampled1``): what it detects, what it does not, its cost, and old task vectors.

``docs/interop.md`` promises: another model, dtype, shape or name is detected; a change confined to unsampled
entries is not; the cost does not grow with a tensor's size; task vectors that record the old full SHA-256 still
merge (and a mix of old and new ones of one base), and a wrong base is refused under either scheme.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.models.backbone import load_backbone
from drm_lightning.task_vectors.fingerprint import (
    EDGE,
    STRIDED,
    _sample,
    fingerprint_matches,
    fingerprint_state,
    scheme_of,
    short_fingerprint,
)
from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors


def test_detects_model_dtype_shape_and_sampled_changes() -> None:
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(300, 40), "b.bias": torch.randn(7)}
    recorded = fingerprint_state(state)
    assert recorded.startswith("sampled1:") and scheme_of(recorded) == "sampled1"
    assert fingerprint_matches(state, recorded)
    other = {k: torch.randn_like(v) for k, v in state.items()}  # another checkpoint of the same architecture
    assert not fingerprint_matches(other, recorded)
    assert not fingerprint_matches({**state, "a.weight": state["a.weight"].double()}, recorded)
    assert not fingerprint_matches({**state, "a.weight": state["a.weight"].reshape(40, 300)}, recorded)
    nudged = {**state, "a.weight": state["a.weight"].clone()}
    nudged["a.weight"].view(-1)[-1] += 1e-3  # the last entry is always sampled
    assert not fingerprint_matches(nudged, recorded)
    assert fingerprint_matches({k: v.t().contiguous().t() for k, v in state.items()}, recorded)  # layout-free


def test_blind_to_an_unsampled_entry_as_documented() -> None:
    """A single edit between the samples escapes ``sampled1`` (the full scheme catches it): a mix-up guard."""
    n = 2 * EDGE + STRIDED + 10_000
    state = {"w": torch.randn(n)}
    strided = set((torch.arange(STRIDED) * (n - 1) // (STRIDED - 1)).tolist())
    hidden = next(i for i in range(EDGE, n - EDGE) if i not in strided)
    edited = {"w": state["w"].clone()}
    edited["w"][hidden] += 1.0
    assert fingerprint_state(edited) == fingerprint_state(state)
    assert fingerprint_state(edited, "full") != fingerprint_state(state, "full")


def test_cost_does_not_grow_with_the_tensor() -> None:
    big = torch.zeros(4096, 1024, dtype=torch.bfloat16)
    assert len(_sample(big)) == (2 * EDGE + STRIDED) * big.element_size()
    assert len(_sample(torch.zeros(10))) == 10 * 4


def test_unknown_scheme_is_named() -> None:
    with pytest.raises(ValueError, match="base_fingerprint='md5:abc'"):
        scheme_of("md5:abc")
    assert not fingerprint_matches({"w": torch.zeros(2)}, "md5:abc")
    assert short_fingerprint("sampled1:" + "ab" * 32) == "sampled1:abababababab..."


def _as_legacy(folder: Path, state: dict[str, torch.Tensor]) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["base_fingerprint"] = fingerprint_state(state, "full")
    (folder / "meta.json").write_text(json.dumps(meta))


def test_task_vectors_with_the_old_full_hash_still_merge(tmp_path: Path) -> None:
    base = build_tiny_model(tmp_path / "base", "bert")
    tvs = write_task_vectors(base, tmp_path / "tvs", 2)
    state = load_backbone(str(base)).state_dict()
    _as_legacy(tvs[0], state)  # one old, one new: the same base under two schemes
    merged = merge_task_vectors(tvs, "task_arithmetic", tmp_path / "merged", progress=False)
    record = json.loads((merged.output / "merge.json").read_text())
    assert record["base_fingerprint"].startswith("sampled1:")
    other = build_tiny_model(tmp_path / "other", "bert", seed=1)
    with pytest.raises(ValueError, match="refusing to merge"):
        merge_task_vectors(tvs[:1], "task_arithmetic", tmp_path / "wrong", base=str(other), progress=False)
    assert not (tmp_path / "wrong").exists()
