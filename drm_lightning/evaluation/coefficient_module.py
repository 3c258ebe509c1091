"""The ``LightningModule`` that learns merging coefficients; ``Trainer.fit`` runs its loop.

Its only trainable parameter is the coefficient matrix ``[groups, columns]`` (``coefficients.CoefficientLayout``).
Each step builds the merged weights ``W = W_0 + Σ_k λ_{g(n),k}·D_{n,k}`` of every learned parameter ``n`` and runs
each task's batch through that task's frozen expert (its head on the one shared backbone) with
``torch.func.functional_call``, so the backbone's own weights are never changed and the gradient reaches only the
coefficients. The loss is the sum over tasks of the objective's batch mean: the entropy of the predicted class
distribution (AdaMerging; the batch's labels are never read) or the cross-entropy against the labels.

Dropout and other train-mode behaviour stay off (the experts are kept in eval mode): the coefficients are fitted to
the model that will be evaluated. Checkpoints hold the coefficients only; the deltas and the base come from the
merged folder again.

Logged keys: ``learn/loss`` (per step), ``learn/<task>/loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader
from typing_extensions import override

from drm_lightning.evaluation.coefficients import CoefficientLayout, LearnSettings, combine

BACKBONE_PREFIX = "backbone."
COEFFICIENTS_KEY = "coefficients"


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over a batch ``[B, C]``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


class CoefficientModule(LightningModule):
    """Merging coefficients over a frozen base and frozen deltas, trained on every task at once.

    Args:
        experts: task -> the expert (``ExpertModule.from_task_vector`` on one shared base backbone; frozen here).
        stacks: parameter name -> ``[K, *shape]`` float32 deltas (``read_merged_stacks`` / ``read_task_stacks``).
        layout: which coefficient row scales which parameter; ``layout.columns`` has K entries.
        settings: the objective, learning rate, data split.
        init: the initial value of every coefficient.
        datamodules: task -> datamodule, for ``train_dataloader`` (batches of ``settings.split``).
    """

    def __init__(
        self,
        experts: Mapping[str, nn.Module],
        stacks: Mapping[str, torch.Tensor],
        layout: CoefficientLayout,
        settings: LearnSettings,
        init: float,
        datamodules: Mapping[str, LightningDataModule] | None = None,
    ) -> None:
        super().__init__()
        if list(stacks) != list(layout.names):
            raise ValueError("stacks: keys differ from layout.names (build the layout from the same stacks)")
        self.layout = layout
        self.settings = settings
        self.tasks = list(experts)
        self.experts = nn.ModuleDict(dict(experts))
        for param in self.experts.parameters():
            param.requires_grad_(False)
        backbone = next(iter(experts.values())).backbone
        state = dict(backbone.named_parameters())
        for name in layout.names:
            if name not in state:
                raise ValueError(f"stacks: {name!r} is not a parameter of the backbone")
        self.coefficients = nn.Parameter(torch.full(layout.shape, float(init), dtype=torch.float32))
        self._deltas = nn.ParameterList([nn.Parameter(stacks[n], requires_grad=False) for n in layout.names])
        self._datamodules = dict(datamodules or {})
        self.strict_loading = False

    # ---- the merged weights ------------------------------------------------------------------------------------

    def merged_delta(self, index: int) -> torch.Tensor:
        """``Σ_k λ_{g,k}·D_k`` of the ``index``-th learned parameter (differentiable in the coefficients)."""
        return combine(self.coefficients[self.layout.rows[index]], self._deltas[index])

    def merged_parameters(self) -> dict[str, torch.Tensor]:
        """``{backbone.<name>: W_0 + Σ_k λ·D_k}`` for every learned parameter: what ``functional_call`` swaps in."""
        backbone = self.experts[self.tasks[0]].backbone
        state = dict(backbone.named_parameters())
        out = {}
        for i, name in enumerate(self.layout.names):
            base = state[name]
            out[BACKBONE_PREFIX + name] = (base.float() + self.merged_delta(i)).to(base.dtype)
        return out

    def task_loss(self, task: str, batch: Mapping[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective on one task's batch, through the task's frozen head on the merged backbone."""
        logits = functional_call(self.experts[task], weights, (batch,), tie_weights=True, strict=False)
        if self.settings.objective == "entropy":
            return entropy(logits)
        return F.cross_entropy(logits.float(), batch["labels"])

    # ---- Lightning hooks ---------------------------------------------------------------------------------------

    @override
    def on_train_epoch_start(self) -> None:
        self.experts.eval()  # the coefficients fit the model as it is evaluated: no dropout

    @override
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        weights = self.merged_parameters()
        total = torch.zeros((), device=self.coefficients.device)
        for task in self.tasks:
            if task not in batch or batch[task] is None:
                continue
            loss = self.task_loss(task, batch[task], weights)
            size = next(iter(batch[task].values())).shape[0]
            self.log(f"learn/{task}/loss", loss.detach(), batch_size=size)
            total = total + loss
        self.log("learn/loss", total.detach(), prog_bar=True, batch_size=1)
        return total

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.settings.lr)

    @override
    def train_dataloader(self) -> CombinedLoader:
        """One batch of every task per step (``max_size_cycle``: smaller splits start over)."""
        loaders = {}
        for task in self.tasks:
            if task not in self._datamodules:
                raise ValueError(f"datamodules: no datamodule for task {task!r}")
            loaders[task] = split_loader(self._datamodules[task], self.settings.split, self.settings.batch_size)
        return CombinedLoader(loaders, mode="max_size_cycle")

    @override
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the coefficients: the base, the heads and the deltas are the merged folder's and the experts'."""
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if k.endswith(COEFFICIENTS_KEY) and "experts." not in k}

    def learned(self) -> torch.Tensor:
        """The coefficients as a detached CPU float32 ``[groups, columns]`` tensor."""
        return self.coefficients.detach().float().cpu().clone()


def split_loader(datamodule: LightningDataModule, split: str, batch_size: int | None = None) -> Any:
    """The datamodule's loader of ``split`` (set up for it first); ``batch_size`` given: the same dataset, order
    and collation in batches of that size."""
    stage = {"train": "fit", "validation": "validate", "test": "test"}[split]
    datamodule.setup(stage)
    if split == "train":
        loader = datamodule.train_dataloader()
    else:
        loader = datamodule.val_dataloader() if split == "validation" else datamodule.test_dataloader()
    if batch_size is None or batch_size == loader.batch_size:
        return loader
    return DataLoader(
        loader.dataset, batch_size=batch_size, sampler=loader.sampler, collate_fn=loader.collate_fn,
        num_workers=loader.num_workers, pin_memory=loader.pin_memory,
    )  # fmt: skip
