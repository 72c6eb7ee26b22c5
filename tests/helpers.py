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
