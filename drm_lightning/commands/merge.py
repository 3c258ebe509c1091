"""``drm-lightning merge``: task vectors in, one merged model folder out.

::

    drm-lightning merge --config configs/merge/drm_v.yaml \\
        --task_vectors [task_vectors/rotten_tomatoes,task_vectors/fine_food] --output merged/drm_v --lam 1.2
    drm-lightning merge --config configs/merge/ties.yaml --task_vectors [...] --output merged/ties \\
        --lam search --tasks [configs/task/rotten_tomatoes.yaml,configs/task/fine_food.yaml]

At a fixed λ on one process the model folder is written straight from the merge
(``export.model_folder.merge_to_model``): each parameter's Δ_merged is added to the loaded base as soon as it is
merged, and no Δ folder is written. With
``--lam search`` (or a searched parameter) Δ_merged is computed once (``merge_task_vectors``) into a temporary
folder, λ is chosen on the tasks' validation splits, ``W_0 + λ·Δ_merged`` is written (``save_merged_model``) and the
temporary folder removed. ``--keep_delta`` (or ``--delta_dir``) keeps Δ_merged in ``<output>_delta`` instead, so a
later ``evaluate --model <output>_delta --lam <λ>`` can try another λ without merging again; the model folder is
the same, byte for byte, either way.

Under torchrun or srun the first step is shared by the ranks (``merge_task_vectors_distributed``, which is exactly
``merge_task_vectors`` on one process); the second writes one folder, so only global rank 0 runs it and the other
ranks return as soon as Δ_merged is complete. ``--lam search`` runs a one-device Trainer and is refused there. The
ranks share Δ_merged through ``<output>_delta`` (or ``--delta_dir``), which is kept.

Before any model is loaded, the room the folders need (Δ_merged in float32 where one is written, the model in the
base's dtype, the heads) is compared with the free space of their filesystems; a disk that clearly cannot hold them
is refused with one line naming the folders and the sizes. The base is loaded as the task vectors record it
(``torch_dtype``, ``gguf_file`` in their meta.json) unless ``--torch_dtype`` / ``--gguf_file`` say otherwise.

``--save_as model`` (the default) writes a complete folder of the base's own architecture (pooler, ``lm_head``, tied
weights, config, tokenizer: ``merging.model_folder``). ``--save_as adapter`` (every input LoRA) writes a PEFT
LoRA adapter of the merged delta's exact rank instead (``drm_lightning.export.adapter``); with a fixed λ on one
process it is merged straight into the adapter and no dense Δ_merged is written. Methods whose merge of LoRA experts
is full rank (TIES, DARE, WUDI's Adam: no ``lora_span`` in the registry) are refused there unless ``--max_rank K``
asks for an SVD truncation, whose relative error is printed per module. See docs/interop.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from drm_lightning.commands.tasks import TaskEntry, task_datamodules

#: What a λ search chose and measured, beside the merged folder it chose.
SEARCH_FILE = "lambda_search.json"


def merge(
    task_vectors: list[str] | None = None,
    output: str | None = None,
    method: str = "task_arithmetic",
    params: dict[str, Any] | None = None,
    lam: float | Literal["search"] = 1.0,
    lambdas: list[float] | None = None,
    strategy: Literal["grid", "refine"] = "grid",
    tasks: list[TaskEntry] | None = None,
    base: str | None = None,
    family: str | None = None,
    coefficients: list[float] | None = None,
    device: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    delta_dir: str | None = None,
    trainer: dict[str, Any] | None = None,
    torch_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
    gguf_file: str | None = None,
    save_as: Literal["model", "adapter"] = "model",
    max_rank: int | None = None,
    skip: list[str] | None = None,
    task_models: bool = True,
    extend_edges: int = 1,
    mergekit_config: str | None = None,
    keep_delta: bool = False,
) -> Path:
    """Merge task vectors into one model: ``W_0 + λ·Δ_merged`` as a save_pretrained folder with the task heads.

    Args:
        task_vectors: the experts, all of the same base model: task vector folders (written by fit or extract),
            fully fine-tuned save_pretrained folders and PEFT LoRA adapter folders, in any mix (the latter two are
            converted first, as extract would; give --base for fine-tuned models).
        output: the merged model folder (save_pretrained shards, tokenizer, heads/<task>/, merge.json).
        method: merge method: task_arithmetic, ties, dare, drm_v, drm_h, iso_c, iso_cts, tsv_m, regmean, wudi,
            wudi_closed, or regmean_plusplus (merged block by block on the training examples of --tasks).
        params: the method's parameters (e.g. {drop_rate: 0.8}); unset ones take the method's defaults. A list
            searches that parameter (e.g. {drop_rate: [0.5, 0.7, 0.9]}; needs --tasks): every set is merged in one
            pass into <delta_dir>/<values>/, each gets its λ (--lam search) or is scored at the given λ on the
            validation splits, and the best pair is written; lambda_search.json holds the landscape.
        lam: the scaling coefficient λ, or "search" to choose it on the validation splits of --tasks.
        lambdas: the λ grid for --lam search (default: the method's default grid).
        strategy: λ search strategy: grid (every λ) or refine (coarse grid, then golden-section).
        tasks: task datamodules for --lam search and for regmean_plusplus's Grams (configs/task/*.yaml paths or
            class_path mappings).
        base: the base model (default: the one the task vectors record); its weights must match their fingerprint.
        family: the backbone family (default: the one the task vectors record).
        coefficients: per-task coefficients c_i, one per task vector (default: all 1).
        device: where the merge math runs (default: cuda when available, else cpu).
        include: regexes: only matching 2-D parameters get the method's matrix rule (default: all).
        exclude: regexes: matching parameters get the elementwise rule (default: embeddings and heads).
        delta_dir: keep Δ_merged (float32) in this folder, for a later evaluate --model <delta_dir> --lam <λ>;
            by default a fixed λ writes the model straight from the merge with no delta folder, and a search keeps
            Δ_merged in a temporary folder removed at the end (under torchrun or srun: <output>_delta, kept).
        trainer: Trainer arguments for the λ search's validation runs (e.g. {accelerator: gpu, devices: 1}).
        torch_dtype: the dtype to load the base in (default: the one the task vectors record, else its own); the
            merged model is saved in it.
        gguf_file: a GGUF file inside the base folder to load it from (default: the one the task vectors record).
        save_as: model (a complete save_pretrained folder of the base's own architecture: pooler, lm_head, config,
            tokenizer) or adapter (every input LoRA: a PEFT LoRA adapter of the merged delta's exact rank, no dense
            delta written for a fixed λ; every method but ties, dare and wudi, docs/interop.md).
        max_rank: save_as=adapter: cut every module's rank to at most K by SVD and print the relative error per
            module (needed for ties, dare and wudi, whose merged delta is full rank).
        skip: regexes: parameters kept at the base's weights whatever the experts say (also left out when a model
            or adapter is converted, e.g. the embeddings of a model with added tokens).
        task_models: for experts imported from *ForSequenceClassification checkpoints, also write
            <output>/tasks/<task>/, the expert's own architecture with the merged backbone (loads with
            AutoModelForSequenceClassification).
        extend_edges: rounds of edge extension, as in pipeline: a best λ (--lam search) at the first or last
            point of its grid adds two λ beyond it, and a searched numeric parameter (a list in --params) whose
            best value is the first or last of its list adds the next value beyond it (merged and scored), at most
            this many rounds each; every round is said on stderr and in lambda_search.json's notes; 0: off.
        mergekit_config: a mergekit YAML (merge_method, base_model, models with weight/density, parameters, dtype)
            that gives task_vectors, method, params, coefficients, λ, base and torch_dtype instead of those
            arguments; merge_method takes mergekit's task_arithmetic, ties, dare_linear, dare_ties, linear or any
            method name above (docs/interop.md: where the two tools' definitions differ).
        keep_delta: keep Δ_merged in <output>_delta (or --delta_dir).

    Returns:
        The merged model folder.
    """
    from drm_lightning.interop.inputs import import_inputs, input_kind, record_sources
    from drm_lightning.merging.engine.setup import check_output
    from drm_lightning.world import detect_world, is_global_zero

    if mergekit_config is not None:
        task_vectors, method, params, coefficients, lam, base, torch_dtype = _from_mergekit(
            mergekit_config, task_vectors, method, params, coefficients, lam, base, torch_dtype
        )
    if output is None:
        raise ValueError("output: required (the merged model folder)")
    if not task_vectors:
        raise ValueError("task_vectors=[]: give at least one task vector folder")
    if save_as not in ("model", "adapter"):
        raise ValueError(f"save_as={save_as!r}: expected 'model' or 'adapter'")
    if max_rank is not None and save_as != "adapter":
        raise ValueError(f"max_rank={max_rank!r}: only for save_as=adapter")
    if save_as == "adapter":
        from drm_lightning.export.adapter import check_adapter_request

        kinds = {str(tv): input_kind(tv) for tv in task_vectors}
        full = [tv for tv, kind in kinds.items() if kind == "model"]
        if full:
            raise ValueError(
                f"save_as=adapter: {full[0]} is a fully fine-tuned model, not a LoRA adapter; use save_as=model"
            )
        check_adapter_request(method, [tv for tv, kind in kinds.items() if kind == "task_vector"], max_rank)
    from drm_lightning.merging.engine.sweep import ParamGrid

    search = lam == "search"
    if search and not tasks:
        raise ValueError("lam='search' needs --tasks: the datamodules whose validation splits choose λ")
    if isinstance(extend_edges, bool) or not isinstance(extend_edges, int) or extend_edges < 0:
        raise ValueError(f"extend_edges={extend_edges!r}: expected a number of rounds >= 0")
    grid = ParamGrid.parse(method, params)
    if grid.searched and not tasks:
        raise ValueError(f"params={params!r}: a list searches that parameter and needs --tasks (validation splits)")
    world = detect_world()
    block = _block_by_block(method, tasks, world)
    if grid.searched and world.world_size > 1:
        raise ValueError(f"params={params!r}: a parameter search validates on one device; run it as one process")
    if search and world.world_size > 1:
        raise ValueError(
            f"lam='search' under {world.source} ({world.world_size} processes): the λ search validates on one "
            "device; merge with a fixed --lam here, or run --lam search as one process"
        )
    delta = Path(delta_dir) if delta_dir is not None else Path(f"{output}_delta")
    check_output(Path(output), [delta, *map(Path, task_vectors)])  # before any conversion: cheap things first
    # Δ_merged on disk only where asked for or needed: the ranks of a distributed merge share it through a folder,
    # a search rescales it per λ (a temporary folder), and a fixed λ on one process needs none.
    keep = bool(keep_delta) or delta_dir is not None or world.world_size > 1
    straight = not search and not grid.searched and world.world_size == 1 and not block
    if world.world_size > 1:
        foreign = [str(tv) for tv in task_vectors if input_kind(tv) != "task_vector"]
        if foreign:
            raise ValueError(
                f"task_vectors: {foreign[0]} is not a task vector folder; under {world.source} convert it first "
                "(drm-lightning extract), then merge the task vectors"
            )
    # no search, one process, no block-by-block merge: the merger is the inputs' only reader, so a fine-tuned
    # model's deltas are taken as it reads them, not written to a temporary task vector first
    by_reference = straight
    imports = import_inputs(
        task_vectors, output, base=base, family=family, skip=list(skip or []), torch_dtype=torch_dtype,
        gguf_file=gguf_file, evaluates=bool(tasks), by_reference=by_reference,
    )  # fmt: skip
    with imports as folders, _delta_folder(Path(output), delta, temporary=not keep and not straight) as delta:
        out = _merge(
            folders, output, method, params, lam, lambdas, strategy, tasks, base, family, coefficients, device,
            include, exclude, delta, trainer, torch_dtype, gguf_file, skip, world, save_as, max_rank,
            extend_edges, keep,
        )  # fmt: skip
        if is_global_zero() and record_sources([out, delta], task_vectors, folders):
            _write_card(out)  # its experts table names the folders given, as merge.json now does
    if task_models and save_as == "model" and is_global_zero():
        from drm_lightning.export.task_folders import export_task_models

        export_task_models(out)
    return out


def _block_by_block(method: str, tasks: list[TaskEntry] | None, world: Any) -> bool:
    """Whether ``method`` merges block by block with the tasks' data (RegMean++), which needs ``--tasks`` and one
    process (one line otherwise)."""
    from drm_lightning.merging.engine.setup import block_by_block_message
    from drm_lightning.merging.methods.registry import get_method

    if not get_method(method).block_by_block:
        return False
    if not tasks:
        raise ValueError(block_by_block_message(method))
    if world.world_size > 1:
        raise ValueError(f"method={method!r} merges block by block on one process; run it without torchrun or srun")
    return True


def _from_mergekit(
    path: str,
    task_vectors: list[str] | None,
    method: str,
    params: dict[str, Any] | None,
    coefficients: list[float] | None,
    lam: float | Literal["search"],
    base: str | None,
    torch_dtype: str | None,
) -> tuple[list[str], str, dict[str, Any], list[float] | None, float | Literal["search"], str | None, str | None]:
    """``merge``'s arguments from a mergekit YAML; an argument also given on the command line is refused (the
    config is meant to be the whole merge), except ``--lam search`` over a config without ``lambda``."""
    from drm_lightning.commands.mergekit_config import read_mergekit_config
    from drm_lightning.merging.methods.registry import METHODS

    given = {"task_vectors": task_vectors, "params": params, "coefficients": coefficients, "base": base,
             "torch_dtype": torch_dtype}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if method != "task_arithmetic":
        given["method"] = method
    config = read_mergekit_config(path, frozenset(METHODS))
    if lam == "search":
        config_lam: float | Literal["search"] = "search"
    elif lam != 1.0:
        given["lam"] = lam
        config_lam = config.lam
    else:
        config_lam = config.lam
    if given:
        name = sorted(given)[0]
        raise ValueError(f"--{name} and --mergekit_config both given: the config says the whole merge; drop --{name}")
    for note in config.notes:
        print(f"mergekit config: {note}", file=sys.stderr)
    return (config.task_vectors, config.method, config.params, config.coefficients, config_lam, config.base,
            config.torch_dtype)  # fmt: skip


def _merge(
    task_vectors: list[str],
    output: str,
    method: str,
    params: dict[str, Any] | None,
    lam: float | Literal["search"],
    lambdas: list[float] | None,
    strategy: Literal["grid", "refine"],
    tasks: list[TaskEntry] | None,
    base: str | None,
    family: str | None,
    coefficients: list[float] | None,
    device: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    delta: Path,
    trainer: dict[str, Any] | None,
    torch_dtype: str | None,
    gguf_file: str | None,
    skip: list[str] | None,
    world: Any,
    save_as: str,
    max_rank: int | None,
    extend_edges: int = 1,
    keep: bool = True,
) -> Path:
    """``merge`` over task-vector folders only; Δ_merged goes to ``delta`` where needed, which outlives the merge
    when ``keep``."""
    from drm_lightning.export.model_folder import save_merged_model
    from drm_lightning.merging.engine.distributed import merge_task_vectors_distributed
    from drm_lightning.merging.engine.plan import MergePlan
    from drm_lightning.merging.engine.setup import check_output
    from drm_lightning.merging.methods.registry import get_method
    from drm_lightning.world import is_global_zero

    search = lam == "search"
    overrides = {k: v for k, v in {"torch_dtype": torch_dtype, "gguf_file": gguf_file}.items() if v is not None}
    # The merged model is written last, after the expensive merge (and λ search): an output that cannot be
    # written must fail now, not after that work. (merge_task_vectors checks the delta folder itself.)
    check_output(Path(output), [delta, *map(Path, task_vectors)])
    plan_kwargs: dict[str, Any] = {}
    if include is not None:
        plan_kwargs["include"] = list(include)
    if exclude is not None:
        plan_kwargs["exclude"] = list(exclude)
    if skip:
        plan_kwargs["skip"] = list(skip)
    plan = MergePlan(**plan_kwargs) if plan_kwargs else None
    block = get_method(method).block_by_block  # RegMean++: merged with the tasks' data into the delta folder
    if save_as == "adapter" and not search and world.world_size == 1 and not block:
        return _merge_to_adapter(task_vectors, output, method, params, lam, coefficients, max_rank, plan, base, family,
                                 device, torch_dtype, gguf_file)  # fmt: skip
    from drm_lightning.merging.engine.sweep import ParamGrid

    grid = ParamGrid.parse(method, params)
    if save_as == "model" and not keep and not search and not grid.searched and world.world_size == 1 and not block:
        return _merge_to_model(task_vectors, output, method, params, float(lam), coefficients, plan, base, family,
                               device, torch_dtype, gguf_file)  # fmt: skip
    check_space(task_vectors, delta, Path(output), plan, base=base, torch_dtype=torch_dtype, gguf_file=gguf_file)
    datamodules = task_datamodules(tasks, task_vectors) if search or grid.searched or block else {}
    if grid.searched:
        delta, lam, search_record = _search_params(
            task_vectors, delta, method, grid, lam, lambdas, strategy, datamodules, coefficients, base, family, plan,
            device, trainer, torch_dtype, gguf_file, extend_edges,
        )  # fmt: skip
        search = False
    if grid.searched:
        result = None
    elif block:
        from drm_lightning.evaluation.block_merge import merge_block_by_block

        result = merge_block_by_block(
            task_vectors, method, delta, datamodules, params, coefficients, base=base, family=family, plan=plan,
            device=device, torch_dtype=torch_dtype, gguf_file=gguf_file,
        )  # fmt: skip
    else:
        result = merge_task_vectors_distributed(
            task_vectors, method, delta, params, coefficients, base=base, family=family, plan=plan, device=device,
            torch_dtype=torch_dtype, gguf_file=gguf_file,
        )  # fmt: skip
    if not is_global_zero():  # rank 0 alone applies λ and writes the model folder, heads and merge.json
        return Path(output)
    if result is not None:
        seconds = result.timings["total"]
        print(f"merged {len(task_vectors)} task vectors with {result.label} in {seconds:.1f}s", file=sys.stderr)
        search_record = None
    if search:
        from drm_lightning.evaluation.lambda_search import search_merged_lambda

        found = search_merged_lambda(
            delta, task_vectors, datamodules, grid=lambdas, strategy=strategy, method=method, trainer_kwargs=trainer,
            extend=extend_edges,
        )  # fmt: skip
        lam = found.best_lambda
        search_record = _search_record(found.best_lambda, found.best_score, found.curve, found.notes,
                                       found.evaluations)  # fmt: skip
        for note in found.notes:
            print(f"λ search: {note}", file=sys.stderr)
        print(f"λ search: best λ={lam:g} (average normalised score {found.best_score:.4f}, {found.evaluations} "
              "λ evaluations)", file=sys.stderr)  # fmt: skip
    if save_as == "adapter":
        from drm_lightning.export.adapter import adapter_from_merged, print_report

        print_report(
            adapter_from_merged(delta, float(lam), output, max_rank=max_rank, device=device, keep_delta=keep),
            sys.stderr,
        )
    else:
        save_merged_model(delta, float(lam), output, base=base, family=family, keep_delta=keep, **overrides)
    if search_record is not None:
        (Path(output) / SEARCH_FILE).write_text(json.dumps(search_record, indent=2, sort_keys=True) + "\n")
        _write_card(output)  # the writer wrote the folder's card; the search's results go into it
    kept = f"; merged delta: {delta}" if keep else ""
    print(f"merged model: {output} (λ={float(lam):g}){kept}", file=sys.stderr)
    return Path(output)


def _search_params(
    task_vectors: list[str],
    delta: Path,
    method: str,
    grid: Any,
    lam: float | Literal["search"],
    lambdas: list[float] | None,
    strategy: Literal["grid", "refine"],
    datamodules: dict[str, Any],
    coefficients: list[float] | None,
    base: str | None,
    family: str | None,
    plan: Any,
    device: str | None,
    trainer: dict[str, Any] | None,
    torch_dtype: str | None,
    gguf_file: str | None,
    extend_edges: int,
) -> tuple[Path, float, dict[str, Any]]:
    """A search over the method's own parameters: every set merged in one pass into ``delta/<values>/``, each
    scored on validation (its λ searched, or at the given λ), the best (set, λ) returned with the landscape.

    The search is the pipeline's (``evaluation.param_search.ParamSearch``, scored by ``evaluate_merges`` on the
    validation splits): a numeric parameter whose best value is the first or last of its grid gets the next value
    beyond it, merged here and scored, for at most ``extend_edges`` rounds (as the λ grid does)."""
    from drm_lightning.evaluation.param_search import ParamSearch
    from drm_lightning.evaluation.run import evaluate_merges
    from drm_lightning.merging.engine.sweep import merge_task_vectors_many
    from drm_lightning.merging.methods.registry import get_method

    def merge_sets(variants: Sequence[Any], params: list[dict[str, Any]]) -> None:
        if get_method(method).block_by_block:  # one merge per set, each with the tasks' data
            from drm_lightning.evaluation.block_merge import merge_block_by_block

            for variant, values in zip(variants, params, strict=True):
                merge_block_by_block(
                    task_vectors, method, variant.folder, datamodules, values, coefficients, base=base, family=family,
                    plan=plan, device=device, torch_dtype=torch_dtype, gguf_file=gguf_file,
                )  # fmt: skip
            return
        merged = merge_task_vectors_many(
            task_vectors, method, [v.folder for v in variants], params, coefficients, base=base, family=family,
            plan=plan, device=device, progress=False, torch_dtype=torch_dtype, gguf_file=gguf_file,
        )  # fmt: skip
        print(f"merged {len(task_vectors)} task vectors with {merged[0].label} at {len(variants)} parameter set(s) "
              f"in one pass, {merged[0].timings['total']:.1f}s: {', '.join(v.name for v in variants)}",
              file=sys.stderr)  # fmt: skip

    search = ParamSearch(grid, delta, merge_sets)
    merge_sets(search.variants, search.params(search.variants))
    results = evaluate_merges(
        task_vectors, {method: search}, datamodules, split="validation",
        lambdas={method: float(lam)} if lam != "search" else None, strategy=strategy,
        grids={method: list(lambdas)} if lambdas else None, pretrained=False, trainer_kwargs=trainer,
        extend=extend_edges,
    )  # fmt: skip
    found = results.methods[0]
    chosen = found.chosen()
    assert chosen is not None  # a searched method always has its variants
    for v in found.variants:
        print(f"search: {v.name}: best λ={v.lam:g} (average normalised score {v.score:.4f}, {len(v.curve)} "
              "evaluations)", file=sys.stderr)  # fmt: skip
    for note in found.notes:
        print(f"search: {note}", file=sys.stderr)
    print(f"search: chosen {chosen.name} at λ={chosen.lam:g} ({found.evaluations} λ evaluations in all)",
          file=sys.stderr)  # fmt: skip
    record = {
        **_search_record(chosen.lam, chosen.score, chosen.curve, found.notes, found.evaluations),
        "chosen": chosen.name,
        "variants": [
            {"name": v.name, "values": v.values, **_search_record(v.lam, v.score, v.curve, v.notes, len(v.curve))}
            for v in found.variants
        ],
    }
    return delta / chosen.name, float(chosen.lam), record


def _write_card(folder: str | os.PathLike[str]) -> None:
    """(Re)write a merged folder's model card from what the folder holds: ``merge.json``, its heads, and the
    validation metrics at the chosen λ when ``lambda_search.json`` is there."""
    from drm_lightning.export.model_card import CARD_FILE, write_model_card

    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        return
    results = None
    if (folder / SEARCH_FILE).is_file():
        search = json.loads((folder / SEARCH_FILE).read_text())
        best = [p["metrics"] for p in search["curve"] if p["lambda"] == search["best_lambda"]]
        results = best[0] if best else None
    write_model_card(folder, results=results, split="validation", source="λ search")


def _search_record(
    lam: float | None, score: float | None, curve: Sequence[Any], notes: Sequence[str], evaluations: int
) -> dict[str, Any]:
    """What ``lambda_search.json`` says of one λ search: the best λ and score, how many validation runs it took,
    how its grid was extended, and its curve by increasing λ."""
    return {
        "best_lambda": lam,
        "best_score": score,
        "evaluations": evaluations,
        "notes": list(notes),
        "curve": [point.to_dict() for point in sorted(curve, key=lambda p: p.lam)],
    }


def _merge_to_model(
    task_vectors: list[str],
    output: str,
    method: str,
    params: dict[str, Any] | None,
    lam: float,
    coefficients: list[float] | None,
    plan: Any,
    base: str | None,
    family: str | None,
    device: str | None,
    torch_dtype: str | None,
    gguf_file: str | None,
) -> Path:
    """A fixed λ on one process: the model folder written straight from the merge, no Δ_merged on disk."""
    from drm_lightning.export.model_folder import merge_to_model

    check_space(task_vectors, None, Path(output), plan, base=base, torch_dtype=torch_dtype, gguf_file=gguf_file)
    result = merge_to_model(
        task_vectors, method, output, lam, params, coefficients, base=base, family=family, plan=plan, device=device,
        torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip
    seconds = result.timings["total"]
    print(f"merged {len(task_vectors)} task vectors with {result.label} in {seconds:.1f}s", file=sys.stderr)
    print(f"merged model: {output} (λ={lam:g})", file=sys.stderr)
    return Path(output)


@contextmanager
def _delta_folder(output: Path, delta: Path, *, temporary: bool) -> Iterator[Path]:
    """``delta``, or with ``temporary`` a folder inside a hidden sibling of ``output`` removed on the way out.

    The sibling is named as ``atomic_dir``'s temporaries (``.<output>.tmp-<host>-<pid>-*``), so one a killed run
    leaves behind is removed by the next write of ``output`` (``remove_stale_temporaries``).
    """
    if not temporary:
        yield delta
        return
    from drm_lightning.io.atomic import remove_stale_temporaries, temporary_prefix

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(output), dir=output.parent))
    try:
        yield folder / "delta"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _merge_to_adapter(
    task_vectors: list[str],
    output: str,
    method: str,
    params: dict[str, Any] | None,
    lam: float,
    coefficients: list[float] | None,
    max_rank: int | None,
    plan: Any,
    base: str | None,
    family: str | None,
    device: str | None,
    torch_dtype: str | None,
    gguf_file: str | None,
) -> Path:
    """A fixed λ on one process: LoRA task vectors straight into a PEFT adapter, no dense Δ_merged on disk."""
    from drm_lightning.export.adapter import merge_to_adapter, print_report

    summary = merge_to_adapter(
        task_vectors, method, output, params, coefficients, lam=float(lam), max_rank=max_rank, base=base,
        family=family, plan=plan, device=device, torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip
    print_report(summary, sys.stderr)
    from drm_lightning.io.disk import human_bytes

    size = human_bytes(summary["bytes"])
    print(f"adapter: {output} (λ={float(lam):g}, total rank {summary['total_rank']}, {size})", file=sys.stderr)
    return Path(output)


def check_space(
    task_vectors: list[str],
    delta: Path | None,
    output: Path,
    plan: Any = None,
    *,
    base: str | None = None,
    torch_dtype: str | None = None,
    gguf_file: str | None = None,
) -> None:
    """Refuse up front when ``delta`` and ``output`` together clearly will not fit on their filesystems.

    Δ_merged (float32) and the heads go to ``delta``; the model in the base's loading dtype, its tokenizer and the
    heads again to ``output``. Folders on one filesystem are summed. The model part comes from the base
    checkpoint's headers and is left out when they cannot tell (a hub id, a GGUF file): ``save_merged_model``
    checks again once the base is loaded, before writing.
    """
    from drm_lightning.io.disk import check_free_space
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.merging.engine.setup import base_load_options
    from drm_lightning.merging.engine.space import estimate_merge_bytes, estimate_model_bytes, heads_bytes

    readers = [TaskVectorReader(folder) for folder in task_vectors]
    metas = [r.meta for r in readers]
    load = base_load_options(metas, task_vectors, torch_dtype, gguf_file)
    model = estimate_model_bytes(base if base is not None else metas[0].base_model, **load)
    needs = {delta: estimate_merge_bytes(readers, plan)} if delta is not None else {}
    if model is not None:
        needs[output] = model + heads_bytes(readers)
    check_free_space(needs, "merged delta and model")
