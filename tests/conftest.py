"""Shared fixtures. Tests never reach the network: the hub is forced offline here."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above, which transformers reads at import)

# Tiny models and small SVDs gain nothing from intra-op threads, and on a loaded 2-core machine two threads made
# LAPACK calls up to 50x slower. Tests that train a real model may raise this for themselves.
torch.set_num_threads(int(os.environ.get("DRM_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny saved model per backbone family, plus ``encoder_other`` (an encoder of another seed, so of another
    fingerprint). Module-scoped: each test module builds its own folders, so none sees another's files."""
    from tiny_models import make_tiny_model  # lazy: collecting a module that needs no model stays light

    from drm_lightning.models.backbone import FAMILIES

    root = tmp_path_factory.mktemp("tiny")
    paths = {family: make_tiny_model(family, root / family) for family in FAMILIES}
    paths["encoder_other"] = make_tiny_model("encoder", root / "encoder_other", seed=1)
    return paths


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
