"""``TaskVectorCallback``: write an expert's task vector when fitting ends.

What it writes, into ``output_dir`` (default ``<trainer.default_root_dir>/task_vectors/<task>``), atomically via
``format.write_task_vector``:

- ``task_vector.safetensors``: full fine-tuning: ``W_ft - W_0`` for every trained backbone parameter that changed
  (float32, or float64 for float64 weights); LoRA: each adapted weight's ``<name>.lora_A`` [r, in] and
  ``<name>.lora_B`` [out, r] exactly as trained, plus dense deltas of any other trained backbone parameter.
  Names are the plain backbone's ``state_dict()`` names (no ``peft`` prefixes, no ``.base_layer``). Tied weights
  (T5's ``shared`` / ``lm_head``) appear once, under the name ``named_parameters()`` gives them.
- ``head.safetensors``: the task head's state dict (empty for T5, whose LM head is part of the backbone).
- ``meta.json``: task, kind (dense | lora), family, label names, base model (as configured, e.g.
  ``package://...``), how it was loaded (``torch_dtype``, ``gguf_file``) and the fingerprint of its weights as
  loaded, LoRA r/alpha/scale/targets/dropout, head constructor arguments, the expert's validation metrics
  (``val/...`` from ``trainer.callback_metrics``), library versions, and the statistics section.
- ``statistics.safetensors`` (unless ``statistics_examples=0``): each trained linear layer's input Gram on
  ``statistics_examples`` training examples, what RegMean merges by (``callbacks/grams.py``,
  ``io/statistics.py``). Every rank runs its share of the examples first; one all-reduce sums them.

``W_0`` is reloaded with ``load_backbone`` at the end on global rank 0 (one extra model in memory for a moment)
rather than copied at the start (an extra model for the whole run). Under FSDP / model parallelism every rank joins
the full-state-dict gather (``torch.distributed.checkpoint.state_dict.get_model_state_dict``); only global rank 0
reloads and writes, and all ranks meet at a barrier afterwards.

Before the reload, rank 0 checks that the output's filesystem can hold the task vector (an upper-bound estimate
from the trained tensors' sizes, ``estimate_task_vector_bytes``); a full disk is refused in a second, naming the
folder and the sizes, and the error reaches every rank like any other failure there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from drm_lightning.callbacks.grams import Grams, expert_grams, recorded_layers
from drm_lightning.io.disk import check_free_space
from drm_lightning.io.statistics import (
    DEFAULT_EXAMPLES,
    statistics_bytes,
    statistics_section,
    write_task_vector_with_statistics,
)
from drm_lightning.io.task_vector import LoraMeta, TaskVectorMeta, library_versions, write_task_vector
from drm_lightning.models.backbone import load_backbone, parse_dtype
from drm_lightning.models.expert import ExpertModule
from drm_lightning.models.lora import backbone_name, split_lora_state
from drm_lightning.task_vectors.fingerprint import fingerprint

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    """Drop the names that FSDP / activation checkpointing / torch.compile wrappers insert."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def gather_state_dict(trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``pl_module``; a collective under sharding strategies: call on every rank.

    Under FSDP only rank 0 receives the tensors (on CPU); other ranks get an empty dict.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if type(strategy).__name__ == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        raise ValueError("TaskVectorCallback: DeepSpeed ZeRO stage 3 is not supported; use FSDP or ZeRO stage <= 2")
    if isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(strategy.model, options=options)
        return {_clean(k): v for k, v in state.items()}
    return {_clean(k): v for k, v in pl_module.state_dict().items()}


