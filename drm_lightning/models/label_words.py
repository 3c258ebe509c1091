"""Labels as words: score each candidate answer by the likelihood the model's own LM head gives it.

Why: a T5 (``seq2seq``) or causal decoder (``decoder_lm``) expert that answers in words keeps the model a working
language model: nothing new is bolted on, the LM head is the task head, and a merged model still generates text.
A class is predicted as the candidate of highest summed token log-likelihood (as T5 papers and lm-eval-harness
score classification and multiple choice).

Candidates come in two shapes, both handled here as ``targets [B, C, L]`` with a mask (right-padded tokens):

- label words (classification): the same C words for every input, tokenised once (``label_targets``);
- options (multiple choice): C continuations per input, tokenised by the datamodule.

Causal decoders: each (prompt, candidate) pair is packed into one right-padded row, ``prompt tokens ++ candidate
tokens``, whatever side the prompt was padded on; the body runs once per pair and the LM head only on the positions
that predict candidate tokens (a 128k-word vocabulary over whole sequences would cost gigabytes per batch). When
every candidate is a single token (yes / no, negative / positive with BPE vocabularies), each prompt runs once and
all candidates are read off its next-token distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Text the label words of a causal decoder are tokenised after: they are scored as the continuation of a prompt
#: that ends like this, so BPE tokenizers give them their in-context (space-prefixed) tokens.
ANCHOR = "Answer:"


def _padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def continuation_ids(
    tokenizer: Any, words: Sequence[str], separator: str = " ", anchor: str = ANCHOR
) -> list[list[int]]:
    """The tokens each word adds after ``anchor + separator``: how it continues a prompt ending in ``anchor``."""
    head = tokenizer(anchor, add_special_tokens=False)["input_ids"]
    out = []
    for word in words:
        full = tokenizer(anchor + separator + word, add_special_tokens=False)["input_ids"]
        if full[: len(head)] != head:  # the word merged into the anchor's last token: take it on its own
            full = head + tokenizer(separator + word, add_special_tokens=False)["input_ids"]
        out.append(full[len(head) :])
    return out


def label_targets(
    tokenizer: Any, words: Sequence[str], family: str, source: str = "tokenizer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [C, L], mask [C, L])`` of the label words as targets of ``family`` (``seq2seq`` or ``decoder_lm``).

    T5 targets are the words as the tokenizer encodes them (with its EOS, as T5 was trained); causal decoder targets
    are the words' tokens as the continuation of a prompt (``continuation_ids``). Refuses a word that tokenises to
    nothing and two words with identical tokens (they could never be told apart).
    """
    words = list(words)
    if family == "seq2seq":
        rows = [tokenizer(w)["input_ids"] for w in words]
    elif family == "decoder_lm":
        rows = continuation_ids(tokenizer, words)
    else:
        raise ValueError(f"family={family!r}: label words are scored only for seq2seq and decoder_lm")
    if any(not r for r in rows):
        raise ValueError(f"label_names={words!r}: a label tokenises to nothing with {source!r}")
    if len({tuple(r) for r in rows}) != len(words):
        raise ValueError(f"label_names={words!r}: two labels tokenise identically with {source!r}")
    return _padded(rows)


