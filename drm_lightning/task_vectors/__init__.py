"""Task vectors: the weight fingerprint, adding a task vector onto a backbone.

The on-disk format (the contract: ``write_task_vector``, ``read_meta``, ``read_head``, ``TaskVectorMeta``) is
``drm_lightning.io.task_vector``.

- ``fingerprint``: ``fingerprint(module)``, ``fingerprint_state(state)`` (``meta.json``'s ``base_fingerprint``)
- ``apply``: ``apply_task_vector(backbone, folder, lam)``

The extraction callback that writes them is ``drm_lightning.callbacks.task_vector.TaskVectorCallback`` (it needs the
expert module, a layer above). Reading a task vector never imports Lightning.
"""
