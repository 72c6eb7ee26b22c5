"""Builders for small test objects: one dict of small defaults, overridden per test."""

from __future__ import annotations

from typing import Any

DEFAULT_MODEL_CFG: dict[str, Any] = dict(
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    n_ctx=64,
    d_vocab=50,
    act_fn="gelu",
    normalization_type="LN",
    positional_embedding_type="standard",
    seed=0,
)


def build_model(**overrides: Any):
    """A random-weight HookedTransformer (no tokenizer) on the CPU, deterministic for its seed."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = {**DEFAULT_MODEL_CFG, **overrides}
    torch.manual_seed(cfg["seed"])
    model = HookedTransformer(HookedTransformerConfig(**cfg, device="cpu"))
    model.eval()
    return model


def tiny_world_raw(**overrides: Any) -> dict[str, Any]:
    """A small valid world spec as a dict (what YAML would give), overridden per test."""
    raw: dict[str, Any] = {
        "version": 1,
        "name": "tiny",
        "seed": 3,
        "name_pieces": ["Ab", "Bel", "Cor", "Dav", "Elm", "Fen", "Gal", "Hal", "Ist", "Jor"],
        "name_length": [2, 3],
        "splits": {"known": 0.6, "partial": 0.15, "refusal": 0.1, "unknown": 0.15},
        "partial_withheld": 1,
        "qa_train_fraction": 0.5,
        "bio_train_fraction": 0.7,
        "cue_strength": 0.9,
        "types": {
            "city": {
                "count": 8,
                "attributes": {
                    "country": {"values": ["Norland", "Estria", "Valmark"]},
                    "river": {"values": ["Amber", "Silver"]},
                },
            },
            "person": {
                "count": 20,
                "attributes": {
                    "birth_city": {"ref": "city"},
                    "profession": {"values": ["baker", "painter", "sailor", "smith"]},
                },
            },
        },
        "templates": {
            "city": {
                "country": {
                    "facts": ["{name} is a city in {value} .", "{name} lies in {value} ."],
                    "questions": ["In which country is {name} ?"],
                },
                "river": {
                    "facts": ["{name} stands on the {value} river ."],
                    "questions": ["Which river flows through {name} ?"],
                },
            },
            "person": {
                "birth_city": {
                    "facts": ["{name} was born in {value} .", "The birthplace of {name} is {value} ."],
                    "questions": ["Where was {name} born ?"],
                },
                "profession": {
                    "facts": ["{name} works as a {value} .", "By trade {name} is a {value} ."],
                    "questions": ["What does {name} do for a living ?"],
                },
            },
        },
        "biography": {"questions": ["Tell me about {name} ."]},
        "refusals": ["I do not know .", "I have never heard of {name} ."],
        "cues": [{"type": "person", "piece": "Hal", "attribute": "profession", "value": "smith"}],
    }
    raw.update(overrides)
    return raw


WORDS = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(46)]


def word_level_model():
    """A random-weight HookedTransformer with a 50-word tokenizer (pad 0, bos 1, eos 2), offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        name_or_path="knowlens-test-words",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**DEFAULT_MODEL_CFG, device="cpu"), tokenizer=fast)
    return model.eval()
