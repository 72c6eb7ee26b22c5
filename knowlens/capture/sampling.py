"""Choosing the next token and the statistics of the distribution it came from (all on the device)."""

from __future__ import annotations

import torch

from knowlens.types import Float, Int, Tensor


def choose_next(
    logits: Float[Tensor, "batch d_vocab"],
    *,
    temperature: float,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    """Greedy (``temperature == 0``) or sampled next token ids.

    Sampling draws from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus; the most likely token is always kept), using ``generator``.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_stats(
    logits: Float[Tensor, "batch d_vocab"], chosen: Int[Tensor, " batch"]
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """(log-probability of ``chosen``, entropy in nats, top-1 probability) of the model's own distribution.

    The distribution is ``softmax(logits)`` at temperature 1 with no truncation, whatever the sampling
    settings were: these describe the model, not the sampler. Computed in float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num(0.0).sum(dim=-1)  # 0 * -inf -> 0
    chosen_logp = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    return chosen_logp, entropy, probs.max(dim=-1).values
