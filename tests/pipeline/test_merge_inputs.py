"""Every merged model says which task vectors it holds: ``merge.json`` lists each input's folder and fingerprint,
the report shows them per merge, and the pipeline refuses to report on a merge that lacks one of the recipe's tasks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from drm_lightning.commands.pipeline import merge_inputs
from drm_lightning.io.task_vector import DELTAS_FILE, META_FILE
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.record import read_merge_record
from drm_lightning.task_vectors.fingerprint import task_vector_fingerprint


@pytest.fixture(scope="module")
def merged(dense_tvs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge_inputs") / "ties"
    merge_task_vectors(dense_tvs[:2], "ties", out, progress=False)
    return out


def test_merge_record_lists_each_task_vector_with_its_fingerprint(merged: Path, dense_tvs: list[Path]) -> None:
    inputs = read_merge_record(merged)["inputs"]
    assert [(i["path"], i["fingerprint"]) for i in inputs] == [
        (str(p.resolve()), task_vector_fingerprint(p)) for p in dense_tvs[:2]
    ]
    assert len({i["fingerprint"] for i in inputs}) == 2  # two experts, two fingerprints


@pytest.mark.parametrize(
    ("file", "where"),
    [(META_FILE, 0), (DELTAS_FILE, 0), (DELTAS_FILE, -1), (DELTAS_FILE, "middle")],
    ids=["meta", "deltas-first-byte", "deltas-last-byte", "deltas-middle-block"],
)
def test_task_vector_fingerprint_follows_the_bytes(
    dense_tvs: list[Path], tmp_path: Path, file: str, where: int | str
) -> None:
    copy = Path(shutil.copytree(dense_tvs[0], tmp_path / "tv"))
    assert task_vector_fingerprint(copy) == task_vector_fingerprint(dense_tvs[0])
    data = bytearray((copy / file).read_bytes())
    # "middle": the first byte of the 128th sampled block when the file is sampled, else the middle byte
    index = where if isinstance(where, int) else (len(data) // 2 if len(data) <= 2 << 20 else None)
    if index is None:
        edge, blocks = 1 << 20, 256
        index = edge + 128 * ((len(data) - 2 * edge) // blocks)
    data[index] ^= 0xFF
    (copy / file).write_bytes(bytes(data))
    assert task_vector_fingerprint(copy) != task_vector_fingerprint(dense_tvs[0])


def test_pipeline_lists_the_inputs_of_each_merge(merged: Path) -> None:
    tasks = [i["task"] for i in read_merge_record(merged)["inputs"]]
    inputs = merge_inputs(tasks, {"TIES": merged})
    assert [i["task"] for i in inputs["TIES"]] == tasks
    assert all(i["fingerprint"].startswith("files1:") for i in inputs["TIES"])


def test_pipeline_refuses_a_report_on_a_merge_missing_a_task(merged: Path) -> None:
    tasks = [i["task"] for i in read_merge_record(merged)["inputs"]]
    with pytest.raises(ValueError, match=r"merge 'TIES' holds .* but not of \['lost_task'\]"):
        merge_inputs([*tasks, "lost_task"], {"TIES": merged})


def test_report_shows_the_task_vectors_of_each_merge(tmp_path: Path) -> None:
    from drm_lightning.evaluation.report import write_report
    from tests.helpers.results import make_results

    merges = {"TIES": [{"task": "a", "path": "/tv/a", "fingerprint": "files1:abc"},
                       {"task": "b", "path": "/tv/b", "fingerprint": "files1:def"}]}  # fmt: skip
    markdown = write_report(make_results(), tmp_path, merges=merges)
    assert "## Task vectors in each merge" in markdown
    assert "| TIES | a | `files1:abc` | `/tv/a` |" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["merges"] == merges
