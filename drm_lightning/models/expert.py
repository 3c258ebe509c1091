"""The expert: a pretrained backbone plus one task head, fine-tuned fully or with LoRA.

One ``LightningModule`` covers every family (see ``models/backbone.py``). Every family's ``forward`` returns
class logits ``[batch, num_labels]``; for the label-word families (T5 ``seq2seq``, causal ``decoder_lm``) they are
the log-likelihoods of each label word under the model's own LM head (``models/label_words.py``), so accuracy means
"the most likely label word", while the training loss is the usual LM cross-entropy on the true label word. A
``decoder_lm`` expert keeps its ``lm_head`` frozen (with tied embeddings, the input embeddings too: one tensor), so
no task vector holds it and every merged model keeps the base's head and stays a working causal LM.

Logged keys: ``train/loss``; ``val/<task>/loss``, ``val/<task>/<metric>``; ``test/<task>/loss``,
``test/<task>/<metric>`` with ``<metric>`` in ``accuracy | mcc | f1`` (F1 is macro-averaged).

LoRA checkpoints hold only what is trained (adapter factors and head): the frozen base weights are dropped in
``on_save_checkpoint`` and filled back from the freshly loaded backbone in ``on_load_checkpoint`` after checking
their fingerprint, so ``--ckpt_path`` resume and ``load_from_checkpoint`` work with strict loading.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Accuracy, F1Score, MatthewsCorrCoef, MetricCollection
from typing_extensions import override

from drm_lightning.models.backbone import FAMILIES, LABEL_WORD_FAMILIES, check_family, load_backbone, parse_dtype
from drm_lightning.models.heads import (
    POOLINGS,
    ChoiceHead,
    DecoderHead,
    EncoderHead,
    VisionHead,
    ZeroShotHead,
    build_head,
)
from drm_lightning.models.label_words import candidate_logprobs, label_targets, target_loss
from drm_lightning.models.lora import LoraSettings, add_lora
from drm_lightning.models.resolve import resolve_pretrained
from drm_lightning.task_vectors.fingerprint import fingerprint_matches, fingerprint_state, short_fingerprint

METRICS = ("accuracy", "mcc", "f1")
#: Families that can answer multiple-choice tasks: a one-output head per (context, option) pair, or option likelihood.
CHOICE_FAMILIES = ("encoder", *LABEL_WORD_FAMILIES)
TASK_TYPES = ("classification", "multiple_choice")
#: The ``MultipleChoiceDataModule(choice_format=...)`` each family reads.
CHOICE_FORMAT_OF = {"encoder": "pairs", "seq2seq": "targets", "decoder_lm": "continuations"}
_CKPT_KEY = "drm_lightning"

# Lets ``from_task_vector`` hand an already-built backbone module to ``__init__`` without making a live module a
# constructor argument (constructor arguments must stay plain values: they are saved as hyperparameters).
_PRELOADED_BACKBONE: ContextVar[nn.Module | None] = ContextVar("drm_lightning_preloaded_backbone", default=None)


# The same for a recorded head: ``from_task_vector`` rebuilds a zero-shot head from meta.json, not from a text encoder.
_RECORDED_HEAD: ContextVar[dict[str, Any] | None] = ContextVar("drm_lightning_recorded_head", default=None)


@contextmanager
def _recorded_head(config: dict[str, Any]) -> Iterator[None]:
    token = _RECORDED_HEAD.set(config)
    try:
        yield
    finally:
        _RECORDED_HEAD.reset(token)


@contextmanager
def _preloaded(module: nn.Module) -> Iterator[None]:
    token = _PRELOADED_BACKBONE.set(module)
    try:
        yield
    finally:
        _PRELOADED_BACKBONE.reset(token)


def _metric(name: str, num_classes: int):
    if name == "accuracy":
        return Accuracy(task="multiclass", num_classes=num_classes)
    if name == "mcc":
        return MatthewsCorrCoef(task="multiclass", num_classes=num_classes)
    return F1Score(task="multiclass", num_classes=num_classes, average="macro")


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
        check_family(family)
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type={task_type!r}: expected one of {TASK_TYPES}")
        if task_type == "multiple_choice" and family not in CHOICE_FAMILIES:
            raise ValueError(
                f"task_type='multiple_choice': family {family!r} cannot score options; use one of {CHOICE_FAMILIES}"
            )
        if isinstance(lora, Mapping):  # how hyperparameters come back from a checkpoint
            lora = LoraSettings(**lora)
        if lora is not None and not isinstance(lora, LoraSettings):
            raise ValueError(f"lora={lora!r}: expected LoraSettings, a dict of its fields, or None")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate!r}: expected a positive number")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r}: expected a number >= 0")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio!r}: expected a number in [0, 1)")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
        if not task or "/" in task:
            raise ValueError(f"task={task!r}: expected a non-empty name without '/' (it is part of metric keys)")
        if metrics is not None:
            self._check_metrics(metrics)
        dtype = parse_dtype(torch_dtype)
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None  # plain dict: weights_only checkpoints

        self.family = family
        self.task = task
        self.task_type = task_type
        self.lora = lora
        module = _PRELOADED_BACKBONE.get()
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

    @staticmethod
    def _check_metrics(metrics: list[str]) -> None:
        if isinstance(metrics, str) or not metrics or any(m not in METRICS for m in metrics):
            raise ValueError(f"metrics={metrics!r}: expected a non-empty list drawn from {METRICS}")

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
        if self.task_type == "multiple_choice":
            if self.family == "encoder":
                self.head = ChoiceHead(self._hidden_size(), self.hparams.pooling, self.hparams.head_dropout)
        elif self.family == "encoder":
            self.head = EncoderHead(
                self._hidden_size(), len(label_names), self.hparams.pooling, self.hparams.head_dropout
            )
        elif self.family == "decoder":
            self.head = DecoderHead(self._hidden_size(), len(label_names))
        elif self.family == "vision":
            self.head = VisionHead(self._hidden_size(), len(label_names))
        elif self.family == "clip":
            self.head = self._zero_shot_head(label_names)
        elif self.family in LABEL_WORD_FAMILIES:
            self._build_label_targets(label_names)
        ref = next(self.backbone.parameters())
        if self.head is not None:
            self.head.to(ref.device)
        self._build_metrics()

    def _zero_shot_head(self, label_names: list[str]) -> ZeroShotHead:
        """The frozen class embeddings of ``label_names`` (or, in ``from_task_vector``, the recorded head's shape)."""
        recorded = _RECORDED_HEAD.get()
        if recorded is not None:
            return build_head(recorded)
        from drm_lightning.models.zeroshot import class_embeddings

        templates = self.hparams.templates or ["a photo of a {}."]
        self.hparams["templates"] = list(templates)
        weight, scale = class_embeddings(
            self.hparams.backbone,
            label_names,
            templates,
            tokenizer=self.hparams.tokenizer,
            trust_remote_code=self.hparams.trust_remote_code,
        )
        head = ZeroShotHead(weight.shape[1], len(label_names), scale)
        head.weight.copy_(weight)
        return head

    def _build_metrics(self) -> None:
        names = self.metric_names or ["accuracy"]
        for stage in ("val", "test"):
            collection = {name: _metric(name, len(self.label_names)) for name in names}
            setattr(self, f"{stage}_metrics", MetricCollection(collection, prefix=f"{stage}/{self.task}/"))

    def _build_label_targets(self, label_names: list[str]) -> None:
        from transformers import AutoTokenizer

        source = self.hparams.tokenizer or self.hparams.backbone
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_pretrained(source), trust_remote_code=self.hparams.trust_remote_code
        )
        ids, mask = label_targets(tokenizer, label_names, self.family, source)
        device = next(self.backbone.parameters()).device
        self.register_buffer("label_target_ids", ids.to(device), persistent=False)
        self.register_buffer("label_target_mask", mask.to(device), persistent=False)

    @override
    def setup(self, stage: str) -> None:
        """Take label names (and metrics, templates) from the datamodule when they were not given."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_metrics = getattr(datamodule, "metrics", None) if datamodule is not None else None
        if self.metric_names is None and dm_metrics:
            self._check_metrics(list(dm_metrics))
            self.metric_names = list(dm_metrics)
            self.hparams["metrics"] = list(dm_metrics)
            if self.label_names is not None:
                self._build_metrics()
        dm_type = getattr(datamodule, "task_type", "classification") if datamodule is not None else self.task_type
        if dm_type != self.task_type:
            raise ValueError(
                f"task {self.task!r}: the model's task_type={self.task_type!r} differs from the datamodule's "
                f"{dm_type!r}"
            )
        dm_format = getattr(datamodule, "choice_format", None) if datamodule is not None else None
        if self.task_type == "multiple_choice" and dm_format not in (None, CHOICE_FORMAT_OF[self.family]):
            raise ValueError(
                f"task {self.task!r}: the datamodule's choice_format={dm_format!r} is not what a {self.family} model "
                f"reads; set choice_format: {CHOICE_FORMAT_OF[self.family]}"
            )
        dm_templates = getattr(datamodule, "templates", None) if datamodule is not None else None
        if self.family == "clip" and self.hparams.templates is None and dm_templates:
            self.hparams["templates"] = list(dm_templates)
        dm_labels = getattr(datamodule, "label_names", None) if datamodule is not None else None
        if self.label_names is None:
            if dm_labels is None:
                raise ValueError(
                    f"task {self.task!r}: label_names not given and the datamodule has no label_names property"
                )
            self._build_task(list(dm_labels))
        elif dm_labels is not None and list(dm_labels) != self.label_names:
            raise ValueError(
                f"task {self.task!r}: model label_names={self.label_names!r} differ from the datamodule's "
                f"{list(dm_labels)!r}"
            )

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``[batch, num_labels]`` (label-word families: per-label log-likelihood of the label word)."""
        if self.family in LABEL_WORD_FAMILIES:
            return self._label_scores(batch)[0]
        if self.head is None:
            raise ValueError(f"task {self.task!r}: no head yet (label_names unknown)")
        if self.family == "vision":
            hidden = self.backbone(pixel_values=batch["pixel_values"]).last_hidden_state
            return self.head(hidden)
        if self.family == "clip":
            return self.head(self.backbone(pixel_values=batch["pixel_values"]).image_embeds)
        if self.task_type == "multiple_choice":
            return self._choice_logits(batch)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.family == "encoder" and "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        if self.family == "decoder":
            kwargs["use_cache"] = False
        hidden = self.backbone(**kwargs).last_hidden_state
        return self.head(hidden, batch["attention_mask"])

    def _choice_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Encoder multiple choice: each (context, option) pair ``[B, C, T]`` through backbone and head: ``[B, C]``."""
        ids = batch["input_ids"]
        if ids.dim() != 3:
            raise ValueError(
                f"task {self.task!r}: a multiple-choice batch for an encoder needs input_ids [batch, options, tokens] "
                f"(choice_format: pairs), got shape {tuple(ids.shape)}"
            )
        size, num = ids.shape[:2]
        flat = {k: batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.backbone(**flat).last_hidden_state
        return self.head(hidden, flat["attention_mask"]).view(size, num)

    def _candidates(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target tokens ``(ids [B, C, L], mask [B, C, L])``: the label words, the same for every input, or (multiple
        choice) each input's own options."""
        if self.task_type == "multiple_choice":
            if "choice_ids" not in batch:
                kind = "targets" if self.family == "seq2seq" else "continuations"
                raise ValueError(
                    f"task {self.task!r}: a multiple-choice batch for {self.family} needs choice_ids and choice_mask "
                    f"(choice_format: {kind})"
                )
            return batch["choice_ids"], batch["choice_mask"]
        if self.label_names is None:
            raise ValueError(f"task {self.task!r}: label_names unknown")
        size = batch["attention_mask"].shape[0]
        ids, mask = self.label_target_ids, self.label_target_mask
        return ids.expand(size, *ids.shape), mask.expand(size, *mask.shape)

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
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.learning_rate)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_warmup_decay(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """State-dict keys of the trained parameters (LoRA: adapter factors and head)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def _frozen_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trainable = self.trainable_names()
        return {k: v for k, v in state.items() if k not in trainable}

    #: Checkpoint key of the random-number-generator states (see ``on_save_checkpoint``).
    RNG_KEY = "drm_lightning_rng"

    @staticmethod
    def rng_states() -> dict[str, Any]:
        """The global generators' states, as tensors, ints, floats and lists only (``weights_only`` loading):
        torch CPU; every CUDA device's when CUDA is initialised; python ``random``; numpy's legacy global one."""
        version, internal, gauss = random.getstate()
        states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["torch.cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np
        except ImportError:  # numpy is optional for torch; nothing drew from it then
            return states
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
        return states

    @staticmethod
    def set_rng_states(states: Mapping[str, Any]) -> None:
        """Restore what ``rng_states`` returned (CUDA: the devices present, in order)."""
        torch.set_rng_state(states["torch"])
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        cuda = states.get("torch.cuda")
        if cuda and torch.cuda.is_available():
            for device, state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)
        if "numpy" in states:
            import numpy as np

            kind, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

    def _rng_states_of_every_rank(self) -> list[dict[str, Any]]:
        """``rng_states`` of every global rank, in rank order: a collective under DDP (every rank saves together).

        The states travel as ``torch.save`` bytes padded to the longest, since ``all_gather`` needs one shape."""
        states = self.rng_states()
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return [states]
        buffer = io.BytesIO()
        torch.save(states, buffer)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(self.device)
        sizes = [int(n) for n in self.all_gather(torch.tensor([data.numel()], device=self.device)).flatten()]
        padding = torch.zeros(max(sizes) - data.numel(), dtype=torch.uint8, device=self.device)
        gathered = self.all_gather(torch.cat([data, padding]))
        return [
            torch.load(io.BytesIO(row[:size].cpu().numpy().tobytes()), weights_only=True)
            for row, size in zip(gathered, sizes, strict=True)
        ]

    def _restore_rng_states(self, saved: list[dict[str, Any]]) -> None:
        """This rank's saved states; rank 0's (with a warning) when the world size changed since the save."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if len(saved) != world:
            rank_zero_warn(
                f"checkpoint: its generator states are of {len(saved)} rank(s) but this fit runs on {world}: every "
                "rank restores rank 0's, so dropout masks will differ from an uninterrupted run"
            )
            rank = 0
        self.set_rng_states(saved[rank])

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the generators' states, and for LoRA drop the frozen base weights.

        Lightning 2.6 saves no RNG state, so without it a resumed fit draws other dropout masks than an
        uninterrupted one. ``ModelCheckpoint`` saves at the end of validation; the next draw in both runs is the
        next epoch's ``DataLoader`` iterator seed, then its dropout. Under DDP each rank's generators differ (their
        batches do), so the states of every global rank are gathered (Lightning calls this hook on every rank) and
        stored as a list in rank order.
        """
        checkpoint[self.RNG_KEY] = self._rng_states_of_every_rank()
        if self.lora is None or "state_dict" not in checkpoint:
            return
        state = checkpoint["state_dict"]
        frozen = self._frozen_state(state)
        if self._frozen_fingerprint is None:  # frozen weights never change: hash them once
            self._frozen_fingerprint = fingerprint_state(frozen)
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
        checkpoint[_CKPT_KEY] = {"trainable_only": True, "frozen_fingerprint": self._frozen_fingerprint}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the generators' states when a fit resumes (not for ``load_from_checkpoint`` or evaluation, where
        reseeding the caller's generators would surprise), and for LoRA fill back the frozen base weights.

        Lightning calls this before ``on_fit_start`` and the sanity check (which it runs under ``isolate_rng`` and
        skips on resume); the first draw after it is the train ``DataLoader`` iterator seed, as in the
        uninterrupted run after its save.
        """
        saved = checkpoint.get(self.RNG_KEY)
        if saved and self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            self._restore_rng_states(saved)
        info = checkpoint.get(_CKPT_KEY) or {}
        if not info.get("trainable_only"):
            return
        frozen = self._frozen_state(self.state_dict())
        expected = info.get("frozen_fingerprint")
        if expected is not None and not fingerprint_matches(frozen, expected):
            raise ValueError(
                f"checkpoint: its frozen base weights (fingerprint {short_fingerprint(expected)}) differ from those "
                "of backbone "
                f"{self.hparams.backbone!r} loaded now (different model, revision or torch_dtype)"
            )
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}

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
        from drm_lightning.task_vectors.apply import apply_task_vector
        from drm_lightning.task_vectors.format import read_head, read_meta

        meta = read_meta(folder)
        if meta.family not in FAMILIES:
            raise ValueError(f"{folder}/meta.json: family={meta.family!r}, expected one of {FAMILIES}")
        head_cfg = dict(meta.head)
        kwargs: dict[str, Any] = {
            "family": meta.family,
            "task": meta.task,
            "label_names": list(meta.label_names),
            "pooling": head_cfg.get("pooling", "cls"),
            "head_dropout": head_cfg.get("dropout", 0.1),
            "trust_remote_code": trust_remote_code,
            "tokenizer": meta.base_model,
            "task_type": meta.task_type,
        }
        with _recorded_head(head_cfg) if meta.family == "clip" else nullcontext():
            if isinstance(backbone, nn.Module):
                with _preloaded(backbone):
                    model = cls(backbone=meta.base_model, torch_dtype=torch_dtype, **kwargs)
            elif backbone is None:
                model = cls(backbone=meta.base_model, **meta.load_options(torch_dtype, gguf_file), **kwargs)
            else:
                model = cls(backbone=str(backbone), torch_dtype=torch_dtype, **kwargs)
        if model.head is not None:
            if head_cfg and build_head(head_cfg).config() != model.head_config():
                raise ValueError(f"{folder}/meta.json: head {head_cfg!r} does not match {model.head_config()!r}")
            model.head.load_state_dict(read_head(folder))
        if with_task_vector:
            apply_task_vector(model.backbone, folder, check_fingerprint=backbone is None)
        return model.eval()


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: ``(step + 1) / (warmup + 1)`` while warming up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))
