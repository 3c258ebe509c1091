"""The run report: ``report.json`` (every number) and ``report.md`` (the tables a person reads).

Why a pure function of an ``EvaluationResults``: the numbers come from long runs, the formatting does not, so
the formatting is tested on synthetic results and the same report can be rebuilt from a saved ``report.json``
(``EvaluationResults.from_dict(json.load(f)["results"])``). Output is deterministic: fixed decimals, sorted JSON
keys, tasks and methods in the order given.

The markdown has four parts: per-task accuracy (pretrained backbone under the expert head, the expert, and for
each merged model its absolute and normalised value, merged ÷ expert), a per-method summary (λ, merge time,
averages), the λ search curves, and the plots when there are any.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from drm_lightning.evaluation.results import EvaluationResults
from drm_lightning.io.json_file import read_json_object

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_FORMAT_VERSION = 1
MISSING = "n/a"


def fmt_percent(value: float | None) -> str:
    """A fraction in [0, 1] as a percentage with two decimals; ``n/a`` when absent."""
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return "nan"
    return f"{100.0 * value:.2f}"


def fmt_lambda(value: float | None) -> str:
    """λ with up to four decimals and no trailing zeros (``0.3``, ``1``, ``0.1375``)."""
    if value is None:
        return MISSING
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def fmt_seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _table(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _escape(text: str) -> str:
    """Task and method names go into table cells: a ``|`` would split the cell."""
    return text.replace("|", "\\|")


def render_markdown(
    results: EvaluationResults,
    images: Sequence[str] = (),
    usage: Mapping[str, Any] | None = None,
    merges: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """The report as markdown; ``images`` are file names (relative to the report) to embed; ``merges`` (label ->
    the task vectors in that merge: ``task``, ``path``, ``fingerprint``, as ``merge.json`` lists them) gets a table;
    ``usage`` (the exported model: ``label``, ``folder``, ``lambda``, ``save_as``, ``task``, ``lines``) ends it with
    the Python that loads it."""
    r = results
    pct = f"{r.metric} (%)"
    lines = [
        "# drm_lightning merge report",
        "",
        f"Split: `{r.split}` · metric: `{r.metric}` · tasks: {len(r.tasks)} · merged models: {len(r.methods)}",
        "",
        f"## {pct} per task",
        "",
        "*norm.* = merged ÷ expert on the same task; *pretrained* = the pretrained backbone under the expert's head.",
        "",
    ]
    header = ["task", "pretrained", "expert"]
    for m in r.methods:
        header += [_escape(m.label), f"{_escape(m.label)} norm."]
    rows = []
    for task in r.tasks:
        row = [_escape(task), fmt_percent(r.value("pretrained", task)), fmt_percent(r.value("expert", task))]
        for m in r.methods:
            row += [fmt_percent(r.value(m.label, task)), fmt_percent(r.normalised(m.label, task))]
        rows.append(row)
    avg = ["**average**", fmt_percent(r.average("pretrained")), fmt_percent(r.average("expert"))]
    for m in r.methods:
        avg += [fmt_percent(r.average(m.label)), fmt_percent(r.average(m.label, normalised=True))]
    rows.append(avg)
    lines += _table(header, [":---"] + ["---:"] * (len(header) - 1), rows)

    if r.methods:
        lines += ["", "## Merged models", ""]
        rows = []
        for m in r.methods:
            params = json.dumps(m.params, sort_keys=True, separators=(", ", ": ")) if m.params else ""
            rows.append(
                [
                    _escape(m.label),
                    _escape(m.method or m.label),
                    _escape(params),
                    fmt_lambda(m.lam),
                    str(m.evaluations),
                    fmt_seconds(m.merge_seconds),
                    fmt_percent(r.average(m.label)),
                    fmt_percent(r.average(m.label, normalised=True)),
                ]
            )
        header = ["model", "method", "params", "λ", "λ evaluations", "merge time (s)", f"avg {pct}", "avg norm. (%)"]
        lines += _table(header, [":---", ":---", ":---"] + ["---:"] * 5, rows)

    searched = [m for m in r.methods if m.curve]
    if searched:
        lines += [
            "",
            f"## λ search: average normalised {r.metric} (%)",
            "",
            "Scores on the validation split; **bold** marks each model's chosen λ.",
            "",
        ]
        grid = sorted({p.lam for m in searched for p in m.curve})
        rows = []
        for lam in grid:
            row = [fmt_lambda(lam)]
            for m in searched:
                scores = [p.score for p in m.curve if p.lam == lam]
                cell = fmt_percent(scores[0]) if scores else ""
                if scores and m.lam is not None and m.lam == lam:
                    cell = f"**{cell}**"
                row.append(cell)
            rows.append(row)
        lines += _table(["λ"] + [_escape(m.label) for m in searched], ["---:"] * (len(searched) + 1), rows)

    swept = [m for m in r.methods if m.variants]
    for m in swept:
        lines += _landscape(m, r.metric)
    learned = [m for m in r.methods if m.learned]
    if learned:
        lines += _learned(learned)
    noted = [m for m in r.methods if m.notes]
    if noted:
        lines += ["", "## Grid extensions", "", "A best value at the edge of its grid extended the grid (bounded):", ""]
        lines += [f"- {_escape(m.label)}: {_escape(note)}" for m in noted for note in m.notes]

    if merges:
        lines += ["", "## Task vectors in each merge", ""]
        rows = [[_escape(label), _escape(str(i["task"])), f"`{i.get('fingerprint') or MISSING}`", f"`{i['path']}`"]
                for label, inputs in merges.items() for i in inputs]  # fmt: skip
        lines += _table(["merged model", "task", "fingerprint", "task vector"], [":---"] * 4, rows)
    if images:
        lines += ["", "## Plots", ""]
        for image in images:
            name = Path(image).name
            lines.append(f"![{Path(name).stem}]({name})")
    if usage:
        lines += [
            "",
            "## Use the merged model",
            "",
            f"`{usage['folder']}`: {_escape(str(usage['label']))} at λ = {fmt_lambda(usage['lambda'])} (best on "
            f"validation), a {'PEFT LoRA adapter' if usage['save_as'] == 'adapter' else 'save_pretrained model'}. "
            f"Plain Python that loads it and classifies one `{usage['task']}` example:",
            "",
            "```python",
            *usage["lines"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def _landscape(m: Any, metric: str) -> list[str]:
    """The table of a search over a method's own parameters: one row per parameter set, one column per λ."""
    grid = sorted({p.lam for v in m.variants for p in v.curve})
    lines = [
        "",
        f"## Parameter search: {_escape(m.label)} ({m.evaluations} evaluations)",
        "",
        f"Average normalised {metric} (%) on the validation split per parameter set and λ; **bold**: the chosen pair.",
        "",
    ]
    rows = []
    for v in m.variants:
        row = [_escape(v.name)]
        chosen = v is m.chosen()
        for lam in grid:
            scores = [p.score for p in v.curve if p.lam == lam]
            cell = fmt_percent(scores[0]) if scores else ""
            row.append(f"**{cell}**" if chosen and scores and lam == v.lam else cell)
        row += [fmt_lambda(v.lam), fmt_percent(v.score), str(len(v.curve))]
        rows.append(row)
    header = ["params"] + [f"λ={fmt_lambda(x)}" for x in grid] + ["best λ", "best (%)", "evaluations"]
    return lines + _table(header, [":---"] + ["---:"] * (len(header) - 1), rows)


