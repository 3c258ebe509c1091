"""Tiny models of each family (hidden size 32), saved with ``save_pretrained`` so the real loading code runs.

Why: tests must not reach the hub, and real models are far too slow on 2 CPU cores. Each folder holds what a hub
checkpoint holds: ``config.json``, ``model.safetensors`` and a tokenizer (text families) or image processor
(vision), so ``load_backbone`` and ``AutoTokenizer`` / ``AutoImageProcessor`` work on it unchanged.

Usage::

    from tests.helpers.tiny_models import TINY_WORDS, make_tiny_model
    path = make_tiny_model("encoder", tmp_path / "bert")   # -> str, a save_pretrained folder

Every word of ``TINY_WORDS`` is a single token of every tiny tokenizer, so synthetic sentences built from them
tokenise to meaningful ids; other lowercase words fall back to letters.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, StackDataset

HIDDEN_SIZE = 32
IMAGE_SIZE = 16
#: The size every tiny transformer shares (T5 names these ``d_model``, ``d_ff``, ``num_layers``, ``num_heads``).
TINY_SIZE = {"hidden_size": HIDDEN_SIZE, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

TINY_WORDS: tuple[str, ...] = tuple(
    """
    the a an and or but is was are be not very so too this that it its of in on to with for as at by
    movie film plot actor story scene music ending cast script director
    good great fine fun nice best love lovely brilliant superb fresh
    bad awful poor dull boring worst hate terrible weak rotten
    cat dog bird fish red green blue yellow one two three four
    positive negative neutral yes no maybe
    """.split()
)

_LETTERS = list(string.ascii_lowercase + string.digits)


def _bert_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + list(TINY_WORDS) + _LETTERS + [f"##{c}" for c in _LETTERS] + list(string.punctuation)
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    return BertTokenizer(vocab=vocab)


def _llama_tokenizer():
    from transformers import LlamaTokenizer

    # Byte-pair merges that build each "▁word" left to right, so every TINY_WORDS entry is one token.
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    pieces = specials + ["▁"] + _LETTERS + [f"▁{c}" for c in _LETTERS] + list(string.punctuation)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        piece = "▁"
        for char in word:
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            pieces.append(piece)
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    return LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right")


def _t5_tokenizer():
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = specials + [(f"▁{w}", -1.0) for w in TINY_WORDS] + [("▁", -2.0)]
    pieces += [(c, -5.0) for c in _LETTERS + list(string.punctuation)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


#: Every architecture ``make_tiny_model`` builds, as ``(family, architecture)``: what a table over shipped families
#: runs over (``tests/merging/test_plan_families.py``). ``None`` is the family's default architecture.
ARCHITECTURES: tuple[tuple[str, str | None], ...] = (
    ("encoder", None),  # BERT
    ("encoder", "deberta_v2"),
    ("decoder", None),  # Llama
    ("decoder_lm", None),  # Llama with its LM head
    ("seq2seq", None),  # T5
    ("vision", None),  # ViT
    ("clip", None),  # CLIP (the backbone: its vision tower and projection)
)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # Byte-level BPE as CLIP's: single characters (word-final ones end in "</w>") plus merges that build each of
    # TINY_WORDS into one token, so prompts of those words tokenise to meaningful ids.
    chars = _LETTERS + list(string.punctuation)
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(chars + [c + "</w>" for c in chars]))}
    merges: list[tuple[str, str]] = []
    for word in ("photo", *TINY_WORDS):
        piece = word[0]
        for i, char in enumerate(word[1:], 1):
            char = char + ("</w>" if i == len(word) - 1 else "")
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def make_tiny_model(
    family: str, folder: str | os.PathLike[str], *, seed: int = 0, architecture: str | None = None, **config_overrides
) -> str:
    """Build a random tiny model of ``family`` (``encoder|decoder|seq2seq|vision``) and save it to ``folder``.

    Args:
        family: ``"encoder"`` (BERT, with pooler, like real checkpoints), ``"decoder"`` or ``"decoder_lm"``
            (``LlamaForCausalLM``, as hub checkpoints are), ``"seq2seq"`` (T5) or
            ``"vision"`` (ViT, 16x16 RGB, patch 8) or ``"clip"`` (``CLIPModel``: text and vision towers, with a
            CLIP tokenizer and image processor; the ``clip`` backbone is its vision tower).
        folder: where to ``save_pretrained``; created if missing.
        seed: the weights are a function of the seed alone.
        architecture: another architecture of the family: ``"deberta_v2"`` (encoder; DeBERTa-v3's layout:
            relative attention, no absolute positions; with the BERT tokenizer).
        **config_overrides: passed to the config (e.g. ``num_hidden_layers=1``).

    Returns:
        ``str(folder)``.
    """
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if architecture not in (None, "deberta_v2") or (architecture is not None and family != "encoder"):
        raise ValueError(f"architecture={architecture!r}: expected None, or 'deberta_v2' for the encoder family")

    def build_config(cls, **settings):
        """``cls(**settings)``, ``config_overrides`` winning over the family's settings."""
        return cls(**{**settings, **config_overrides})

    if architecture == "deberta_v2":
        tok = _bert_tokenizer()
        config = build_config(
            tf.DebertaV2Config,
            **TINY_SIZE,
            vocab_size=len(tok),
            max_position_embeddings=128,
            relative_attention=True,
            position_buckets=16,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pad_token_id=tok.pad_token_id,
        )
        model = tf.DebertaV2Model(config)
    elif family == "encoder":
        tok = _bert_tokenizer()
        config = build_config(
            tf.BertConfig, **TINY_SIZE, vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id
        )
        model = tf.BertModel(config)
    elif family in ("decoder", "decoder_lm"):
        tok = _llama_tokenizer()
        config = build_config(
            tf.LlamaConfig,
            **TINY_SIZE,
            vocab_size=len(tok),
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        model = tf.LlamaForCausalLM(config)
    elif family == "seq2seq":
        tok = _t5_tokenizer()
        config = build_config(
            tf.T5Config,
            vocab_size=len(tok),
            d_model=HIDDEN_SIZE,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
        model = tf.T5ForConditionalGeneration(config)
    elif family == "clip":
        tok = _clip_tokenizer()
        special = {k: tok.convert_tokens_to_ids(t) for k, t in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"))}
        config = build_config(
            tf.CLIPConfig,
            text_config={**TINY_SIZE, "vocab_size": len(tok), "max_position_embeddings": 64,
                         "bos_token_id": special["bos"], "eos_token_id": special["eos"],
                         "pad_token_id": special["eos"]},
            vision_config={**TINY_SIZE, "image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3},
            projection_dim=16,
        )  # fmt: skip
        model = tf.CLIPModel(config)
        size = {"shortest_edge": IMAGE_SIZE}
        tf.CLIPImageProcessor(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    elif family == "vision":
        tok = tf.ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        config = build_config(tf.ViTConfig, **TINY_SIZE, image_size=IMAGE_SIZE, patch_size=8, num_channels=3)
        model = tf.ViTModel(config)
    else:
        raise ValueError(f"family={family!r}: expected encoder, decoder, decoder_lm, seq2seq, vision or clip")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


POSITIVE = ("good", "great", "fine", "fun", "nice", "best", "love", "lovely", "brilliant", "superb")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring", "worst", "hate", "terrible", "weak", "rotten")
FILLER = ("the", "movie", "film", "plot", "actor", "story", "was", "is", "very", "so", "this", "and")


def synthetic_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` short sentences whose label (0 = negative, 1 = positive) is the sentiment word they contain."""
    gen = torch.Generator().manual_seed(seed)

    def pick(words: tuple[str, ...]) -> str:
        return words[int(torch.randint(len(words), (1,), generator=gen))]

    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=gen))
        words = [pick(FILLER) for _ in range(int(torch.randint(2, 7, (1,), generator=gen)))]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=gen)), pick(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


class SyntheticDataModule(pl.LightningDataModule):
    """A small in-memory datamodule for any tiny family: sentiment-word sentences (text) or shifted noise (vision).

    Batches are what the real datamodules yield: ``input_ids``, ``attention_mask`` (right padding),
    ``token_type_ids`` for sentence pairs, or ``pixel_values``; plus ``labels`` (LongTensor). It exposes
    ``label_names`` and ``metrics`` like the real ones.
    """

    def __init__(
        self,
        family: str,
        model_path: str,
        n: int = 32,
        batch_size: int = 8,
        pairs: bool = False,
        label_names: tuple[str, ...] = ("negative", "positive"),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.family, self.model_path, self.n, self.batch_size = family, model_path, n, batch_size
        self.pairs, self.label_names, self.seed = pairs, list(label_names), seed
        self.metrics = ["accuracy"]

    def _tensors(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        if self.family in ("vision", "clip"):
            labels = torch.randint(len(self.label_names), (n,), generator=gen)
            pixels = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) + labels.view(-1, 1, 1, 1)
            return {"pixel_values": pixels, "labels": labels}
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_path)
        texts, labels = synthetic_sentences(n, seed)
        if self.pairs:
            second, _ = synthetic_sentences(n, seed + 1000)
            enc = tok(texts, second, padding=True, return_tensors="pt")
        else:
            enc = tok(texts, padding=True, return_tensors="pt")
        out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out["labels"] = torch.tensor(labels) % len(self.label_names)
        return out

    def setup(self, stage: str) -> None:
        self.train_data = self._tensors(self.n, self.seed)
        self.val_data = self._tensors(max(8, self.n // 2), self.seed + 1)

    def _loader(self, data: dict[str, torch.Tensor], shuffle: bool) -> DataLoader:
        return DataLoader(StackDataset(**data), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, False)


def tiny_trainer(max_steps: int = 2, **kwargs) -> pl.Trainer:
    """A quiet CPU ``Trainer`` for a few steps: no logger, checkpoints, progress bar or sanity check unless asked."""
    settings = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(kwargs)
    return pl.Trainer(**settings)
