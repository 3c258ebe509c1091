"""The front page of a merged folder: ``README.md``, a model card as the Hugging Face Hub reads it.

Why: a merged folder travels (to a colleague, to the Hub) without the command that made it, and ``merge.json`` is
for programs. The card says in prose and tables what it is: YAML front matter the Hub indexes (``base_model``,
``library_name``: ``transformers`` for a model folder, ``peft`` for an adapter; ``tags``: ``merge``,
``drm-lightning`` and the method), then the method with its parameters and λ, every expert it merged (task, kind,
labels, the base fingerprint its ``meta.json`` records, where it came from), the per-task results when a λ search or
the pipeline measured them, and the lines that load it. Everything comes from the folder itself (``merge.json`` and
``heads/<task>/meta.json``), so the card says nothing the folder does not record.

The writers (``model_folder.save_merged_model``, ``adapter.merge_to_adapter`` and ``adapter.adapter_from_merged``)
call ``write_model_card`` on their temporary folder before it is renamed into place, so the card appears with the
folder, atomically; the ``merge --lam search`` command and the pipeline call it again on the written folder with
the results they measured, replacing the card in one rename.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from drm_lightning.export.snippet import usage_lines
from drm_lightning.interop.peft_adapter import ADAPTER_CONFIG
from drm_lightning.io.task_vector import META_FILE, TaskVectorMeta, read_meta
from drm_lightning.merging.engine.record import HEADS_DIR, read_merge_record

CARD_FILE = "README.md"
TAGS = ("merge", "drm-lightning")
#: Metrics per task: ``{task: {metric: value}}`` (what ``LambdaPoint.metrics`` and the report hold).
TaskMetrics = Mapping[str, Mapping[str, float]]


def front_matter(record: Mapping[str, Any], adapter: bool) -> dict[str, Any]:
    """The card's YAML metadata: the base, the library that loads the folder, and the tags."""
    return {
        "base_model": str(record["base_model"]),
        "library_name": "peft" if adapter else "transformers",
        "tags": [*TAGS, str(record["method"])],
    }


