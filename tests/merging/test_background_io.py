"""Reads ahead and writes behind (``io.background``): the same merged bytes as the sequential path, bounded memory,
and the errors of the threads raised in the caller.

The sequential path is ``DRM_LIGHTNING_PREFETCH=0`` and ``DRM_LIGHTNING_ASYNC_WRITE=0``: every read and write in the
merging thread, as before the threads existed.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path

import pytest

from drm_lightning.export.model_folder import merge_to_model
from drm_lightning.io import shards
from drm_lightning.io.background import (
    ASYNC_WRITE_ENV,
    PREFETCH_ENV,
    Worker,
    async_write,
    prefetch_depth,
    prefetched,
)
from drm_lightning.io.merged_delta import MERGED_DIR, delta_writer
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.methods.registry import METHODS

#: (DRM_LIGHTNING_PREFETCH, DRM_LIGHTNING_ASYNC_WRITE) of the threaded paths compared with the sequential one.
THREADED = [("1", "1"), ("2", "1")]
SEQUENTIAL = ("0", "0")


@pytest.fixture(scope="module")
def stats_tvs(dense_tvs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``dense_tvs`` with random input statistics (the methods that need them: RegMean)."""
    from tests.helpers.merge_inputs import with_random_statistics

    return with_random_statistics(dense_tvs, tmp_path_factory.mktemp("stats"))


def _hashes(folder: Path, suffix: str = ".safetensors") -> dict[str, str]:
    """sha256 of every shard (and shard index) under ``folder``."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and (p.suffix == suffix or p.name.endswith(".json"))]
    files = [p for p in files if p.name != "merge.json"]  # timings differ from run to run
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _merge_both(tvs: list[Path], method: str, out: Path) -> dict[str, dict[str, str]]:
    """The kept Δ (``--keep_delta``: merged_delta shards of 4 kB, so many shards go through the writer thread) and
    the model folder at a fixed λ (no Δ: ``merge_to_model``), as file hashes."""
    params = {"seed": 3} if method == "dare" else {}
    merge_task_vectors(tvs, method, out / "delta", params, progress=False, max_shard_bytes=4000)
    merge_to_model(tvs, method, out / "model", 0.7, params, progress=False)
    return {"delta": _hashes(out / "delta" / MERGED_DIR), "model": _hashes(out / "model")}


# RegMean++ merges with the tasks' data (tests/evaluation/test_block_merge.py runs it through the same threads)
@pytest.mark.parametrize("method", sorted(name for name, m in METHODS.items() if not m.block_by_block))
def test_threaded_io_writes_the_bytes_of_the_sequential_path(
    method: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tvs = request.getfixturevalue("stats_tvs" if METHODS[method].needs_statistics else "dense_tvs")
    runs = {}
    for prefetch, write in [SEQUENTIAL, *THREADED]:
        monkeypatch.setenv(PREFETCH_ENV, prefetch)
        monkeypatch.setenv(ASYNC_WRITE_ENV, write)
        runs[prefetch, write] = _merge_both(tvs, method, tmp_path / f"p{prefetch}w{write}")
    sequential = runs.pop(SEQUENTIAL)
    assert len(sequential["delta"]) > 3  # several shards and the index
    for setting, hashes in runs.items():
        assert hashes == sequential, f"{method}: prefetch/async write {setting} wrote other bytes"


# ---------------------------------------------------------------------------------------------- the threads


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prefetched_keeps_order_and_at_most_depth_plus_one_values(depth: int) -> None:
    alive, most, lock = [0], [0], threading.Lock()

    class Value:
        def __init__(self) -> None:
            with lock:
                alive[0] += 1
                most[0] = max(most[0], alive[0])

        def __del__(self) -> None:
            with lock:
                alive[0] -= 1

    def load(i: int) -> tuple[int, Value]:
        return i, Value()

    seen = []
    for item, (i, value) in prefetched(list(range(12)), load, depth):
        time.sleep(0.005)  # the reader gets ahead as far as it may
        seen.append((item, i))
        del value
    assert seen == [(i, i) for i in range(12)]
    assert most[0] == depth + 1 if depth else most[0] == 1


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prefetched_raises_a_failed_read_at_its_item(depth: int) -> None:
    error = ValueError("task_vector.safetensors: key 'w' has 1 non-finite value(s) (NaN or Inf)")

    def load(i: int) -> int:
        if i == 3:
            raise error
        return i

    got = []
    with pytest.raises(ValueError) as info:
        for item, _ in prefetched(list(range(6)), load, depth):
            got.append(item)
    assert info.value is error and got == [0, 1, 2]


def test_prefetched_closed_early_stops_its_thread() -> None:
    before = threading.active_count()
    stream = prefetched(list(range(100)), lambda i: i, 2)
    assert next(stream) == (0, 0)
    stream.close()
    assert threading.active_count() == before


def test_worker_raises_a_failed_job_at_the_next_submit_and_skips_the_rest() -> None:
    ran, error = [], OSError(28, "No space left on device")
    worker = Worker("test")

    def fail() -> None:
        raise error

    worker.submit(fail)
    with pytest.raises(OSError) as info:
        worker.submit(lambda: ran.append(1))
    assert info.value is error and ran == []
    worker.finish()


def test_background_shard_writer_failure_is_raised_at_close_and_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = OSError(28, "No space left on device")
    calls = [0]
    save = shards.save_file

    def full_disk(tensors: dict, path: str, metadata: dict) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise error
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", full_disk)
    import torch

    before = threading.active_count()
    writer = delta_writer(tmp_path, max_shard_bytes=64, background=True)
    with pytest.raises(OSError) as info:
        for i in range(3):
            writer.add(f"w{i}", torch.zeros(16))  # one shard each
        writer.close()
    writer.abort()
    assert info.value is error and threading.active_count() == before


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [(PREFETCH_ENV, "3", "expected 0 (off), 1 or 2"), (PREFETCH_ENV, "x", PREFETCH_ENV),
     (ASYNC_WRITE_ENV, "maybe", ASYNC_WRITE_ENV)],
)  # fmt: skip
def test_a_bad_setting_is_one_line_naming_the_variable(
    env: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=re.escape(says)):
        prefetch_depth() if env == PREFETCH_ENV else async_write()
