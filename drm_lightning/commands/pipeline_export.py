"""The pipeline's last stage: the merged model a user can load, and the report lines that load it.

Which models: ``export="best"`` (the default) writes the method whose chosen λ scored best on the **validation**
splits (the λ search's average normalised metric at that λ; the test numbers never choose), ``"all"`` every method,
``"none"`` nothing. Each goes to ``<run_dir>/models/<label>/`` at its chosen λ, in the form ``merge`` writes:
``save_as="model"`` a complete folder of the base's own architecture, ``save_as="adapter"`` a PEFT LoRA adapter
where every expert is LoRA and the method has an exact low-rank result (the others fall back to a model folder,
which the log says), with a model card (``README.md``) that holds the method's test results beside the experts'.
The report then ends with the lines of plain ``transformers`` / ``peft`` Python that load
the best one and classify one example of the first task (``drm_lightning.export.snippet``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from drm_lightning.evaluation.results import EvaluationResults

Export = Literal["best", "all", "none"]
EXPORTS = ("best", "all", "none")


def validation_score(results: EvaluationResults, label: str) -> float | None:
    """The λ search's score (average normalised validation metric) at the λ ``label`` chose; ``None`` without one."""
    m = results.method(label)
    if m.learned and m.learned.get("validation_score") is not None:
        return float(m.learned["validation_score"])  # the learned model's, at its own coefficients
    chosen = m.chosen()
    if chosen is not None and chosen.score is not None and math.isfinite(chosen.score):
        return chosen.score  # a searched method: its chosen parameter set's score at its λ
    scores = [p.score for p in m.curve if m.lam is not None and p.lam == m.lam and math.isfinite(p.score)]
    if scores:
        return scores[0]
    if results.split == "validation":
        return results.average(label, normalised=True)
    return None


def best_on_validation(results: EvaluationResults) -> tuple[str, float | None]:
    """``(label, score)`` of the best method on validation (the first in recipe order on a tie); a recipe whose λ are
    all fixed has no validation scores here, and then the first method is taken (score ``None``)."""
    if not results.methods:
        raise ValueError("best_on_validation: no merged models")
    scored = [(m.label, validation_score(results, m.label)) for m in results.methods]
    known = [(label, score) for label, score in scored if score is not None]
    if not known:
        return results.methods[0].label, None
    return max(known, key=lambda item: item[1])  # max keeps the first of equal scores


def example_text(datamodule: Any, split: str) -> tuple[str, str | None]:
    """The first example of a text task's ``split`` as the model reads it: ``(text, pair)`` (the prompt filled in for
    label-word tasks). Other datamodules (images) give a placeholder sentence."""
    hp = dict(getattr(datamodule, "hparams", {}) or {})
    try:
        row = datamodule.split(split)[0]
        if hp.get("prompt"):
            return str(hp["prompt"]).format_map(row), None
        pair = hp.get("text_pair_column")
        return str(row[hp.get("text_column", "text")]), (str(row[pair]) if pair else None)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "an example to classify", None


def adapter_possible(method: str, task_vectors: Sequence[str | Path]) -> bool:
    """Whether ``save_as="adapter"`` can be exact for this method and these experts."""
    from drm_lightning.export.adapter import exact_adapter
    from drm_lightning.io.task_vector import read_meta

    return exact_adapter(method) and all(read_meta(tv).kind == "lora" for tv in task_vectors)


def export_model(
    merged: Path, lam: float, output: Path, method: str, task_vectors: Sequence[str | Path], save_as: str
) -> str:
    """Write one merged model at ``lam``; return the form written (``model`` or ``adapter``). A folder already
    written from the same merged delta at the same λ, newer than it, is kept."""
    from drm_lightning.export.model_folder import save_merged_model
    from drm_lightning.merging.engine.record import MERGE_FILE

    form = "adapter" if save_as == "adapter" and adapter_possible(method, task_vectors) else "model"
    record_path = output / MERGE_FILE
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = {}
        same = record.get("merged_delta") == str(merged.resolve()) and record.get("lam") == lam
        newer = record_path.stat().st_mtime >= (merged / MERGE_FILE).stat().st_mtime
        if same and newer and record.get("save_as") == form:
            return form
    if form == "adapter":
        from drm_lightning.export.adapter import adapter_from_merged

        adapter_from_merged(merged, lam, output)
    else:
        from drm_lightning.export.task_folders import export_task_models

        save_merged_model(merged, lam, output)
        export_task_models(output)  # tasks/<task>/ for experts imported from *ForSequenceClassification checkpoints
    return form


def usage(
    folder: Path, label: str, lam: float, form: str, score: float | None, task: str, datamodule: Any, split: str
) -> dict[str, Any]:
    """What the report says about the exported model: where, which, and the lines that load it (``usage_lines``)."""
    from drm_lightning.export.snippet import usage_lines

    text, pair = example_text(datamodule, split)
    return {
        "label": label,
        "folder": str(folder),
        "lambda": lam,
        "save_as": form,
        "validation_score": score,
        "task": task,
        "example": [text] if pair is None else [text, pair],
        "lines": usage_lines(folder, task, text, pair),
    }


def export_models(
    results: EvaluationResults,
    merged_dirs: Mapping[str, Path],
    methods: Mapping[str, str],
    task_vectors: Sequence[str | Path],
    models_dir: Path,
    datamodules: Mapping[str, Any],
    *,
    export: str = "best",
    save_as: str = "model",
    log: Any = print,
) -> dict[str, Any] | None:
    """Write the models ``export`` asks for; return the report's ``usage`` of the best one (``None``: nothing)."""
    from drm_lightning.export.model_card import write_model_card

    if export not in EXPORTS:
        raise ValueError(f"export={export!r}: expected one of {EXPORTS}")
    if export == "none" or not results.methods:
        return None
    best, score = best_on_validation(results)
    labels = [m.label for m in results.methods] if export == "all" else [best]
    if score is None:
        log(f"no validation score (every λ was given): exporting the first method, {best}")
    forms: dict[str, str] = {}
    # a learned model's folder holds W_0 + 1·Δ_learned: its coefficients are in the delta, λ = 1
    lams = {m.label: 1.0 if m.lam is None or m.learned else float(m.lam) for m in results.methods}
    for label in labels:
        out = models_dir / label
        forms[label] = export_model(merged_dirs[label], lams[label], out, methods[label], task_vectors, save_as)
        write_model_card(
            out, results=results.method(label).metrics, experts=results.expert, split=results.split,
            source="drm-lightning pipeline, λ chosen on validation",
        )  # fmt: skip
        note = "" if forms[label] == save_as else f" (save_as={save_as} is not exact for {methods[label]}: model)"
        log(f"{label}: merged model at λ={lams[label]:g} -> {out} ({forms[label]}){note}")
    task = results.tasks[0]
    return usage(models_dir / best, best, lams[best], forms[best], score, task, datamodules.get(task), "test")