def _learned(methods: Sequence[Any]) -> list[str]:
    """The table of the models whose coefficients were learned on top of their chosen λ: what, on which data."""
    lines = [
        "",
        "## Learned coefficients",
        "",
        "Coefficients learned with Adam from the chosen λ (docs/methods.md, *Learned coefficients*); the numbers above "
        "are the learned model's. *data* says what the objective read; validation scores are average normalised "
        "(%), before and after learning.",
        "",
    ]
    rows = []
    for m in methods:
        info = m.learned
        spread = " / ".join(f"{info.get(k, math.nan):.3f}" for k in ("min", "mean", "max"))
        rows.append(
            [
                _escape(m.label),
                _escape(m.method or m.label),
                f"{info.get('form')} × {info.get('granularity')} ({info.get('groups')} groups)",
                _escape(str(info.get("data"))),
                f"{info.get('steps')} steps, lr {info.get('lr')}",
                fmt_lambda(info.get("init")),
                spread,
                f"{fmt_percent(info.get('validation_score_before'))} → {fmt_percent(info.get('validation_score'))}",
                f"`{Path(str(info.get('folder'))).as_posix()}`",
            ]
        )
    header = ["model", "method", "coefficients", "data", "fit", "from λ", "min / mean / max", "validation",
              "folder (coefficients.json, coefficients.png)"]  # fmt: skip
    return lines + _table(header, [":---"] * 5 + ["---:"] * 3 + [":---"], rows)


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: they become ``null`` (``EvaluationResults.from_dict`` reads them back as NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def report_dict(
    results: EvaluationResults,
    usage: Mapping[str, Any] | None = None,
    merges: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``report.json``'s content: the results themselves plus the derived numbers the tables show (the task vectors
    in each merge and the exported model, when given)."""
    r = results
    summary: dict[str, Any] = {
        "pretrained": {"average": r.average("pretrained")},
        "expert": {"average": r.average("expert")},
        "methods": {},
    }
    for m in r.methods:
        summary["methods"][m.label] = {
            "lambda": m.lam,
            "evaluations": m.evaluations,
            "merge_seconds": m.merge_seconds,
            "average": r.average(m.label),
            "average_normalised": r.average(m.label, normalised=True),
            "normalised": {t: r.normalised(m.label, t) for t in r.tasks},
        }
    data = {"format_version": REPORT_FORMAT_VERSION, "results": r.to_dict(), "summary": summary}
    if merges:
        data["merges"] = {label: [dict(i) for i in inputs] for label, inputs in merges.items()}
    if usage:
        data["exported"] = dict(usage)
    return _jsonable(data)


def write_report(
    results: EvaluationResults,
    folder: str | os.PathLike[str],
    images: Sequence[str] = (),
    usage: Mapping[str, Any] | None = None,
    merges: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """Write ``report.json`` and ``report.md`` into ``folder`` (global rank 0 only) and return the markdown.

    Every rank gets the markdown back, so a caller may print it anywhere; only rank 0 touches the disk.
    """
    markdown = render_markdown(results, images, usage, merges)
    data = report_dict(results, usage, merges)
    _write_files(Path(folder), json.dumps(data, indent=2, sort_keys=True) + "\n", markdown)
    return markdown


@rank_zero_only
def _write_files(folder: Path, report_json: str, markdown: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: a reader (or a crash) never sees half a report.
    for name, text in ((REPORT_JSON, report_json), (REPORT_MD, markdown)):
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)


def read_report(folder: str | os.PathLike[str]) -> EvaluationResults:
    """Load the results back from ``<folder>/report.json`` (e.g. to redraw plots or rebuild the markdown)."""
    path = Path(folder) / REPORT_JSON
    data = read_json_object(path)
    if "results" not in data:
        raise ValueError(f"{path}: no 'results' section")
    return EvaluationResults.from_dict(data["results"])


def build_report(
    results: EvaluationResults,
    folder: str | os.PathLike[str],
    task_vectors: Sequence[str | os.PathLike[str]] = (),
    merged: Mapping[str, str | os.PathLike[str]] | None = None,
    plots: bool = True,
    usage: Mapping[str, Any] | None = None,
    merges: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """Plots (when asked and matplotlib is there) then ``report.json``/``report.md`` embedding them; the markdown.

    Args:
        results: the numbers.
        folder: the run folder the files go to.
        task_vectors: task vector folders, for the singular value spectra.
        merged: method label -> merged folder, for the singular value spectra.
        plots: draw the figures at all.
        usage: the exported model (``render_markdown``), or ``None``.
        merges: label -> the task vectors in that merge (``render_markdown``), or ``None``.
    """
    images: list[str] = []
    if plots:
        from drm_lightning.evaluation.plots import write_plots

        images = [p.name for p in write_plots(results, folder, task_vectors, merged)]
    return write_report(results, folder, images, usage, merges)
