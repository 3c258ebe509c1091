"""Every byte on disk: the safetensors format (``safetensors``), and the folder formats built on it.

Imports nothing of drm_lightning but itself, so every reader and writer above may use it (docs/architecture.md).
"""
