"""Text to equal-length token rows (each text as <bos> text <eos>, packed into rows): all at once for `harvest`
(`pack_texts`), or streamed a batch of rows at a time from any iterable of texts (`stream_rows`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knowlens.capture.prompts import warn_unknown_words
from knowlens.errors import KnowlensError
from knowlens.types import Int, Tensor


@dataclass(frozen=True, eq=False)
class PackedTokens:
    tokens: Int[Tensor, "rows seq"]  # int64
    dropped: int  # tokens at the end that did not fill a row


def pack_texts(model: Any, texts: Sequence[str], *, seq_len: int) -> PackedTokens:
    """Tokenize ``texts`` with ``model.tokenizer`` (each as BOS + text + EOS where the tokenizer has them),
    concatenate, and cut into rows of ``seq_len`` tokens, dropping the tail shorter than a row.

    Warns (`KnowlensWarning`) about words the tokenizer can only encode as its unknown token.
    """
    tok = _tokenizer(model, seq_len)
    warn_unknown_words(tok, texts)
    stream: list[int] = []
    for text in texts:
        stream += _ids(tok, text)
    rows = len(stream) // seq_len
    if rows == 0:
        raise KnowlensError(f"the texts hold {len(stream)} tokens, fewer than one row of --seq-len {seq_len}")
    tokens = torch.tensor(stream[: rows * seq_len], dtype=torch.long).reshape(rows, seq_len)
    return PackedTokens(tokens=tokens, dropped=len(stream) - rows * seq_len)


def stream_rows(model: Any, texts: Iterable[str], *, seq_len: int, rows: int) -> Iterator[Int[Tensor, "rows seq"]]:
    """Pack ``texts`` as `pack_texts` does, lazily: yields int64 tensors of ``rows`` rows of ``seq_len`` tokens
    (the last one may hold fewer rows; a tail shorter than a row is dropped). Reads ``texts`` as it goes, so
    memory stays bounded by one batch whatever the stream's length (a generator of texts works)."""
    tok = _tokenizer(model, seq_len)
    if rows < 1:
        raise KnowlensError(f"rows must be >= 1, got {rows}")
    want = rows * seq_len
    pending: list[int] = []
    for text in texts:
        pending += _ids(tok, text)
        while len(pending) >= want:
            yield torch.tensor(pending[:want], dtype=torch.long).reshape(rows, seq_len)
            del pending[:want]
    full = len(pending) // seq_len
    if full:
        yield torch.tensor(pending[: full * seq_len], dtype=torch.long).reshape(full, seq_len)


def _tokenizer(model: Any, seq_len: int) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise KnowlensError("this model has no tokenizer; make token rows yourself (see docs/formats.md)")
    if seq_len < 1 or seq_len > int(model.cfg.n_ctx):
        raise KnowlensError(f"--seq-len must be between 1 and the model's context ({model.cfg.n_ctx}), got {seq_len}")
    return tok


def _ids(tok: Any, text: str) -> list[int]:
    bos = [tok.bos_token_id] if isinstance(tok.bos_token_id, int) else []
    eos = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else []
    return [*bos, *tok(text, add_special_tokens=False)["input_ids"], *eos]
