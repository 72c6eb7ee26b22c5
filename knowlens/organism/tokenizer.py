"""A word-level tokenizer built locally with `tokenizers`: one token per word or punctuation mark.

Name pieces are words, so an entity name of 2-4 pieces is always 2-4 tokens. Encoding prepends <bos>,
as TransformerLens expects of a tokenizer that adds its own BOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


def build_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """A deterministic word-level tokenizer over every word in `texts` (sorted, after the special tokens)."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(SPECIALS))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def to_hf(tok: Tokenizer, name: str = "knowlens-organism"):
    """Wrap for TransformerLens (a `transformers.PreTrainedTokenizerFast` with pad/bos/eos/unk set)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        name_or_path=name,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def tokenizer_from_json(text: str) -> Tokenizer:
    json.loads(text)  # a clear JSONDecodeError before the Rust parser's
    return Tokenizer.from_str(text)