def load_label_targets(
    source: str, words: Sequence[str], family: str, *, trust_remote_code: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``label_targets`` with the tokenizer loaded from ``source`` (hub id, folder or ``package://``)."""
    from transformers import AutoTokenizer

    from drm_lightning.models.resolve import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(source), trust_remote_code=trust_remote_code)
    return label_targets(tokenizer, words, family, source)


def seq2seq_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Token log-probs ``[B, C, L]`` (zero at padding) of T5 target sequences ``[B, C, L]`` given each input.

    The encoder runs once per input, the decoder once per (input, candidate) pair.
    """
    size, num, length = target_ids.shape
    encoder = model.get_encoder()
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = target_ids.reshape(size * num, length)
    mask = target_mask.reshape(size * num, length)
    out = model(
        encoder_outputs=(hidden.repeat_interleave(num, dim=0),),
        attention_mask=attention_mask.repeat_interleave(num, dim=0),
        labels=targets.masked_fill(mask == 0, -100),
        use_cache=False,
    )
    logp = out.logits.float().log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).view(size, num, length)


def pack(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``prompt ++ target`` right-padded: ``(input_ids [N, P+L], attention_mask, target_positions [N, L])``.

    Prompts may be left- or right-padded (their attended tokens keep their order); targets are right-padded.
    """
    lengths = prompt_mask.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("label-word scoring: an input prompt is empty (no attended token to continue)")
    order = torch.argsort((prompt_mask == 0).to(torch.int8), dim=1, stable=True)
    compact_mask = prompt_mask.gather(1, order)
    compact = prompt_ids.gather(1, order) * compact_mask
    rows, width = prompt_ids.shape
    length = target_ids.shape[1]
    input_ids = torch.zeros(rows, width + length, dtype=prompt_ids.dtype, device=prompt_ids.device)
    mask = torch.zeros_like(input_ids)
    input_ids[:, :width], mask[:, :width] = compact, compact_mask
    positions = lengths.unsqueeze(1) + torch.arange(length, device=prompt_ids.device).unsqueeze(0)
    input_ids.scatter_(1, positions, target_ids * target_mask)
    mask.scatter_(1, positions, target_mask.to(mask.dtype))
    return input_ids, mask, positions


def causal_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Token log-probs ``[N, L]`` (zero at padding) of ``target_ids [N, L]`` as the continuation of each prompt."""
    input_ids, mask, positions = pack(prompt_ids, prompt_mask, target_ids, target_mask)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    index = (positions - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    logits = model.get_output_embeddings()(hidden.gather(1, index))
    logp = logits.float().log_softmax(dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return logp * target_mask


def causal_next_token_logprobs(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """Log-probs ``[B, C]`` of single-token answers ``token_ids [B, C]`` right after each prompt: one forward per
    prompt instead of one per (prompt, answer) pair.

    Why: the usual label words (yes / no / maybe, negative / positive) are one token each with BPE vocabularies, and
    then every answer is scored by the same next-token distribution; a causal model's prompt positions never see
    the appended answer, so this equals ``causal_logprobs`` on the packed pairs.
    """
    lengths = prompt_mask.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("label-word scoring: an input prompt is empty (no attended token to continue)")
    order = torch.argsort((prompt_mask == 0).to(torch.int8), dim=1, stable=True)
    mask = prompt_mask.gather(1, order)
    ids = prompt_ids.gather(1, order) * mask
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
    logp = model.get_output_embeddings()(last).float().log_softmax(dim=-1)
    return logp.gather(-1, token_ids)


def candidate_logprobs(
    model: nn.Module,
    family: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Token log-probs ``[B, C, L]`` of C candidates per input (``targets [B, C, L]``) for ``family``."""
    if family == "seq2seq":
        return seq2seq_logprobs(model, input_ids, attention_mask, target_ids, target_mask)
    if family != "decoder_lm":
        raise ValueError(f"family={family!r}: candidates are scored only for seq2seq and decoder_lm")
    size, num, length = target_ids.shape
    if length == 1 and bool(target_mask.all()):  # single-token answers: one forward per input
        logp = causal_next_token_logprobs(model, input_ids, attention_mask, target_ids[:, :, 0])
        return logp.unsqueeze(-1)
    logp = causal_logprobs(
        model,
        input_ids.repeat_interleave(num, dim=0),
        attention_mask.repeat_interleave(num, dim=0),
        target_ids.reshape(size * num, length),
        target_mask.reshape(size * num, length),
    )
    return logp.view(size, num, length)


def target_loss(
    model: nn.Module,
    family: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean token cross-entropy of the true targets ``[B, L]``: the usual LM fine-tuning loss on the answer."""
    if family == "seq2seq":
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=target_ids.masked_fill(target_mask == 0, -100),
            use_cache=False,
        )
        return out.loss
    logp = causal_logprobs(model, input_ids, attention_mask, target_ids, target_mask)
    return -logp.sum() / target_mask.sum()
