"""A parameter that cannot fit the merge device is merged on the CPU, with one warning naming it; the merge goes on.

No GPU here, so the device is simulated: ``placement.device_free_bytes`` reports a device too small for the
up-front estimate, or the method raises ``torch.cuda.OutOfMemoryError`` the way a device step would, while
``placement.prepare_deltas`` keeps the "device" tensors on the CPU. The merged deltas must equal a plain CPU merge.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from drm_lightning.merging.engine import placement
from drm_lightning.merging.engine.merger import merge_parameters
from drm_lightning.merging.engine.setup import prepare_merge
from drm_lightning.merging.ops.lowrank import LowRankDelta
from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tvs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("placement")
    return write_task_vectors(build_tiny_model(root / "bert", "bert"), root / "tvs", 3, kind="dense")


def _merge(tvs: list[Path], method: str, device: torch.device, fn=None) -> dict[str, torch.Tensor]:
    setup = prepare_merge(tvs, method, device="cpu")
    merge_method = setup.method if fn is None else dataclasses.replace(setup.method, fn=fn)
    return dict(merge_parameters(setup.entries, setup.readers, merge_method, setup.params, device=device))


@pytest.fixture
def cpu_backed_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A roomy device whose tensors stay on the CPU, so the device path runs without a GPU."""
    monkeypatch.setattr(placement, "device_free_bytes", lambda device: 1 << 50)
    prepare = placement.prepare_deltas
    monkeypatch.setattr(placement, "prepare_deltas", lambda raw, shape, rule, device: prepare(raw, shape, rule, "cpu"))


@pytest.mark.parametrize("method", ["ties", "drm_v"])
def test_up_front_estimate_sends_big_parameters_to_the_cpu(
    tvs: list[Path], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _merge(tvs, method, torch.device("cpu"))
    setup = prepare_merge(tvs, method, device="cpu")
    need = {e.name: placement.estimate_working_bytes(method, [None] * 3, e.shape, e.rule) for e in setup.entries}
    need = {name: bytes_ for name, bytes_ in need.items() if name in expected}
    free = sorted(need.values())[len(need) // 2] / placement.HEADROOM  # holds the smaller half of the parameters
    monkeypatch.setattr(placement, "device_free_bytes", lambda device: free)
    on_device: list[tuple[int, ...]] = []
    prepare = placement.prepare_deltas

    def record(raw, shape, rule, device):
        if torch.device(device).type == "cuda":
            on_device.append(shape)
        return prepare(raw, shape, rule, "cpu")

    monkeypatch.setattr(placement, "prepare_deltas", record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _merge(tvs, method, CUDA)
    named = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, placement.DeviceFallbackWarning)]
    too_big = sorted(name for name, bytes_ in need.items() if bytes_ > placement.HEADROOM * free)
    assert too_big and sorted(named) == too_big  # one warning per parameter sent to the CPU, naming it
    assert len(on_device) == len(expected) - len(too_big)  # the others ran on the "device", none tried twice
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_out_of_memory_on_the_device_retries_on_the_cpu(tvs: list[Path], cpu_backed_device: None) -> None:
    expected = _merge(tvs, "ties", torch.device("cpu"))
    from drm_lightning.merging import functional as F

    calls: list[int] = []

    def flaky(deltas, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:  # the second parameter's first attempt, as a device step running out of memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return F.ties(deltas, **kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _merge(tvs, "ties", CUDA, fn=flaky)
    fallbacks = [w for w in caught if issubclass(w.category, placement.DeviceFallbackWarning)]
    second = list(expected)[1]
    assert len(fallbacks) == 1 and str(fallbacks[0].message).startswith(f"{second}: ran out of memory on cuda")
    assert len(calls) == len(expected) + 1  # one retry, and every other parameter once
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_other_errors_are_not_swallowed(tvs: list[Path], cpu_backed_device: None) -> None:
    def broken(deltas, **kwargs):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        _merge(tvs, "ties", CUDA, fn=broken)


def test_estimate_and_free_bytes() -> None:
    assert placement.device_free_bytes(torch.device("cpu")) is None
    dense = [torch.zeros(10, 20)] * 5
    assert placement.estimate_working_bytes("ties", dense, (10, 20), "matrix") == 5 * 5 * 200 * 4
    assert placement.estimate_working_bytes("drm_v", dense, (10, 20), "matrix") == 5 * 5 * 200 * 4
    # a wide DRM-V stack (T·n = 2560 rows, m = 1792): the 1792-sided Gram's eigh, 8·1792/2560 + 2/5 = 6 inputs
    assert placement.drm_factor((512, 1792), 5, horizontal=False) == pytest.approx(6.0)
    assert placement.drm_factor((1792, 512), 5, horizontal=True) == pytest.approx(6.0)
    assert placement.drm_factor((1792, 512), 5, horizontal=False) == placement.DEFAULT_FACTOR
    assert placement.estimate_working_bytes("drm_v", dense, (10, 20), "elementwise") == 5 * 5 * 200 * 4
    lora = [LowRankDelta(torch.zeros(10, 2), torch.zeros(2, 20), 1.0)] * 5
    assert placement.estimate_working_bytes("drm_v", lora, (10, 20), "matrix") == 8 * (4 * 5 * 2 * 30 + 3 * 200)
