"""Models out: merged weights in forms that load without drm_lightning (``docs/interop.md``).

- ``model_folder.save_merged_model``: a complete ``save_pretrained`` folder of the base's own architecture
  (``--save_as model``); ``task_folders.export_task_models``: per-task ``AutoModelForSequenceClassification``
  folders of it, for experts imported from classifier checkpoints; ``folder_writer.write_folder`` writes both.
- ``adapter.merge_to_adapter`` / ``adapter.adapter_from_merged``: LoRA experts merged into a PEFT LoRA adapter
  (``--save_as adapter``).
- ``factor.factor_delta``: a merged delta as exact low-rank factors through the experts' joint LoRA spans.
- ``task_model.load_task_model``: a merged folder plus a task name -> backbone + pooling + head, one ``nn.Module``.
- ``model_card``: the ``README.md`` model card of every merged folder; ``snippet``: the report's loading snippet.
"""