def _trained_parts(
    expert: ExpertModule, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(lora_factors, rest)`` of the trained backbone tensors in ``state``, under plain backbone names.

    LoRA factors are stored as trained; ``rest`` are fine-tuned weights whose deltas against ``W_0`` get stored.
    """
    trained = sorted(_clean(n) for n, p in expert.backbone.named_parameters() if p.requires_grad)
    missing = [n for n in trained if f"backbone.{n}" not in state]
    if missing:
        raise ValueError(f"state dict of task {expert.task!r} lacks trained parameter(s) {missing[:3]}")
    trained_state = {n: state[f"backbone.{n}"] for n in trained}
    if expert.lora is not None:
        return split_lora_state(trained_state)
    return {}, {backbone_name(n): t for n, t in trained_state.items()}


def _delta_dtype(tuned: torch.Tensor) -> torch.dtype:
    """Deltas are stored in float32, or float64 for float64 weights (bf16/fp16 weights would lose the delta)."""
    return torch.float64 if tuned.dtype == torch.float64 else torch.float32


#: Allowance for ``meta.json`` in the size estimate (labels, metrics, versions: a few KiB in practice).
_META_ALLOWANCE = 64 * 1024


def estimate_task_vector_bytes(expert: ExpertModule, state: dict[str, torch.Tensor]) -> int:
    """Bytes ``build_task_vector`` + ``write_task_vector`` will put on disk at most, without loading ``W_0``.

    Why before the reload: refusing a full disk must not first cost a model load (and, for a big model, minutes).
    An upper bound: with ``skip_zero`` the deltas that stayed exactly zero are left out.
    """
    factors, rest = _trained_parts(expert, state)
    nbytes = sum(t.numel() * t.element_size() for t in factors.values())
    nbytes += sum(t.numel() * _delta_dtype(t).itemsize for t in rest.values())
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    nbytes += sum(t.numel() * t.element_size() for t in head.values())
    header = sum(len(name) + 96 for name in (*factors, *rest, *head)) + 128
    return nbytes + header + _META_ALLOWANCE


def build_task_vector(
    expert: ExpertModule,
    state: dict[str, torch.Tensor],
    metrics: dict[str, float] | None = None,
    *,
    skip_zero: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], TaskVectorMeta]:
    """Compute ``(deltas, head, meta)`` of a fine-tuned expert from its full state dict.

    Args:
        expert: the fine-tuned expert (its settings say how to reload ``W_0``).
        state: ``expert``'s full state dict (``gather_state_dict``).
        metrics: recorded in ``meta.metrics``.
        skip_zero: leave out dense deltas that are exactly zero (the format reads absent as zero).
    """
    hp = expert.hparams
    deltas, rest = _trained_parts(expert, state)
    base = load_backbone(
        hp.backbone,
        expert.family,
        torch_dtype=parse_dtype(hp.torch_dtype),
        trust_remote_code=hp.trust_remote_code,
        gguf_file=hp.gguf_file,
    )
    base_state = base.state_dict()
    for name, tuned in rest.items():
        if name not in base_state:
            raise ValueError(f"trained parameter {name!r} of task {expert.task!r} is not in the reloaded {hp.backbone}")
        dtype = _delta_dtype(tuned)
        delta = tuned.detach().to("cpu", dtype) - base_state[name].to(dtype)
        if skip_zero and not delta.any():
            continue
        deltas[name] = delta
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    lora = None
    if expert.lora is not None:
        lora = LoraMeta(
            r=expert.lora.r,
            alpha=expert.lora.alpha,
            scale=expert.lora.scale,
            target_modules=expert.lora.resolved_targets(expert.family, base),
            dropout=expert.lora.dropout,
        )
    meta = TaskVectorMeta(
        task=expert.task,
        kind="lora" if expert.lora is not None else "dense",
        base_model=hp.backbone,
        base_fingerprint=fingerprint(base),
        family=expert.family,
        torch_dtype=hp.torch_dtype,
        gguf_file=hp.gguf_file,
        label_names=list(expert.label_names or []),
        task_type=expert.task_type,
        lora=lora,
        head=expert.head_config(),
        metrics=dict(metrics or {}),
        versions=library_versions(),
    )
    del base, base_state
    return deltas, head, meta


def validation_metrics(trainer: Trainer) -> dict[str, float]:
    """Scalar ``val/...`` entries of ``trainer.callback_metrics`` as floats."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith("val/") and isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
    return out


class TaskVectorCallback(Callback):
    """Write the expert's task vector (deltas, head, meta.json, input statistics) when fitting ends; see the
    module docstring.

    Args:
        output_dir: the task vector folder; None means ``<trainer.default_root_dir>/task_vectors/<task>``. An
            existing folder is replaced atomically.
        skip_zero: leave out dense deltas that are exactly zero.
        statistics_examples: training examples whose linear-layer input Grams are recorded (RegMean's statistics;
            default 256, FusionBench's ``num_regmean_examples``); 0 records none.
        statistics_layers: regexes of weight names to record (default: every trained linear layer).
        statistics_seed: seed of the sample of training examples.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        skip_zero: bool = True,
        statistics_examples: int = DEFAULT_EXAMPLES,
        statistics_layers: list[str] | None = None,
        statistics_seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(statistics_examples, bool) or not isinstance(statistics_examples, int) or statistics_examples < 0:
            raise ValueError(f"statistics_examples={statistics_examples!r}: expected an integer >= 0")
        self.output_dir = output_dir
        self.skip_zero = skip_zero
        self.statistics_examples = statistics_examples
        self.statistics_layers = statistics_layers
        self.statistics_seed = statistics_seed
        self.written: Path | None = None

    def record_statistics(self, trainer: Trainer, pl_module: ExpertModule) -> Grams | None:
        """The input Grams on every rank (a collective under DDP), or ``None`` when none are asked for."""
        if self.statistics_examples == 0:
            return None
        loader = trainer.train_dataloader
        if loader is None:  # nothing was trained on (a fit of 0 steps, a test's stand-in trainer)
            rank_zero_warn(f"task {pl_module.task!r}: no training DataLoader; no input statistics recorded")
            return None
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"task {pl_module.task!r}: input statistics need one training DataLoader, got "
                f"{type(loader).__name__}; pass statistics_examples=0 to record none"
            )
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        targets = recorded_layers(pl_module.backbone, pl_module.lora is not None, self.statistics_layers)
        return expert_grams(
            pl_module, loader, self.statistics_examples, targets, seed=self.statistics_seed,
            rank=trainer.global_rank, world=trainer.world_size, reduce=reduce,
        )  # fmt: skip

    def resolve_output_dir(self, trainer: Trainer, pl_module: ExpertModule) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.default_root_dir) / "task_vectors" / pl_module.task

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, ExpertModule):
            raise ValueError(f"TaskVectorCallback needs an ExpertModule, got {type(pl_module).__name__}")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        grams = self.record_statistics(trainer, pl_module)  # every rank: an all-reduce under DDP
        state = gather_state_dict(trainer, pl_module)  # every rank: a collective under FSDP
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                folder = self.resolve_output_dir(trainer, pl_module)
                # Before W_0 is reloaded: a disk that cannot hold the task vector is refused at once.
                needed = estimate_task_vector_bytes(pl_module, state)
                needed += statistics_bytes(grams.sums) if grams is not None else 0
                check_free_space({folder: needed}, "task vector")
                deltas, head, meta = build_task_vector(
                    pl_module, state, validation_metrics(trainer), skip_zero=self.skip_zero
                )
                if grams is not None:
                    meta.statistics = statistics_section(grams.sums, grams.rows, grams.examples)
                    self.written = write_task_vector_with_statistics(folder, deltas, head, meta, grams.sums)
                else:
                    self.written = write_task_vector(folder, deltas, head, meta)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks are released
                error = err
        del state
        # Every rank learns whether rank 0 wrote: a failure there must not leave the others waiting in a barrier
        # until the collective timeout (30 minutes by default).
        failed = trainer.strategy.broadcast(error is not None, src=0)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("global rank 0 failed to write the task vector; see its error")
