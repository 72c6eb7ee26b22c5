"""Turning user prompts into a left-padded token batch, with the checks that give one-line errors."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from knowlens.errors import KnowlensError, KnowlensWarning
from knowlens.types import Bool, Int, Tensor

# strings, lists of token ids, 1-D tensors, or a 2-D tensor; checked by `tokenize_prompts` (one-line errors)
PromptsArg = Sequence[Any] | Tensor


def tokenize_prompts(model: Any, prompts: PromptsArg) -> list[Int[Tensor, " seq"]]:
    """One 1-D int64 CPU tensor per prompt.

    Strings are tokenized one by one with ``model.to_tokens(p, prepend_bos=True)`` (needs a tokenizer);
    token-id prompts (lists of ints, 1-D tensors, or the rows of a 2-D tensor) are taken as they are.
    Raises KnowlensError for an empty list, an empty prompt, or a token id outside the vocabulary.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim == 1:
            prompts = [prompts]
        elif prompts.ndim != 2:
            raise KnowlensError(f"a tensor of prompts must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
    if isinstance(prompts, str):
        raise KnowlensError("prompts must be a list of prompts, not a single string")
    if len(prompts) == 0:
        raise KnowlensError("no prompts given")
    texts = [p for p in prompts if isinstance(p, str)]
    if texts:
        warn_unknown_words(getattr(model, "tokenizer", None), texts)
    rows: list[Tensor] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if prompt == "":
                raise KnowlensError(f"prompt {i} is empty")
            if getattr(model, "tokenizer", None) is None:
                raise KnowlensError("string prompts need a model with a tokenizer; pass token ids instead")
            row = model.to_tokens(prompt, prepend_bos=True, move_to_device=False, truncate=False)[0]
        else:
            row = torch.as_tensor(prompt)
            if row.ndim != 1:
                raise KnowlensError(
                    f"prompt {i} must be a 1-D list of token ids, got shape {tuple(row.shape)}"
                )
            if row.numel() > 0 and (row.is_floating_point() or row.is_complex() or row.dtype == torch.bool):
                raise KnowlensError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
        if row.numel() == 0:
            raise KnowlensError(f"prompt {i} is empty")
        rows.append(row.detach().to(device="cpu", dtype=torch.long))
    d_vocab = int(model.cfg.d_vocab)
    for i, row in enumerate(rows):
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= d_vocab:
            bad = low if low < 0 else high
            raise KnowlensError(f"prompt {i} has token id {bad} outside the vocabulary (d_vocab={d_vocab})")
    return rows


def unknown_words(tokenizer: Any, texts: Sequence[str]) -> Counter[str]:
    """Words of ``texts`` that ``tokenizer`` can only encode as its unknown token, with their counts.

    Empty for tokenizers without a distinct unknown token (byte-level BPE such as GPT-2's never needs one).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    special = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    found: Counter[str] = Counter()
    if tokenizer is None or not isinstance(unk, int) or unk in special or not getattr(tokenizer, "is_fast", False):
        return found
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid == unk and text[a:b] != tokenizer.unk_token:
                found[text[a:b]] += 1
    return found


def warn_unknown_words(tokenizer: Any, texts: Sequence[str]) -> Counter[str]:
    """Warn (`KnowlensWarning`) with a count and examples when words of ``texts`` become the unknown token."""
    found = unknown_words(tokenizer, texts)
    if found:
        examples = ", ".join(repr(w) for w, _ in found.most_common(5))
        warnings.warn(
            f"{sum(found.values())} word(s) ({len(found)} distinct) are not in the model's vocabulary and became "
            f"{tokenizer.unk_token}: {examples}{' ...' if len(found) > 5 else ''}",
            KnowlensWarning,
            stacklevel=3,
        )
    return found


def left_pad(
    rows: Sequence[Tensor], *, pad_id: int, total_len: int, device: torch.device
) -> tuple[Int[Tensor, "batch total"], Bool[Tensor, "batch total"]]:
    """Place each row flush against column ``max_len`` (left padding) in a ``(batch, total_len)`` buffer.

    Columns from ``max_len`` on are left for generated tokens and hold ``pad_id`` for now. Returns the
    token buffer and the prompt mask (True on each row's real prompt tokens).
    """
    max_len = max(int(r.numel()) for r in rows)
    tokens = torch.full((len(rows), total_len), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), total_len), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, max_len - row.numel() : max_len] = row
        prompt_mask[i, max_len - row.numel() : max_len] = True
    return tokens.to(device), prompt_mask.to(device)


def pad_token_id(model: Any) -> int:
    """The tokenizer's pad id (else its EOS id), or 0 for a model without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, attr, None) if tok is not None else None
        if isinstance(value, int):
            return value
    return 0


def eos_token_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """The stop tokens: ``eos_token_id`` if given, else the tokenizer's EOS, else none (no stopping)."""
    if eos_token_id is None:
        tok = getattr(model, "tokenizer", None)
        value = getattr(tok, "eos_token_id", None) if tok is not None else None
        return (value,) if isinstance(value, int) else ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    ids = tuple(int(t) for t in eos_token_id)
    if not ids:
        raise KnowlensError("eos_token_id is an empty list")
    return ids
