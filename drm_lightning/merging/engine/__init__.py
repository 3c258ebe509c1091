"""The streaming merge: the parameter ``plan``, validation and planning of the inputs (``setup``), the lazy
``reader`` of task vectors, device ``placement``, the ``merger`` loop and its parameter ``sweep``, the merge shared out
between ranks (``distributed``), ``merge.json`` and the heads (``record``), disk-space estimates (``space``) and
Δ_merged applied to a base in memory (``apply``). The merged-delta files themselves are ``drm_lightning.io``'s."""
