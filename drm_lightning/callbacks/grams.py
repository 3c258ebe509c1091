"""Record an expert's input statistics: each trained linear layer's input Gram ``Σ x xᵀ`` on N training examples.

What RegMean weighs the deltas by (docs/methods.md, "Input statistics"; the format is ``io/statistics.py``).
``record_grams`` runs the expert's own forward pass in eval mode (dropout off) under ``torch.no_grad`` with a forward
hook on every recorded ``nn.Linear``; each hook adds ``xᵀx`` of the layer's input rows to a float32 accumulator on
the model's device. Rows are token positions: where the batch's ``attention_mask`` has the input's ``[batch, length]``
shape, padding positions are left out; other inputs (a pooler's ``[batch, in]``, a decoder's own length, image
patches) count every row.

Which examples: a seeded random sample of ``examples`` indices of the training set (seed 0 by default), the same
for any number of processes. Under DDP each rank runs every ``world``-th of them and the Grams and row counts are
summed with the strategy's all-reduce, so two processes give the one-process Gram up to summation order.

Which layers: the backbone's ``nn.Linear`` modules that training changes: a dense expert's with a trained weight, a
LoRA expert's adapted layers (their ``base_layer``, whose input is the adapted layer's input). ``layers`` (regexes,
``re.search`` on the weight name) narrows them, e.g. to skip a Llama's 0.8 GB ``down_proj`` Grams.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from drm_lightning.models.lora import backbone_name

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class Grams:
    """Input Grams of one expert: ``sums[name]`` = Σ x xᵀ (float32, CPU), ``rows[name]`` the rows summed, and the
    number of training examples run."""

    sums: dict[str, torch.Tensor]
    rows: dict[str, int]
    examples: int


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def recorded_layers(backbone: nn.Module, lora: bool, layers: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """Weight name (the backbone's ``state_dict()`` name) -> the ``nn.Linear`` whose input is recorded.

    Dense experts: every ``nn.Linear`` with a trained weight; LoRA experts: the base layer of every adapted layer.
    ``layers``: regexes, a weight name must match one (``re.search``) to be recorded.

    Raises:
        ValueError: an invalid regex in ``layers``.
    """
    patterns = _patterns(layers)
    out: dict[str, nn.Linear] = {}
    for name, module in backbone.named_modules():
        if type(module) is not nn.Linear:  # peft's own lora_A/lora_B are nn.Linear too: picked out by name below
            continue
        clean = _clean(name)
        if lora:
            if not clean.endswith(".base_layer"):
                continue
        elif not module.weight.requires_grad:
            continue
        weight = backbone_name(f"{clean}.weight")
        if patterns and not any(p.search(weight) for p in patterns):
            continue
        out[weight] = module
    return out


def _patterns(layers: Sequence[str] | None) -> list[re.Pattern[str]]:
    patterns = []
    for pattern in layers or []:
        try:
            patterns.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"statistics_layers: invalid regex {pattern!r} ({err})") from None
    return patterns


def named_layers(
    backbone: nn.Module, names: Iterable[str], layers: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """Weight name -> ``nn.Linear`` for the given weight names (a task vector's: the layers it changes) that belong
    to an ``nn.Linear`` of a plain backbone and match ``layers`` (regexes; default all)."""
    patterns = _patterns(layers)
    out: dict[str, nn.Linear] = {}
    for name in names:
        if not name.endswith(".weight") or (patterns and not any(p.search(name) for p in patterns)):
            continue
        try:
            module = backbone.get_submodule(name.removesuffix(".weight"))
        except AttributeError:
            continue
        if type(module) is nn.Linear:
            out[name] = module
    return out


def sample_indices(size: int, examples: int, seed: int = 0) -> list[int]:
    """The ``min(examples, size)`` training indices the Grams are taken on: a seeded permutation's first ones."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[: min(examples, size)].tolist()


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def record_grams(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    batches: Iterable[Mapping[str, Any]],
    examples: int,
    *,
    forward: Callable[[Mapping[str, Any]], Any] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Grams:
    """Run ``batches`` through ``model`` (eval mode, no grad) and sum each target layer's input Gram.

    Args:
        model: the expert; its training mode is restored afterwards.
        targets: weight name -> layer (``recorded_layers``).
        batches: this process's batches, already on the model's device.
        examples: the examples all processes run together (recorded as is).
        forward: how to run a batch (default ``model(batch)``).
        reduce: sums a tensor over processes (the strategy's all-reduce); ``None`` in one process.
    """
    device = next(model.parameters()).device
    sums = {name: torch.zeros(layer.in_features, layer.in_features, device=device) for name, layer in targets.items()}
    counts = torch.zeros(len(targets), dtype=torch.float64, device=device)
    index = {name: i for i, name in enumerate(targets)}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Callable[..., None]:
        def add(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = _rows(inputs[0].detach(), mask[0]).to(torch.float32)
            sums[name].addmm_(x.T, x)
            counts[index[name]] += x.shape[0]

        return add

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in targets.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                (forward or model)(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if reduce is not None:
        sums = {name: reduce(g) for name, g in sums.items()}
        counts = reduce(counts)
    rows = {name: int(counts[index[name]]) for name in targets}
    return Grams({name: g.to("cpu") for name, g in sums.items()}, rows, int(examples))


def train_loader(datamodule: Any, task: str) -> DataLoader:
    """A task's training ``DataLoader`` (its datamodule set up for fitting): where the recorded examples come from.

    Raises:
        ValueError: a ``train_dataloader`` that is not one ``DataLoader`` (naming the task).
    """
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if not isinstance(loader, DataLoader):
        raise ValueError(f"task {task!r}: its datamodule's train_dataloader is not one DataLoader")
    return loader


def training_batches(
    loader: DataLoader, indices: Sequence[int], rank: int, world: int, device: torch.device
) -> Iterator[Any]:
    """This process's share (every ``world``-th) of ``indices`` of ``loader``'s dataset, batched and collated as
    ``loader`` does, on ``device``."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    share = list(indices)[rank::world]
    sub = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, sampler=share, collate_fn=loader.collate_fn)
    for batch in sub:
        yield move_data_to_device(batch, device)


def expert_grams(
    expert: nn.Module,
    loader: DataLoader,
    examples: int,
    targets: Mapping[str, nn.Linear],
    *,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Grams:
    """The input Grams of ``targets`` on ``examples`` training examples of ``loader``'s dataset (a seeded sample,
    shared out between ``world`` processes); layers that the examples never reach are left out.

    Raises:
        ValueError: no layer to record.
    """
    if not targets:
        raise ValueError(f"task {getattr(expert, 'task', '?')!r}: no linear layer to record input statistics of")
    indices = sample_indices(len(loader.dataset), examples, seed)
    device = next(expert.parameters()).device
    batches = training_batches(loader, indices, rank, world, device)
    grams = record_grams(expert, targets, batches, len(indices), reduce=reduce)
    reached = [name for name, rows in grams.rows.items() if rows > 0]
    return Grams({n: grams.sums[n] for n in reached}, {n: grams.rows[n] for n in reached}, grams.examples)
