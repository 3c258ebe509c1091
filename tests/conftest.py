"""Shared fixtures. Tests never reach the network: the hub is forced offline here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above, which transformers reads at import)

# Tiny models and small SVDs gain nothing from intra-op threads, and on a loaded 2-core machine two threads made
# LAPACK calls up to 50x slower. Tests that train a real model may raise this for themselves.
torch.set_num_threads(int(os.environ.get("DRM_TEST_THREADS", "1")))
