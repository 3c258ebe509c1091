"""Model merging, by job: the math (``methods/``, one module per method family, and their ``registry``), the
tensor operations the methods share (``ops/``: ``linalg``, ``elementwise``, ``lowrank``), the streaming engine
(``engine/``: plan, setup, reader, placement, merger, sweep, distributed, record, space, apply), the façade
``functional`` (every method in one namespace) and the float64 oracle ``reference``. The merged-delta files are
``drm_lightning.io.merged_delta``; the merged model folder is ``drm_lightning.export.model_folder``.
"""
