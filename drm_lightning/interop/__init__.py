"""Experts from elsewhere in: ``transformers`` and PEFT folders -> task vectors (their classifier folders go back out
through ``export.task_folders``).

- ``inputs``: what a folder is (task vector, PEFT adapter, ``save_pretrained`` model) and converting it;
- ``full_model`` / ``peft_adapter``: the two importers (checks and plan from configs and headers);
- ``write``: the shared writer (base loaded once, deltas streamed through ``io.safetensors``'s streaming writer);
  ``checkpoint``: lazy safetensors shards; ``base``: the base's skeleton and compatibility rules;
  ``names``: checkpoint names <-> backbone names and heads.

Details and what is refused: ``docs/interop.md``.
"""
