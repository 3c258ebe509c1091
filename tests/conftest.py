"""Shared fixtures. Tests never reach the network: the hub is forced offline here."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The skeleton cache (interop/skeleton_cache.py) of this test process and the processes it starts: never the user's.
os.environ["DRM_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="drm-test-cache-")
atexit.register(shutil.rmtree, os.environ["DRM_LIGHTNING_CACHE"], ignore_errors=True)

import torch  # noqa: E402  (after the environment above, which transformers reads at import)

# Tiny models and small SVDs gain nothing from intra-op threads, and on a loaded 2-core machine two threads made
# LAPACK calls up to 50x slower. Tests that train a real model may raise this for themselves.
torch.set_num_threads(int(os.environ.get("DRM_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny saved model per backbone family, plus ``encoder_other`` (an encoder of another seed, so of another
    fingerprint). Module-scoped: each test module builds its own folders, so none sees another's files."""
    from drm_lightning.models.backbone import FAMILIES
    from tests.helpers.tiny_models import make_tiny_model  # lazy: collecting a module that needs no model stays light

    root = tmp_path_factory.mktemp("tiny")
    paths = {family: make_tiny_model(family, root / family) for family in FAMILIES}
    paths["encoder_other"] = make_tiny_model("encoder", root / "encoder_other", seed=1)
    return paths


#: Task vectors in each of ``dense_tvs`` and ``lora_tvs``.
MERGE_TASKS = 3


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny saved BERT with a tokenizer: the base of ``dense_tvs`` and ``lora_tvs`` (the merge tests' inputs)."""
    from tests.helpers.merge_inputs import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("merge_inputs") / "bert", "bert", tokenizer=True)


@pytest.fixture(scope="module")
def dense_tvs(bert: Path) -> list[Path]:
    """``MERGE_TASKS`` random dense task vectors of ``bert``."""
    from tests.helpers.merge_inputs import write_task_vectors

    return write_task_vectors(bert, bert.parent / "tv_dense", MERGE_TASKS, kind="dense")


@pytest.fixture(scope="module")
def lora_tvs(bert: Path) -> list[Path]:
    """``MERGE_TASKS`` random LoRA task vectors of ``bert`` (rank 2, alpha 4)."""
    from tests.helpers.merge_inputs import write_task_vectors

    return write_task_vectors(bert, bert.parent / "tv_lora", MERGE_TASKS, kind="lora", seed=10, rank=2, alpha=4.0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test whatever an earlier test left set (restored afterwards): on 2 shared cores
    intra-op threads only fight each other on models this small (``expert_marks.EXPERT_TEST_MARKS`` uses it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def all_threads():
    """Intra-op threads = the machine's cores (its share of them under xdist) for one test that trains a real model
    (restored afterwards): the real-MiniLM tests take about a quarter less time with both cores of CI than with the
    suite's one thread."""
    before = torch.get_num_threads()
    # under pytest-xdist the workers share the cores: each takes its part, never more threads than cores in all
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max((os.cpu_count() or 1) // workers, 1))
    yield
    torch.set_num_threads(before)
