"""The merge methods, one module per family: the executable form of ``docs/methods.md``.

``basic`` (Task Arithmetic, task mean, TIES, DARE and the elementwise steps), ``drm`` (DRM-V/H), ``iso`` (Iso-C,
Iso-CTS), ``tsv`` (TSV-M), ``drm_iso`` (this project's DRM-Iso); ``checks`` validates parameter values and
``inputs`` the deltas, for all of them. Each family module ends with its ``METHODS`` tuple of registry entries
(``spec.MergeMethod``), which ``registry`` collects from every other module here: a new method is one new file
(docs/methods.md, "Adding a method"). Call them through ``drm_lightning.merging.functional`` (every
function in one namespace) or by name through the registry.
"""
