"""Merges whose Grams depend on the merge itself, block by block with each task's data: RegMean++ (arXiv 2508.03121).

RegMean weighs each linear layer's task deltas by the Grams of the inputs each *expert* gives that layer on its task's
examples, recorded once when fitting ends (``callbacks/grams.py``). RegMean++ takes them on the inputs the *merged*
model gives it: block l's Grams come from task i's examples run through the merged model's embeddings and blocks < l,
then through expert i's own block l (as the reference implementation, FusionBench's ``RegMeanAlgorithmPlusPlus``,
runs each candidate's layer on the merged model's activations). So the merge goes block after block, with the model
running in between (``merge_block_by_block``):

1. ``prepare_merge`` checks every input (cheapest first) and loads the base once; every task's expert is its head on
   that one backbone; each task's ``examples`` training examples, the seeded sample RegMean's statistics are taken on
   (``callbacks/grams.sample_indices``), are collated once.
2. A probe pass (the first task's first batch) gives the order in which the blocks call their linear layers. A block
   is every parameter whose name shares the prefix up to its first number (``encoder.layer.3``); parameters outside
   blocks group by their first name part (``embeddings``, ``pooler``): ``coefficients.group_of``. Groups whose
   linear layers the pass never calls (embeddings, a final norm, a pooler that mean pooling skips) are merged first,
   by the method's rule without Grams (RegMean's: the plain mean), and put into the model.
3. Each block, in call order: for each task, the block's parameters are set to ``W_0 + Δ_i``, the task's examples run
   with the recorder's hooks (``record_grams``: the same rows as the stored statistics, padding left out) and stop
   at the next block's first linear layer; the block is merged by the engine's per-parameter loop with these Grams
   (``merger.merge_parameters``) and ``W_0 + Δ_merged`` goes into the model for the blocks after it.

The model the later blocks see is ``W_0 + Δ_merged`` (λ = 1, the paper's merged model). The folder holds Δ_merged
like every merged folder, so λ is searched and applied as for any method, and at λ = 1 it is RegMean++ itself.
Cost: with early stopping each task runs Σ_l (l + 1)/L ≈ (L + 1)/2 full passes of its examples for L blocks (one
per block without it), where RegMean reads Grams recorded once; no statistics are read or written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from drm_lightning.evaluation.coefficients import group_of

if TYPE_CHECKING:
    from drm_lightning.merging.engine.merger import MergeResult
    from drm_lightning.merging.engine.plan import MergePlan, PlanEntry
    from drm_lightning.merging.engine.reader import TaskVectorReader

#: The key of ``merge.json`` that says how the Grams were taken (examples per task, seed, block order).
RECORD_KEY = "block_by_block"


class _Stop(Exception):
    """Raised at the first linear layer past the block being recorded: the rest of the pass is not needed."""


def _stop(module: nn.Module, args: Any) -> None:
    raise _Stop


def merge_block_by_block(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    datamodules: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    coefficients: Sequence[float] | None = None,
    *,
    examples: int | None = None,
    seed: int = 0,
    base: str | None = None,
    family: str | None = None,
    plan: MergePlan | None = None,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    progress: bool = False,
    max_shard_bytes: int | None = None,
) -> MergeResult:
    """Merge ``task_vectors`` with a ``block_by_block`` method (RegMean++) into the merged folder ``output``.

    Args:
        task_vectors: task vector folders, all of one base model.
        method: a registry name whose ``MergeMethod.block_by_block`` is set (``regmean_plusplus``).
        output: the merged folder (``merger.merge_task_vectors``'s layout, plus ``merge.json[RECORD_KEY]``).
        datamodules: task -> its datamodule; the Grams are taken on its training split.
        params, coefficients, base, family, plan, device, torch_dtype, gguf_file: as ``merge_task_vectors``.
        examples: training examples per task (a seeded sample; default 256, the statistics' default).
        seed: seed of the sample (the statistics' default 0 takes the examples RegMean's Grams are recorded on).
        progress: a line per block on stderr.
        max_shard_bytes: size at which an output shard is flushed.

    Raises:
        ValueError: (before anything is loaded) a method that merges parameter by parameter, a task without a
            datamodule (naming its task vector's meta.json), a bad ``examples``; then whatever ``prepare_merge``
            refuses. Nothing is written.
    """
    from drm_lightning.callbacks.grams import named_layers
    from drm_lightning.io.shards import DEFAULT_MAX_SHARD_BYTES, check_max_shard_bytes
    from drm_lightning.io.statistics import DEFAULT_EXAMPLES
    from drm_lightning.io.task_vector import META_FILE, read_meta
    from drm_lightning.merging.engine.merger import write_merged
    from drm_lightning.merging.engine.setup import prepare_merge
    from drm_lightning.merging.methods.registry import get_method
    from drm_lightning.models.backbone import load_backbone

    t_start = time.perf_counter()
    max_shard_bytes = DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    check_max_shard_bytes(max_shard_bytes)
    if not get_method(method).block_by_block:
        raise ValueError(f"method={method!r}: merges parameter by parameter; use merge_task_vectors")
    examples = DEFAULT_EXAMPLES if examples is None else examples
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples={examples!r}: expected a positive integer")
    for folder in map(Path, task_vectors):
        task = read_meta(folder).task
        if task not in datamodules:
            raise ValueError(
                f"{folder / META_FILE}: task {task!r} has no datamodule (have {sorted(datamodules)}); {method} runs "
                "every task's training examples through the merged model"
            )
    loaded: dict[str, nn.Module] = {}

    def base_state(
        name: str, fam: str, load: Mapping[str, str | None], expected: Sequence[str]
    ) -> Mapping[str, torch.Tensor]:
        loaded["base"] = load_backbone(name, fam, **load)
        return loaded["base"].state_dict()

    setup = prepare_merge(
        task_vectors, method, params, coefficients, base=base, family=family, plan=plan, device=device, output=output,
        torch_dtype=torch_dtype, gguf_file=gguf_file, base_state=base_state, block_by_block=True,
    )  # fmt: skip
    backbone = loaded["base"].to(setup.device)
    tasks = TaskData.load(setup.readers, backbone, datamodules, examples, seed, setup.device)
    entries = [e for e in setup.entries if e.rule != "skip"]
    layers = named_layers(backbone, [e.name for e in entries if e.rule == "matrix"])
    schedule = BlockSchedule.probe(tasks.experts[0], layers, tasks.batches[0][0], entries)
    timings = {**setup.timings, "grams": 0.0}
    info = {"examples": tasks.counts, "seed": seed, **schedule.describe()}
    blocks = merge_blocks(setup, backbone, tasks, schedule, layers, timings, progress=progress)
    stream = ((name, [delta]) for name, delta in blocks)
    [result] = write_merged(
        setup, [output], [setup.params], stream, max_shard_bytes=max_shard_bytes, timings=timings, t_start=t_start,
        record={RECORD_KEY: info},
    )  # fmt: skip
    return result


def merge_blocks(
    setup: Any,
    backbone: nn.Module,
    tasks: TaskData,
    schedule: BlockSchedule,
    layers: Mapping[str, nn.Linear],
    timings: dict[str, float],
    *,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Steps 2-3 of the module docstring: yield ``(name, Δ_merged)`` group after group, each put into ``backbone``
    (``W_0 + Δ_merged``) before the next block's Grams are taken.

    ``setup``: what ``prepare_merge`` returns (its method, parameters, coefficients, readers and device are read);
    ``timings`` gains ``grams`` (the forward passes) besides the merge loop's phases.
    """
    timings.setdefault("grams", 0.0)
    state = backbone.state_dict(keep_vars=True)
    for group in schedule.first:  # none of their layers is called: merged without Grams, before any block
        yield from _merge_group(setup, schedule.groups[group], state, timings, None)
    for k, group in enumerate(schedule.blocks):
        t0 = time.perf_counter()
        targets, stop = schedule.targets(group, layers), schedule.stop_module(k, layers)
        grams = tasks.grams(setup.readers, schedule.groups[group], state, targets, stop)
        timings["grams"] += time.perf_counter() - t0
        if progress:
            print(f"{setup.method.label}: block {group} ({k + 1}/{len(schedule.blocks)}): Grams of {len(grams)} "
                  f"layers in {time.perf_counter() - t0:.1f}s", file=sys.stderr)  # fmt: skip
        yield from _merge_group(setup, schedule.groups[group], state, timings, grams)


def _merge_group(
    setup: Any,
    entries: Sequence[PlanEntry],
    state: Mapping[str, torch.Tensor],
    timings: dict[str, float],
    grams: Mapping[str, list[torch.Tensor]] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge one group's parameters (the engine's per-parameter loop, with ``grams`` as the statistics) and put
    ``W_0 + Δ_merged`` into the model (``state``, still at ``W_0`` for these parameters) as each is merged."""
    from drm_lightning.merging.engine.merger import merge_parameters

    stream = merge_parameters(
        entries, setup.readers, setup.method, setup.params, setup.coefficients, device=setup.device,
        timings=timings, statistics=(lambda name: None) if grams is None else grams.get,
    )  # fmt: skip
    for name, delta in stream:
        _set_weight(state[name], state[name].detach().clone(), delta)
        yield name, delta


@torch.no_grad()
def _set_weight(target: torch.Tensor, base: torch.Tensor, delta: torch.Tensor | None) -> None:
    """``target ← base + delta`` in float32, rounded once to the target's dtype (``apply.add_merged_delta``'s
    arithmetic at λ = 1); ``delta`` ``None``: ``base``."""
    if delta is None:
        target.copy_(base)
    elif target.dtype == torch.float32:
        target.copy_(base.add(delta.to(target.device)))
    else:
        target.copy_((base.float() + delta.to(target.device, torch.float32)).to(target.dtype))


class TaskData:
    """Every task's expert (its head on the one shared backbone) and its collated training examples."""

    def __init__(self, experts: list[nn.Module], batches: list[list[Any]], counts: dict[str, int]) -> None:
        self.experts, self.batches, self.counts = experts, batches, counts

    @classmethod
    def load(
        cls,
        readers: Sequence[TaskVectorReader],
        backbone: nn.Module,
        datamodules: Mapping[str, Any],
        examples: int,
        seed: int,
        device: torch.device,
    ) -> TaskData:
        """The experts and ``examples`` training examples of each task (``sample_indices``' seeded sample).

        Raises:
            ValueError: a task whose training split is empty.
        """
        from drm_lightning.callbacks.grams import sample_indices, train_loader, training_batches
        from drm_lightning.models.expert import ExpertModule

        experts, batches, counts = [], [], {}
        for reader in readers:
            loader = train_loader(datamodules[reader.task], reader.task)
            indices = sample_indices(len(loader.dataset), examples, seed)
            if not indices:
                raise ValueError(f"task {reader.task!r}: its training split is empty; no examples to take Grams on")
            experts.append(ExpertModule.from_task_vector(reader.folder, backbone=backbone).to(device).eval())
            batches.append(list(training_batches(loader, indices, 0, 1, device)))
            counts[reader.task] = len(indices)
        return cls(experts, batches, counts)

    def grams(
        self,
        readers: Sequence[TaskVectorReader],
        entries: Sequence[PlanEntry],
        state: Mapping[str, torch.Tensor],
        targets: Mapping[str, nn.Linear],
        stop: nn.Module | None,
    ) -> dict[str, list[torch.Tensor]]:
        """Per target layer, each task's per-row mean input Gram with the block's parameters (``entries``) at
        ``W_0 + Δ_i`` and everything before it as the model holds it; the block is back at ``W_0`` afterwards.

        A layer that a task's examples never reach gets a zero Gram from that task (no data from it)."""
        from drm_lightning.merging.ops.lowrank import LowRankDelta

        base = {e.name: state[e.name].detach().clone() for e in entries}
        per_task = []
        try:
            for i, reader in enumerate(readers):
                for e in entries:
                    delta = reader.get(e.name, e.shape)
                    dense = delta.dense(torch.float32) if isinstance(delta, LowRankDelta) else delta
                    _set_weight(state[e.name], base[e.name], None if dense is None else dense.float())
                per_task.append(block_grams(self.experts[i], targets, self.batches[i], self.counts[reader.task], stop))
        finally:
            for e in entries:
                _set_weight(state[e.name], base[e.name], None)
        return {name: [grams[name] for grams in per_task] for name in targets}


def block_grams(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    batches: Sequence[Any],
    examples: int,
    stop: nn.Module | None,
) -> dict[str, torch.Tensor]:
    """The per-row mean input Gram ``Σ x xᵀ / rows`` of each target on ``batches`` (``record_grams``, the recorder's
    hooks), each pass stopped where ``stop`` is about to run (``None``: the whole pass); zero where no row arrived."""
    from drm_lightning.callbacks.grams import record_grams

    def forward(batch: Any) -> None:
        try:
            model(batch)
        except _Stop:
            pass

    handle = stop.register_forward_pre_hook(_stop) if stop is not None else None
    try:
        recorded = record_grams(model, targets, batches, examples, forward=forward)
    finally:
        if handle is not None:
            handle.remove()
    sums, rows = recorded.sums, recorded.rows
    return {name: sums[name] / rows[name] if rows[name] else torch.zeros_like(sums[name]) for name in targets}


def call_order(model: nn.Module, layers: Mapping[str, nn.Linear], batch: Any) -> list[str]:
    """The weight names of ``layers`` in the order one pass of ``batch`` calls them (a name per call)."""
    calls: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        return lambda module, args: calls.append(name)

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls


class BlockSchedule:
    """Which groups of parameters are merged in which order, and where each block's passes may stop."""

    def __init__(self, groups: dict[str, list[PlanEntry]], blocks: list[str], calls: list[str], early: bool) -> None:
        self.groups = groups
        self.blocks = blocks
        self.first = [g for g in groups if g not in blocks]
        self.calls = calls
        self.early = early

    @classmethod
    def probe(
        cls, model: nn.Module, layers: Mapping[str, nn.Linear], batch: Any, entries: Sequence[PlanEntry]
    ) -> BlockSchedule:
        """Group ``entries`` by block and order the blocks by one pass of ``batch`` through ``model``.

        Early stopping needs each block's calls to be one run (no block calls a layer again after a later block
        started, as weight-shared layers would); where they are not, every pass runs to the end.
        """
        groups: dict[str, list[PlanEntry]] = {}
        for entry in entries:
            groups.setdefault(group_of(entry.name, "block"), []).append(entry)
        calls = call_order(model, layers, batch)
        runs = [group_of(name, "block") for name in calls]
        runs = [g for i, g in enumerate(runs) if i == 0 or runs[i - 1] != g]
        blocks = list(dict.fromkeys(runs))
        return cls(groups, blocks, calls, early=len(runs) == len(blocks))

    def targets(self, group: str, layers: Mapping[str, nn.Linear]) -> dict[str, nn.Linear]:
        """The layers of ``group`` that the pass calls: the ones whose Grams are taken."""
        called = set(self.calls)
        return {name: layer for name, layer in layers.items() if name in called and group_of(name, "block") == group}

    def stop_module(self, k: int, layers: Mapping[str, nn.Linear]) -> nn.Module | None:
        """Where the passes of block ``k`` stop: the next block's first called layer (``None``: the last block, or
        no early stopping)."""
        if not self.early or k + 1 >= len(self.blocks):
            return None
        following = self.blocks[k + 1]
        first = next(name for name in self.calls if group_of(name, "block") == following)
        return layers[first]

    def describe(self) -> dict[str, Any]:
        """What ``merge.json`` records of the schedule."""
        return {"blocks": list(self.blocks), "merged_first": list(self.first), "early_stop": self.early}
