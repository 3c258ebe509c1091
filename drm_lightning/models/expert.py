"""The expert: a pretrained backbone plus one task head, fine-tuned fully or with LoRA.

One ``LightningModule`` covers every family (see ``models/backbone.py``). Every family's ``forward`` returns
class logits ``[batch, num_labels]``; for the label-word families (T5 ``seq2seq``, causal ``decoder_lm``) they are
the log-likelihoods of each label word under the model's own LM head (``models/label_words.py``), so accuracy means
"the most likely label word", while the training loss is the usual LM cross-entropy on the true label word. A
``decoder_lm`` expert keeps its ``lm_head`` frozen (with tied embeddings, the input embeddings too: one tensor), so
no task vector holds it and every merged model keeps the base's head and stays a working causal LM.

Logged keys: ``train/loss``; ``val/<task>/loss``, ``val/<task>/<metric>``; ``test/<task>/loss``,
``test/<task>/<metric>`` with ``<metric>`` in ``accuracy | mcc | f1`` (F1 is macro-averaged).

This module is the ``LightningModule`` itself: construction, ``setup`` from the datamodule and the training /
evaluation steps. The rest is one module each: settings checks (and what ``setup`` takes from the datamodule)
``settings.py``, the per-family forward pass
``forward.py``, the heads ``heads.py``, metrics ``metrics.py``, the optimiser ``optim.py``, what a checkpoint holds
(generator states, LoRA's trainable part) ``checkpoint.py``, and rebuilding an expert from a task vector folder
``rebuild.py``.

Why it stays about 430 lines: what is left are Lightning's hooks and the state they share (the backbone, the head
built once the label names are known, the metric collections, the label-word targets, the generator states of a
checkpoint); each hook is a few lines over a helper module, and splitting them further would only make mixins or
functions that take the module apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MetricCollection
from typing_extensions import override

from drm_lightning.models.backbone import LABEL_WORD_FAMILIES, load_backbone, parse_dtype
from drm_lightning.models.checkpoint import (
    RNG_KEY,
    drop_frozen,
    fill_frozen,
    gather_rng_states,
    rank_rng_states,
    rng_states,
    set_rng_states,
    split_frozen,
)
from drm_lightning.models.forward import batch_candidates, head_logits
from drm_lightning.models.heads import ZeroShotHead, build_head, task_head
from drm_lightning.models.label_words import candidate_logprobs, load_label_targets, target_loss
from drm_lightning.models.lora import LoraSettings, add_lora
from drm_lightning.models.metrics import check_metrics, metric_collection
from drm_lightning.models.optim import adamw_warmup_decay
from drm_lightning.models.rebuild import expert_from_task_vector, preloaded_backbone, recorded_head
from drm_lightning.models.settings import (
    check_expert_settings,
    datamodule_settings,
)

__all__ = ["ExpertModule"]


class ExpertModule(LightningModule):
    """A fine-tuned expert for one classification task.

    Args:
        backbone: hub id, local ``save_pretrained`` folder or ``package://<module>/<subpath>``.
        family: ``encoder | decoder | decoder_lm | seq2seq | vision | clip`` (``decoder_lm``: a causal LM that scores
            label words through its own ``lm_head``; ``decoder``: a new classification head on the last token;
            ``clip``: CLIP's vision tower under a frozen zero-shot head made from its text tower).
        task: task name; metric keys are ``val/<task>/<metric>``.
        label_names: class names in label-index order (T5, ``decoder_lm``: the answer words). None takes them from
            the datamodule's ``label_names`` at setup.
        lora: LoRA settings; None fine-tunes every backbone weight.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay for matrices (biases and norms get none).
        warmup_ratio: fraction of the steps with linear warmup; then linear decay to zero.
        metrics: subset of ``accuracy, mcc, f1``; None takes the datamodule's ``metrics`` (else accuracy).
        pooling: encoder head pooling, ``cls`` or ``mean`` (sentence-embedding models such as MiniLM: mean).
        head_dropout: dropout inside the encoder head.
        torch_dtype: backbone weights dtype (``float32 | float16 | bfloat16 | float64``); None keeps the default.
        trust_remote_code: passed to ``from_pretrained``; off unless asked, as it runs code from the model folder.
        gguf_file: GGUF file inside ``backbone`` (SmolLM2-style folders).
        tokenizer: where the label-word families load the tokenizer for their label words; None: ``backbone``.
        task_type: ``classification``, or ``multiple_choice`` (``label_names`` name the option positions; encoders
            score each (context, option) pair with a one-output head, label-word families each option's
            likelihood; see ``data/choice.py``). Taken from the datamodule's ``task_type`` by the CLI and pipeline.
        templates: ``clip``: prompt templates of the class names (``{}`` where the name goes) whose text embeddings
            make the zero-shot head; None takes the datamodule's ``templates`` at setup, else ``a photo of a {}.``.
    """

    def __init__(
        self,
        backbone: str,
        family: Literal["encoder", "decoder", "decoder_lm", "seq2seq", "vision", "clip"] = "encoder",
        task: str = "task",
        label_names: list[str] | None = None,
        lora: LoraSettings | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        metrics: list[Literal["accuracy", "mcc", "f1"]] | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        head_dropout: float = 0.1,
        torch_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        task_type: Literal["classification", "multiple_choice"] = "classification",
        templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        lora = check_expert_settings(
            family=family,
            task=task,
            task_type=task_type,
            lora=lora,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            metrics=metrics,
            pooling=pooling,
            torch_dtype=torch_dtype,
        )
        dtype = parse_dtype(torch_dtype)
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None  # plain dict: weights_only checkpoints

        self.family = family
        self.task = task
        self.task_type = task_type
        self.lora = lora
        module = preloaded_backbone()
        if module is None:
            module = load_backbone(
                backbone, family, torch_dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=gguf_file
            )
        self.backbone_config = module.config
        if family == "decoder_lm":
            module.get_output_embeddings().weight.requires_grad_(False)  # the base's LM head is every task's head
        self.backbone: nn.Module = add_lora(module, lora, family) if lora is not None else module
        self.head: nn.Module | None = None
        self.label_names: list[str] | None = None
        self.metric_names: list[str] | None = list(metrics) if metrics is not None else None
        self._frozen_fingerprint: str | None = None
        if label_names is not None:
            self._build_task(list(label_names))

    # ---- construction ------------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise ValueError(f"task {self.task!r}: label_names are not known yet (pass label_names or a datamodule)")
        return len(self.label_names)

    def _hidden_size(self) -> int:
        size = getattr(self.backbone_config, "hidden_size", None) or getattr(self.backbone_config, "d_model", None)
        if not isinstance(size, int):
            raise ValueError(f"backbone {self.hparams.backbone!r}: its config has no hidden_size")
        return size

    def _build_task(self, label_names: list[str]) -> None:
        """Build the head, the metrics and (T5) the label-word targets once the label names are known."""
        if len(label_names) < 2 or len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names={label_names!r}: expected at least two distinct names")
        self.label_names = label_names
        self.hparams["label_names"] = label_names
        if self.family == "clip":
            self.head = self._zero_shot_head(label_names)
        elif self.family in LABEL_WORD_FAMILIES:
            if self.task_type != "multiple_choice":  # options come tokenised with each batch
                self._build_label_targets(label_names)
        else:
            hp = self.hparams
            self.head = task_head(
                self.family, self.task_type, self._hidden_size(), len(label_names), hp.pooling, hp.head_dropout
            )
        ref = next(self.backbone.parameters())
        if self.head is not None:
            self.head.to(ref.device)
        self._build_metrics()

    def _zero_shot_head(self, label_names: list[str]) -> ZeroShotHead:
        """The frozen class embeddings of ``label_names`` (or, in ``from_task_vector``, the recorded head's shape)."""
        recorded = recorded_head()
        if recorded is not None:
            return build_head(recorded)
        from drm_lightning.models.zeroshot import zero_shot_head

        templates = self.hparams.templates or ["a photo of a {}."]
        self.hparams["templates"] = list(templates)
        return zero_shot_head(
            self.hparams.backbone,
            label_names,
            templates,
            tokenizer=self.hparams.tokenizer,
            trust_remote_code=self.hparams.trust_remote_code,
        )

    def _build_metrics(self) -> None:
        names = self.metric_names or ["accuracy"]
        for stage in ("val", "test"):
            collection = metric_collection(names, len(self.label_names), prefix=f"{stage}/{self.task}/")
            setattr(self, f"{stage}_metrics", collection)

    def _build_label_targets(self, label_names: list[str]) -> None:
        source = self.hparams.tokenizer or self.hparams.backbone
        trust = self.hparams.trust_remote_code
        ids, mask = load_label_targets(source, label_names, self.family, trust_remote_code=trust)
        device = next(self.backbone.parameters()).device
        self.register_buffer("label_target_ids", ids.to(device), persistent=False)
        self.register_buffer("label_target_mask", mask.to(device), persistent=False)

    @override
    def setup(self, stage: str) -> None:
        """Take label names (and metrics, templates) from the datamodule when they were not given."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        taken = datamodule_settings(datamodule, task=self.task, family=self.family, task_type=self.task_type)
        if self.metric_names is None and taken.metrics:
            check_metrics(taken.metrics)
            self.metric_names = taken.metrics
            self.hparams["metrics"] = list(taken.metrics)
            if self.label_names is not None:
                self._build_metrics()
        if self.family == "clip" and self.hparams.templates is None and taken.templates:
            self.hparams["templates"] = taken.templates
        if self.label_names is None:
            if taken.label_names is None:
                raise ValueError(
                    f"task {self.task!r}: label_names not given and the datamodule has no label_names property"
                )
            self._build_task(taken.label_names)
        elif taken.label_names is not None and taken.label_names != self.label_names:
            raise ValueError(
                f"task {self.task!r}: model label_names={self.label_names!r} differ from the datamodule's "
                f"{taken.label_names!r}"
            )

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``[batch, num_labels]`` (label-word families: per-label log-likelihood of the label word)."""
        if self.family in LABEL_WORD_FAMILIES:
            return self._label_scores(batch)[0]
        if self.head is None:
            raise ValueError(f"task {self.task!r}: no head yet (label_names unknown)")
        return head_logits(self.backbone, self.head, self.family, self.task_type, batch, self.task)

    def _candidates(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target tokens ``(ids [B, C, L], mask [B, C, L])`` of every input (``batch_candidates``)."""
        targets = None  # multiple choice: options come with each batch; before setup: label names unknown
        if self.task_type != "multiple_choice" and self.label_names is not None:
            targets = (self.label_target_ids, self.label_target_mask)
        return batch_candidates(batch, self.family, self.task_type, self.task, targets)

    def _label_scores(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B, C], token log-probs [B, C, L])`` of every candidate as the answer to every input."""
        ids, mask = self._candidates(batch)
        logp = candidate_logprobs(self.backbone, self.family, batch["input_ids"], batch["attention_mask"], ids, mask)
        return logp.sum(dim=-1), logp

    def _step(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` for evaluation (label words: the LM loss on the true label word)."""
        labels = batch["labels"]
        if self.family in LABEL_WORD_FAMILIES:
            scores, logp = self._label_scores(batch)
            rows = torch.arange(labels.shape[0], device=labels.device)
            true_tokens = self._candidates(batch)[1][rows, labels].sum()
            return -logp[rows, labels].sum() / true_tokens, scores
        logits = self(batch)
        return F.cross_entropy(logits.float(), labels), logits

    # ---- Lightning hooks ---------------------------------------------------------------------------------------

    @override
    def on_fit_start(self) -> None:
        # ``from_pretrained`` returns the backbone in eval mode and Lightning 2.6 keeps submodule modes as found
        # (validation restores the modes it captured): without this, dropout would stay off while training.
        self.train()
        self._log_data_hyperparameters()

    def _log_data_hyperparameters(self) -> None:
        """Log the datamodule's settings as ``data/<name>`` beside the model's own hyperparameters.

        Why not Lightning's own merge of the two: the datamodule and the model both have ``tokenizer`` and ``metrics``
        (the model's come resolved from the datamodule's, e.g. ``None`` -> ``["accuracy"]``), and Lightning refuses
        to log keys that differ. So the datamodules save theirs with ``logger=False`` and they are logged here.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        hparams = getattr(datamodule, "hparams", None)
        if self.logger is None or not hparams:
            return
        for logger in self.loggers:
            logger.log_hyperparams({f"data/{key}": value for key, value in hparams.items()})

    @override
    def on_train_epoch_start(self) -> None:
        self.train()  # the same, for a fit that starts from modes changed between epochs (e.g. by a callback)

    @override
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        if self.family in LABEL_WORD_FAMILIES:
            ids, mask = self._candidates(batch)
            rows = torch.arange(labels.shape[0], device=labels.device)
            ids, mask = ids[rows, labels], mask[rows, labels]
            loss = target_loss(self.backbone, self.family, batch["input_ids"], batch["attention_mask"], ids, mask)
        else:
            loss = F.cross_entropy(self(batch).float(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def _eval_step(self, batch: Mapping[str, torch.Tensor], stage: str, metrics: MetricCollection) -> None:
        labels = batch["labels"]
        loss, logits = self._step(batch)
        metrics.update(logits, labels)
        self.log(f"{stage}/{self.task}/loss", loss, batch_size=labels.shape[0], sync_dist=True)
        self.log_dict(metrics, batch_size=labels.shape[0])

    @override
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    @override
    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on biases and norms) with linear warmup, then linear decay to zero, stepped per batch."""
        hp = self.hparams
        steps = self.trainer.estimated_stepping_batches
        return adamw_warmup_decay(self.parameters(), hp.learning_rate, hp.weight_decay, hp.warmup_ratio, steps)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """State-dict keys of the trained parameters (LoRA: adapter factors and head)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    #: Checkpoint key of the random-number-generator states (see ``on_save_checkpoint``).
    RNG_KEY = RNG_KEY
    rng_states = staticmethod(rng_states)
    set_rng_states = staticmethod(set_rng_states)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the generators' states, and for LoRA drop the frozen base weights.

        Lightning 2.6 saves no RNG state, so without it a resumed fit draws other dropout masks than an
        uninterrupted one. ``ModelCheckpoint`` saves at the end of validation; the next draw in both runs is the
        next epoch's ``DataLoader`` iterator seed, then its dropout. Under DDP each rank's generators differ (their
        batches do), so the states of every global rank are gathered (Lightning calls this hook on every rank) and
        stored as a list in rank order.
        """
        world_size = self._trainer.world_size if self._trainer is not None else 1
        checkpoint[RNG_KEY] = gather_rng_states(self.rng_states(), world_size, self.all_gather, self.device)
        if self.lora is None or "state_dict" not in checkpoint:
            return
        self._frozen_fingerprint = drop_frozen(checkpoint, self.trainable_names(), self._frozen_fingerprint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the generators' states when a fit resumes (not for ``load_from_checkpoint`` or evaluation, where
        reseeding the caller's generators would surprise), and for LoRA fill back the frozen base weights.

        Lightning calls this before ``on_fit_start`` and the sanity check (which it runs under ``isolate_rng`` and
        skips on resume); the first draw after it is the train ``DataLoader`` iterator seed, as in the
        uninterrupted run after its save.
        """
        saved = checkpoint.get(RNG_KEY)
        if saved and self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            self.set_rng_states(rank_rng_states(saved, self.trainer.global_rank, self.trainer.world_size))
        frozen = split_frozen(self.state_dict(), self.trainable_names())[1]
        fill_frozen(checkpoint, frozen, self.hparams.backbone)

    # ---- task vectors ------------------------------------------------------------------------------------------

    def head_config(self) -> dict[str, Any]:
        """Constructor arguments of the head (``meta.json["head"]``); empty for the label-word families, whose LM
        head is the backbone's."""
        return self.head.config() if self.head is not None else {}

    @classmethod
    def from_task_vector(
        cls,
        folder: str | os.PathLike[str],
        backbone: str | nn.Module | None = None,
        with_task_vector: bool = False,
        *,
        torch_dtype: str | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
    ) -> ExpertModule:
        """Rebuild an expert for evaluation from a task vector folder (its head, label names and family).

        Args:
            folder: a task vector folder written by ``TaskVectorCallback``.
            backbone: None loads ``meta.base_model``; a string loads that (e.g. merged) model folder; a module is
                used as is (shared, not copied).
            with_task_vector: add the folder's own deltas (dense, or ``scale * B @ A``) onto the backbone weights,
                which reproduces the fine-tuned expert. With a module passed in, that module is changed in place.
            torch_dtype, gguf_file, trust_remote_code: how to load ``meta.base_model``; ``torch_dtype`` and
                ``gguf_file`` default to the values meta.json records (how the expert loaded it, which its
                fingerprint depends on). A model named by ``backbone`` takes ``torch_dtype`` only when given (else
                its checkpoint's dtype), and never ``gguf_file``, as merged models are saved as safetensors.
        """
        return expert_from_task_vector(
            cls,
            folder,
            backbone,
            with_task_vector,
            torch_dtype=torch_dtype,
            gguf_file=gguf_file,
            trust_remote_code=trust_remote_code,
        )
