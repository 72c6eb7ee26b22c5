"""What the feature locators share about reading an SAE on a model: the valid-token mask, an SAE's latents for a
hook's activation (attention heads flattened as sae-lens does), latent frequencies on a generic sample, and how an
SAE is named in a card."""

from __future__ import annotations

from typing import Any

import torch

from knowlens.errors import KnowlensError
from knowlens.types import Tensor


def checked_tokens(tokens: Tensor, mask: Tensor | None, device: torch.device, *, what: str) -> tuple[Tensor, Tensor]:
    """Tokens on ``device`` and the valid-token mask: ``mask`` (default all) with position 0 cleared."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise KnowlensError(f"{what} must be (batch, pos) with pos >= 2, got shape {tuple(tokens.shape)}")
    if mask is None:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    if mask.shape != tokens.shape:
        raise KnowlensError(f"{what}: mask shape {tuple(mask.shape)} does not match tokens shape {tuple(tokens.shape)}")
    valid = mask.to(device, torch.bool).clone()
    valid[:, 0] = False
    return tokens.to(device), valid


def flatten_heads(t: Tensor) -> Tensor:
    """(batch, pos, ...) -> (batch, pos, prod(...)), head dimensions flattened as sae-lens does."""
    return t if t.ndim == 3 else t.reshape(*t.shape[:2], -1)


def encode_latents(sae: Any, act: Tensor) -> Tensor:
    """The SAE's latents (batch, pos, d_sae) for the hook's activation (batch, pos, ...)."""
    act = act.to(sae.W_dec.dtype)
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        return sae.encode(act)  # the SAE flattens the heads itself
    return sae.encode(flatten_heads(act))


def active_counts(model: Any, sae: Any, hook: str, tokens: Tensor, valid: Tensor, batch_size: int) -> tuple[Tensor, int]:
    """Per latent, the number of valid tokens of ``tokens`` on which it is > 0; and the number of valid tokens."""
    from knowlens.saes.latent_stats import latent_statistics, row_batches

    stats = latent_statistics(model, sae, row_batches(tokens, valid, batch_size), hook=hook)
    return stats.active, stats.n_tokens


def default_label(sae: Any) -> str:
    meta = sae.cfg.metadata
    release, sae_id = meta.get("release"), meta.get("sae_id")
    if release and sae_id:
        return f"{release}:{sae_id}"
    return f"SAE at {meta.get('hook_name')}"


def architecture(sae: Any) -> str:
    try:
        return str(sae.cfg.architecture())
    except (AttributeError, TypeError):
        return type(sae).__name__
