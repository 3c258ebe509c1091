"""``--save_as adapter``: LoRA experts merged into one PEFT LoRA adapter, not a dense model.

Why: T LoRA experts of Llama-3.1-8B (r=16 on 7 projections) give a merged delta of rank ≤ Σ r_i per matrix; written
dense it is ~28 GB of float32, as factors well under a gigabyte (docs/results.md). ``factor.factor_delta`` finds
the factors of the merged delta, exact for every method whose registry entry names a ``lora_span`` (Task
Arithmetic, DRM, DRM-Iso, Iso-C, Iso-CTS, TSV-M, RegMean, RegMean++, WUDI-closed; docs/interop.md proves which);
this module streams the merge parameter by parameter into them and writes a folder that ``peft`` loads as is::

    <output>/
      adapter_config.json          LoraConfig: target_modules (full module names), rank_pattern / alpha_pattern
                                   (alpha = r: scale 1), modules_to_save, bias
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight [k, in], .lora_B.weight [out, k] (float32,
                                   λ folded into B); full weights of modules_to_save; merged biases of LoRA layers
      heads/<task>/                each task's head (docs/interop.md)
      merge.json                   the merge record, plus lam, save_as="adapter", per-module rank and error
      README.md                    the model card (``model_card.py``): base, method, λ, experts, how to load it
      tokenizer files              the base's

``PeftModel.from_pretrained(<base's own class>.from_pretrained(base), output)`` then computes ``W_0 + λ·Δ_merged``.
Parameters the experts changed outside their LoRA factors (biases, norms) are saved as full weights
``W_0 + λ·Δ_merged``: of their whole module as ``modules_to_save``, or, for the bias of a LoRA layer, through peft's
``bias="lora_only"``. TIES and DARE trim single entries and WUDI's Adam steps are elementwise, so their merged
delta is full rank: refused, unless ``max_rank`` asks for a truncated SVD, whose relative error per module is
recorded and returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from drm_lightning.export.factor import EXACT_TOL, factor_delta
from drm_lightning.io.task_vector import read_meta
from drm_lightning.merging.methods.registry import METHODS, get_method
from drm_lightning.merging.ops.lowrank import LowRankDelta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT = "base_model.model."


def exact_adapter(method: str) -> bool:
    """Whether ``method``'s merge of LoRA experts is an exact adapter: its merged delta stays in a joint span of
    their factors (``MergeMethod.lora_span``), so its rank is at most ``Σ r_i``. ``ValueError`` for an unknown name."""
    return get_method(method).lora_span is not None


def check_adapter_request(method: str, task_vectors: Sequence[str | os.PathLike[str]], max_rank: int | None) -> None:
    """Refuse, before any work, an adapter that cannot be exact: a full-rank method without ``max_rank``, or an
    input that is not a LoRA task vector (``ValueError`` naming the method or the folder)."""
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank={max_rank!r}: expected a positive integer")
    if not exact_adapter(method) and max_rank is None:
        exact = ", ".join(sorted(name for name in METHODS if exact_adapter(name)))
        raise ValueError(
            f"save_as=adapter: {method}'s merged delta of LoRA experts leaves the span of their factors (it is full "
            f"rank) and has no exact LoRA form (exact: {exact}); use save_as=model, or max_rank=K for an SVD "
            "truncation that reports its error per module"
        )
    for folder in task_vectors:
        meta = read_meta(folder)
        if meta.kind != "lora":
            raise ValueError(
                f"save_as=adapter: {Path(folder) / 'meta.json'} has kind={meta.kind!r}; an adapter needs every "
                "input to be a LoRA task vector (use save_as=model)"
            )


@dataclass
class AdapterBuilder:
    """Collects one merged parameter at a time as LoRA factors (adapted matrices) or a dense merged delta (others).

    Args:
        prefix: the backbone's prefix inside the class the adapter is for (``"model."`` in ``LlamaForCausalLM``).
        lam: λ, folded into every ``B`` and into the full weights.
        max_rank: cut every module's rank to at most this (``None``: exact rank; an inexact module is refused).
        device: where the factoring runs.
    """

    prefix: str
    lam: float
    max_rank: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_lowrank(self, name: str, delta: torch.Tensor, factors: Sequence[LowRankDelta | None], label: str) -> None:
        """Factor the merged delta of the LoRA-adapted weight ``name`` (``<module>.weight``)."""
        if not name.endswith(".weight"):
            raise ValueError(f"LoRA factors for {name!r}: expected the weight of a linear module")
        module = self.prefix + name[: -len(".weight")]
        result = factor_delta(delta.to(self.device), factors, max_rank=self.max_rank)
        if self.max_rank is None and result.error > EXACT_TOL:
            raise ValueError(
                f"save_as=adapter: the {label} merged delta of {name!r} is not exactly low rank (relative error "
                f"{result.error:.1e} in the span of the experts' LoRA factors); use save_as=model, or max_rank=K"
            )
        self.report[module] = {
            "rank": result.rank,
            "exact_rank": result.exact_rank,
            "error": result.error,
            "basis": result.basis,
        }
        if result.rank == 0:
            return  # a zero merged delta: the module stays W_0, no adapter needed
        self.ranks[module] = result.rank
        self.tensors[f"{_PEFT}{module}.lora_A.weight"] = result.A.float().cpu().contiguous()
        self.tensors[f"{_PEFT}{module}.lora_B.weight"] = (result.B * self.lam).float().cpu().contiguous()

    def add_dense(self, name: str, delta: torch.Tensor) -> None:
        """Keep the merged delta of a parameter outside the LoRA factors (a bias, a norm) for ``finish``."""
        self.dense[name] = delta

    def full_weights(self, base_state: Mapping[str, torch.Tensor]) -> tuple[list[str], bool]:
        """Write the full weights ``W_0 + λ·Δ`` of every densely changed parameter; return (modules_to_save, bias).

        The bias of a LoRA layer goes under ``<module>.base_layer.bias`` (peft ``bias="lora_only"``); any other
        parameter's whole module becomes a ``modules_to_save`` entry, every tensor of it saved.
        """
        lora_modules = set(self.ranks) | {m for m, r in self.report.items() if r["rank"] == 0}
        to_save: dict[str, None] = {}
        lora_bias = False
        for name, delta in sorted(self.dense.items()):
            module, _, leaf = name.rpartition(".")
            full = self.prefix + module
            if full in lora_modules:
                if leaf != "bias":
                    raise ValueError(f"save_as=adapter: {name!r} of a LoRA layer has a dense delta in some expert")
                self.tensors[f"{_PEFT}{full}.base_layer.bias"] = _merged(base_state[name], delta, self.lam)
                lora_bias = True
                continue
            inner = [m for m in lora_modules if m.startswith(full + ".")] if module else list(lora_modules)
            if inner:
                raise ValueError(
                    f"save_as=adapter: {name!r} changed, but its module {module!r} holds the LoRA layer {inner[0]!r}; "
                    "peft cannot save a module that holds an adapted layer"
                )
            to_save[full] = None
        for full in to_save:
            module = full[len(self.prefix) :]
            for key, value in base_state.items():
                if key.startswith(module + "."):
                    delta = self.dense.get(key)
                    weight = value if delta is None else _merged(value, delta, self.lam)
                    self.tensors[f"{_PEFT}{full}.{key[len(module) + 1 :]}"] = weight.detach().cpu().contiguous()
        return list(to_save), lora_bias


def _merged(base: torch.Tensor, delta: torch.Tensor, lam: float) -> torch.Tensor:
    """``W_0 + λ·Δ`` as ``add_merged_delta`` computes it (float32, rounded once to the base dtype)."""
    base = base.detach().cpu()
    return (base.float() + lam * delta.float()).to(base.dtype).contiguous()


def write_adapter(
    folder: Path,
    builder: AdapterBuilder,
    base_state: Mapping[str, torch.Tensor] | None,
    *,
    base_path: str,
    architecture: str,
) -> dict[str, Any]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``; return the summary for
    ``merge.json`` (per-module rank and error, modules_to_save, sizes)."""
    from peft import LoraConfig

    modules_to_save: list[str] = []
    lora_bias = False
    if builder.dense:
        if base_state is None:
            raise ValueError("write_adapter: densely changed parameters need the base weights")
        modules_to_save, lora_bias = builder.full_weights(base_state)
    if not builder.ranks and not modules_to_save and not lora_bias:
        raise ValueError("save_as=adapter: the merged delta is zero everywhere; there is no adapter to write")
    top = max(builder.ranks.values(), default=1)
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(builder.ranks) or None,
        rank_pattern=dict(sorted(builder.ranks.items())),
        alpha_pattern=dict(sorted(builder.ranks.items())),  # alpha = r: scale 1, λ is in B
        modules_to_save=sorted(modules_to_save) or None,
        bias="lora_only" if lora_bias else "none",
        lora_dropout=0.0,
        base_model_name_or_path=base_path,
        inference_mode=True,
        task_type="CAUSAL_LM" if architecture.endswith("ForCausalLM") else None,
    )
    if not builder.ranks:
        config.target_modules = []
    config.save_pretrained(str(folder))
    save_file(dict(sorted(builder.tensors.items())), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    errors = [r["error"] for r in builder.report.values()]
    return {
        "architecture": architecture,
        "backbone_prefix": builder.prefix,
        "max_rank": builder.max_rank,
        "modules": builder.report,
        "modules_to_save": sorted(modules_to_save),
        "max_error": max(errors, default=0.0),
        "total_rank": sum(builder.ranks.values()),
        "bytes": (folder / ADAPTER_WEIGHTS).stat().st_size,
    }


def estimate_adapter_bytes(readers: Iterable[Any], max_rank: int | None = None) -> int:
    """Bytes of the adapter for these task vectors, from their headers: per adapted ``[n, m]`` matrix
    ``min(Σ r_i, max_rank) · (n + m)`` float32 values, plus every densely changed parameter in float32 (its module
    is saved whole, usually a norm: a small over-estimate)."""

    ranks: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dense: dict[str, int] = {}
    for reader in readers:
        for name, shape in reader.delta_shapes().items():
            if reader.is_lowrank(name):
                ranks[name] = ranks.get(name, 0) + int(reader.meta.lora.r if reader.meta.lora else 0)
                shapes[name] = shape
            else:
                dense[name] = int(torch.Size(shape).numel())
    total = sum(min(ranks[n], max_rank or ranks[n]) * (shapes[n][0] + shapes[n][1]) for n in ranks) * 4
    return total + 4 * sum(dense.values()) + 200 * (len(ranks) + len(dense)) + 64 * 1024


def print_report(summary: Mapping[str, Any], file: Any) -> None:
    """One line per adapted module (rank, exact rank, relative error) when ``max_rank`` cut something."""
    modules = summary["modules"]
    cut = {m: r for m, r in modules.items() if r["rank"] < r["exact_rank"] or r["error"] > EXACT_TOL}
    if summary.get("max_rank") is None and not cut:
        return
    print(f"adapter: max_rank={summary.get('max_rank')}; relative error per module:", file=file)
    for module, r in modules.items():
        how = "truncated SVD of a full-rank delta" if r.get("basis") == "dense" else f"exact rank {r['exact_rank']}"
        print(f"  {module}: rank {r['rank']} ({how})  error {r['error']:.2e}", file=file)
    print(f"adapter: largest relative error {summary['max_error']:.2e}", file=file)


def merge_to_adapter(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
    coefficients: Sequence[float] | None = None,
    *,
    lam: float = 1.0,
    max_rank: int | None = None,
    base: str | None = None,
    family: str | None = None,
    plan: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """Merge LoRA task vectors straight into a PEFT adapter at ``lam``: no dense merged delta is written.

    Everything cheap is refused first (``check_adapter_request``, then ``prepare_merge``'s checks); the output is
    written atomically. Returns the adapter summary (also in ``merge.json["adapter"]``).
    """
    from drm_lightning.export.folder_writer import write_folder
    from drm_lightning.export.model_folder import meta_architecture
    from drm_lightning.io.disk import check_free_space
    from drm_lightning.merging.engine.apply import check_lam
    from drm_lightning.merging.engine.merger import merge_parameters
    from drm_lightning.merging.engine.record import copy_heads, merge_record
    from drm_lightning.merging.engine.setup import check_output, prepare_merge
    from drm_lightning.merging.engine.space import heads_bytes
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.models.resolve import resolve_pretrained

    t_start = time.perf_counter()
    folders = [Path(p) for p in task_vectors]
    check_adapter_request(method, folders, max_rank)
    lam = check_lam(lam)
    output = Path(output)
    check_output(output, folders)
    setup = prepare_merge(
        folders, method, params, coefficients, base=base, family=family, plan=plan, device=device,
        torch_dtype=torch_dtype, gguf_file=gguf_file,
    )  # fmt: skip
    check_free_space({output: estimate_adapter_bytes(setup.readers, max_rank) + heads_bytes(setup.readers)}, "adapter")
    present = {e.name for e in setup.entries if e.rule != "skip"}
    architecture, prefix, _ = meta_architecture(setup.base, setup.family, present, gguf_file=setup.gguf_file)
    builder = AdapterBuilder(prefix, lam, max_rank, setup.device)
    timings = dict(setup.timings)
    stream = merge_parameters(
        setup.entries, setup.readers, setup.method, setup.params, setup.coefficients, device=setup.device,
        progress=progress, timings=timings,
    )  # fmt: skip
    count = 0
    for name, delta in stream:
        count += 1
        _add(builder, name, delta, setup.readers, setup.shapes[name], setup.method.label)
    base_state = None
    if builder.dense:
        model = load_backbone(setup.base, setup.family, torch_dtype=setup.torch_dtype, gguf_file=setup.gguf_file)
        base_state = model.state_dict()
    summary: dict[str, Any] = {}

    def weights(folder: Path) -> None:
        base_path = resolve_pretrained(setup.base)
        summary.update(write_adapter(folder, builder, base_state, base_path=base_path, architecture=architecture))

    def heads(folder: Path) -> None:
        copy_heads(setup.readers, folder)

    def record() -> dict[str, Any]:
        timings["total"] = time.perf_counter() - t_start
        return {**merge_record(setup.record(), timings, count), "lam": lam, "save_as": "adapter", "adapter": summary}

    write_folder(output, weights, tokenizer_of=setup.base, heads=heads, record=record)
    return summary


def _add(
    builder: AdapterBuilder,
    name: str,
    delta: torch.Tensor,
    readers: Sequence[Any],
    shape: tuple[int, ...],
    label: str,
) -> None:
    """Route one merged parameter: factored when some expert adapted it with LoRA, dense otherwise."""
    lowrank = [r.is_lowrank(name) for r in readers]
    if not any(lowrank):
        builder.add_dense(name, delta)
        return
    dense = [str(r.folder) for r, low in zip(readers, lowrank, strict=True) if not low and name in r.names()]
    if dense:
        raise ValueError(
            f"save_as=adapter: {name!r} is LoRA-adapted in some experts but a dense delta in {dense[0]}; an adapter "
            "needs it factored in every expert (use save_as=model)"
        )
    factors = [r.get(name, shape) if low else None for r, low in zip(readers, lowrank, strict=True)]
    builder.add_lowrank(name, delta, factors, label)


def adapter_from_merged(
    merged: str | os.PathLike[str],
    lam: float,
    output: str | os.PathLike[str],
    *,
    max_rank: int | None = None,
    device: str | torch.device | None = None,
    keep_delta: bool = True,
) -> dict[str, Any]:
    """Turn a dense merged folder (``merge_task_vectors`` output, e.g. after a λ search) of LoRA experts into a PEFT
    adapter at ``lam``; the experts' task vectors (``merge.json``'s inputs) give the spans. Returns the summary.
    ``keep_delta``: whether ``merged`` outlives the call, so ``merge.json`` may name it."""
    from drm_lightning.export.folder_writer import write_folder
    from drm_lightning.export.model_folder import meta_architecture
    from drm_lightning.io.disk import check_free_space
    from drm_lightning.io.merged_delta import iter_merged_delta, merged_delta_index
    from drm_lightning.merging.engine.apply import check_lam
    from drm_lightning.merging.engine.reader import TaskVectorReader
    from drm_lightning.merging.engine.record import HEADS_DIR, MERGE_FILE, read_merge_record
    from drm_lightning.merging.engine.setup import check_output
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.models.resolve import resolve_pretrained
    from drm_lightning.task_vectors.fingerprint import fingerprint_matches
    from drm_lightning.world import resolve_device

    merged, output = Path(merged), Path(output)
    lam = check_lam(lam)
    record = read_merge_record(merged)
    folders = [Path(i["path"]) for i in record.get("inputs", [])]
    check_adapter_request(str(record["method"]), folders, max_rank)
    check_output(output, [merged, *folders])
    readers = [TaskVectorReader(f) for f in folders]
    check_free_space({output: estimate_adapter_bytes(readers, max_rank)}, "adapter")
    names = set(merged_delta_index(merged))
    architecture, prefix, _ = meta_architecture(
        record["base_model"], record["family"], names, gguf_file=record.get("gguf_file")
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for reader in readers:
        shapes.update(reader.delta_shapes())
    builder = AdapterBuilder(prefix, lam, max_rank, resolve_device(device))
    for name, delta in iter_merged_delta(merged):
        _add(builder, name, delta, readers, shapes[name], str(record.get("label") or record["method"]))
    base_state = None
    if builder.dense:
        load = {"torch_dtype": record.get("torch_dtype"), "gguf_file": record.get("gguf_file")}
        model = load_backbone(record["base_model"], record["family"], **load)
        if not fingerprint_matches(model, record["base_fingerprint"]):
            raise ValueError(f"{merged / MERGE_FILE}: base model {record['base_model']!r} has other weights now")
        base_state = model.state_dict()
    summary: dict[str, Any] = {}

    def weights(folder: Path) -> None:
        base_path = resolve_pretrained(record["base_model"])
        summary.update(write_adapter(folder, builder, base_state, base_path=base_path, architecture=architecture))

    def out_record() -> dict[str, Any]:
        delta = str(merged.resolve()) if keep_delta else None
        return {**record, "lam": lam, "merged_delta": delta, "save_as": "adapter", "adapter": summary}

    write_folder(output, weights, tokenizer_of=record["base_model"], heads=merged / HEADS_DIR, record=out_record)
    return summary
