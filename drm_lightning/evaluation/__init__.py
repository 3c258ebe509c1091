"""Evaluation: a backbone under every task's head, the λ search, the report.

- ``multitask.evaluate_backbone``: one (merged, pretrained or expert) backbone, every task's head and datamodule.
- ``lambda_search``: λ of ``W_0 + λ·Δ_merged`` chosen on validation data (``grid`` or ``refine``), default grids.
- ``merged.MergedBackbone``: a merged folder as a backbone at any λ without reloading the base.
- ``run.evaluate_merges``: experts, pretrained backbone and every merged model, as ``results.EvaluationResults``.
- ``report.build_report``: ``report.json``, ``report.md`` and the ``plots`` PNGs in a run folder.

Modules are imported on use: the report and plots need neither models nor Lightning's trainer.
"""