def _paper(method: str) -> str:
    from drm_lightning.merging.methods.registry import get_method

    try:
        return get_method(method).reference
    except ValueError:  # a method this version does not register: the card still says its name
        return ""


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _experts(record: Mapping[str, Any], heads: Mapping[str, TaskVectorMeta]) -> list[str]:
    lines = ["| task | expert | labels | base fingerprint | from |", "|---|---|---|---|---|"]
    for item in record.get("inputs") or [{"task": task} for task in heads]:
        task = str(item.get("task"))
        meta = heads.get(task)
        kind = item.get("kind") or (meta.kind if meta else "")
        rank = item.get("lora_r") or (meta.lora.r if meta and meta.lora else None)
        expert = f"LoRA r = {rank}" if kind == "lora" else "full fine-tune" if kind == "dense" else kind
        labels = ", ".join(meta.label_names) if meta else ""
        fingerprint = item.get("base_fingerprint") or (meta.base_fingerprint if meta else "")
        source = (item.get("source") or {}).get("path") if isinstance(item.get("source"), Mapping) else None
        where = source or item.get("path") or ""
        row = [task, expert, labels, f"`{fingerprint}`" if fingerprint else "", f"`{where}`" if where else ""]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _results(results: TaskMetrics, experts: TaskMetrics | None, split: str, source: str) -> list[str]:
    lines = ["", "## Results", "", f"On the {split} split ({source}); the expert is each task's own fine-tuned model."]
    lines += ["", "| task | metric | merged | expert |", "|---|---|---:|---:|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            expert = (experts or {}).get(task, {}).get(metric)
            shown = "" if expert is None else f"{float(expert):.4f}"
            lines.append(f"| {_cell(task)} | {_cell(metric)} | {float(value):.4f} | {shown} |")
    return lines


def card_text(
    record: Mapping[str, Any],
    heads: Mapping[str, TaskVectorMeta],
    *,
    adapter: bool,
    name: str,
    results: TaskMetrics | None = None,
    experts: TaskMetrics | None = None,
    split: str = "validation",
    source: str = "λ search",
    usage: Sequence[str] = (),
) -> str:
    """The card of a merged folder from its ``merge.json`` record and its heads' metas.

    Args:
        record: the folder's ``merge.json``.
        heads: ``heads/<task>/meta.json`` of each task.
        adapter: whether the folder is a PEFT adapter (else a ``save_pretrained`` model folder).
        name: the folder's name or path as a reader will load it (in the title and the usage lines).
        results: per-task metrics of the merged model, when measured.
        experts: the same metrics of each task's expert, beside them.
        split, source: which split the results are on and what measured them.
        usage: the Python lines that load the folder (``export.snippet.usage_lines``).
    """
    method, label = str(record["method"]), str(record.get("label") or record["method"])
    inputs = record.get("inputs") or []
    tasks = [str(i.get("task")) for i in inputs] or sorted(heads)
    matter = yaml.safe_dump(front_matter(record, adapter), sort_keys=False, allow_unicode=True)
    form = "A PEFT LoRA adapter on" if adapter else "A merged model of"
    lines = [
        "---",
        matter.rstrip("\n"),
        "---",
        "",
        f"# {name}",
        "",
        f"{form} `{record['base_model']}`: {len(tasks)} experts ({', '.join(tasks)}) merged with {label}, without "
        "further training, by drm_lightning (`drm-lightning merge`).",
        "",
        "## Merge",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{method}` ({label}{', ' + _paper(method) if _paper(method) else ''}) |",
    ]
    params = record.get("params") or {}
    if params:
        shown = ", ".join(f"{k} = {_value(v)}" for k, v in sorted(params.items()))
        lines.append(f"| parameters | {_cell(shown)} |")
    if record.get("lam") is not None:
        lines.append(f"| λ | {_value(float(record['lam']))} (merged weights: W₀ + λ·Δ_merged) |")
    if record.get("coefficients"):
        lines.append(f"| task coefficients | {', '.join(_value(c) for c in record['coefficients'])} |")
    lines.append(f"| base model | `{record['base_model']}` ({record.get('family', '')}) |")
    lines.append(f"| base fingerprint | `{record['base_fingerprint']}` |")
    if record.get("architecture"):
        lines.append(f"| architecture | `{record['architecture']}` |")
    lines += ["", "## Experts", ""] + _experts(record, heads)
    if results:
        lines += _results(results, experts, split, source)
    if usage:
        lines += ["", "## Use it", "", "```python", *usage, "```"]
    lines += ["", "Every task's head is in `heads/<task>/`; `merge.json` records the merge in full.", ""]
    return "\n".join(lines)


def _recorded_expert_metrics(record: Mapping[str, Any], results: TaskMetrics) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the ``val/<task>/<metric>`` entries each expert's ``meta.json`` recorded."""
    found: dict[str, dict[str, float]] = {}
    for item in record.get("inputs") or []:
        task, recorded = str(item.get("task")), item.get("metrics") or {}
        for metric in results.get(task, {}):
            value = recorded.get(f"val/{task}/{metric}")
            if isinstance(value, int | float):
                found.setdefault(task, {})[metric] = float(value)
    return found


def read_heads(folder: str | os.PathLike[str]) -> dict[str, TaskVectorMeta]:
    """``heads/<task>/meta.json`` of a merged folder, by task (none: an empty mapping)."""
    root = Path(folder) / HEADS_DIR
    if not root.is_dir():
        return {}
    return {p.name: read_meta(p) for p in sorted(root.iterdir()) if (p / META_FILE).is_file()}


def write_model_card(
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    results: TaskMetrics | None = None,
    experts: TaskMetrics | None = None,
    split: str = "validation",
    source: str = "λ search",
) -> Path:
    """Write ``folder/README.md`` from the folder's own ``merge.json`` and heads; returns its path.

    ``name`` is how the card names the folder, in its title and its usage lines (default: the folder's name; a writer
    passes its output's name while it writes into a temporary sibling). Only the name, not the path: the card is
    the same wherever the folder is written (and a folder uploaded to the Hub keeps its name). The card is written
    to a temporary file and renamed over the old one.
    """
    folder = Path(folder)
    shown = str(name if name is not None else folder.name)
    record = read_merge_record(folder)
    heads = read_heads(folder)
    if experts is None and split == "validation":  # the experts' own validation metrics, as fit recorded them
        experts = _recorded_expert_metrics(record, results or {})
    usage: list[str] = []
    if heads:
        usage = usage_lines(folder, next(iter(heads)), "An example to classify.", name=shown)
    text = card_text(
        record, heads, adapter=(folder / ADAPTER_CONFIG).is_file(), name=shown, results=results, experts=experts,
        split=split, source=source, usage=usage,
    )  # fmt: skip
    path = folder / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
