"""Task datamodules on ``datasets``: text (``text.py``), multiple choice (``choice.py``), image (``image.py``), the
offline demo tasks (``demo.py``), on the base datamodule (``common.py``) and its checks, sources and sampling.
"""
