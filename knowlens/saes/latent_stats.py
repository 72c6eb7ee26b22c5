"""Per-latent statistics of an SAE over a token stream, one batch at a time: memory bounded by the batch.

`latent_statistics` reads batches of token rows from any iterable (a generator over a corpus too large to hold),
runs the model up to the SAE's hook, encodes, and accumulates per latent: how often it fires, its mean
activation, its mean when active, its standard deviation and maximum. Nothing grows with the number of tokens
but the counters. The feature locators' generic-sample frequency filter reads the same counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from knowlens.saes.activations import checked_tokens, encode_latents
from knowlens.types import Float, Int, Tensor

Batch = Tensor | tuple[Tensor, Tensor]  # token rows, or token rows and their valid-token mask


@dataclass(frozen=True, eq=False)
class LatentStats:
    """Per-latent statistics over ``n_tokens`` valid tokens (first position of every row excluded)."""

    hook: str
    n_tokens: int
    active: Int[Tensor, " d_sae"]  # tokens on which the latent is > 0
    sum: Float[Tensor, " d_sae"]  # float64 sums of the activation
    sum_sq: Float[Tensor, " d_sae"]
    max: Float[Tensor, " d_sae"]

    @property
    def frequency(self) -> Tensor:
        return self.active.double() / max(self.n_tokens, 1)

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.n_tokens, 1)

    @property
    def mean_when_active(self) -> Tensor:
        return torch.where(self.active > 0, self.sum / self.active.clamp(min=1), torch.zeros_like(self.sum))

    @property
    def std(self) -> Tensor:
        n = max(self.n_tokens, 1)
        return (self.sum_sq / n - self.mean**2).clamp(min=0).sqrt()

    @property
    def dead(self) -> Tensor:
        """Latents that never fired on the stream."""
        return self.active == 0


def latent_statistics(model: Any, sae: Any, batches: Iterable[Batch], *, hook: str | None = None,
                      progress: bool = False) -> LatentStats:  # fmt: skip
    """Stream ``batches`` of token rows (batch, pos) through ``model`` up to the SAE's hook and accumulate per-latent
    statistics (`LatentStats`). A batch is a token tensor (every position but the first counted) or a pair
    (tokens, mask) whose mask says which positions count (the first is never counted: it is BOS, or a row cut
    mid-text). ``hook`` defaults to the SAE's own hook name. An empty stream gives ``n_tokens`` 0."""
    from knowlens.capture.hooks import stop_layer_for, validate_hook_names

    name: str = hook or str(sae.cfg.metadata.hook_name)
    validate_hook_names(model, [name])
    device = next(model.parameters()).device
    d_sae = int(sae.cfg.d_sae)
    active = torch.zeros(d_sae, dtype=torch.long, device=device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=device)
    total_sq = torch.zeros(d_sae, dtype=torch.float64, device=device)
    peak = torch.full((d_sae,), float("-inf"), dtype=torch.float64, device=device)
    n = 0
    seen: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen["act"] = act.detach()

    stop = stop_layer_for(model, [name])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="latent statistics", unit="tok", unit_scale=True)
    try:
        with model.hooks(fwd_hooks=[(name, capture)]), torch.inference_mode():
            for i, batch in enumerate(batches):
                tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
                tokens, valid = checked_tokens(tokens, mask, device, what=f"batch {i}")
                seen.clear()
                model(tokens, stop_at_layer=stop)
                feats = encode_latents(sae, seen["act"])[valid].double()
                active += (feats > 0).sum(0)
                total += feats.sum(0)
                total_sq += (feats * feats).sum(0)
                if len(feats):
                    peak = torch.maximum(peak, feats.max(0).values)
                n += len(feats)
                if bar is not None:
                    bar.update(len(feats))
    finally:
        if bar is not None:
            bar.close()
    return LatentStats(hook=name, n_tokens=n, active=active, sum=total, sum_sq=total_sq, max=peak)


def row_batches(tokens: Int[Tensor, "rows seq"], valid: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(tokens, mask) batches of ``batch_size`` rows of an in-memory token tensor."""
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size], valid[start : start + batch_size]
