"""Patching: causal interventions on a model's activations, correct on every step of KV-cached generation, and
activation patching between a clean and a corrupted prompt (equal to TransformerLens's own patching functions).

Public API (re-exports only):

* `ablate_latents(sae, latents, *, value=None | scale=None, positions="all") -> Intervention`: at the SAE's hook,
  ``x -> x + decode(f') - decode(f)`` (``f = encode(x)``, ``f'`` with the latents set to ``value``, default 0, or
  scaled): the SAE's error term is kept, so with nothing changed the activation is returned bit for bit
* `steer(hook, direction, alpha, *, unit="resid_norm" | "raw", positions="all") -> Intervention`:
  ``x_t + alpha * ||x_t|| * d/||d||`` (``alpha`` in multiples of the activation's own norm at that token) or
  ``x_t + alpha * d``; `latent_direction(sae, i)`: the decoder row ``W_dec[i]``
* `project_out(hook, direction(s), *, positions="all") -> Intervention`: remove the component along the span
* `patch_from_cache(hook, cache_or_tensor, *, positions="all") -> Intervention`: ``x[:, t] <- source[:, offset + t]``
* `Intervention`: iterable ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=[*i])``, with ``params``;
  `intervene(model, *interventions)`: a context manager that checks the hook names and adds them all
* positions: ``"all"``, ``"last"`` (the newest token at each generation step), absolute columns (ints, a slice,
  a mask), located on decode steps of KV-cached generation too (see `knowlens.patching.interventions`)
* `activation_patch(model, clean, corrupted, metric, *, site="resid_pre" | "attn_out" | "mlp_out" | "head",
  patches_per_pass=1, progress=False) -> PatchResult`; `activation_patch_sweep(...)` -> ``{site: PatchResult}``
* `PatchResult`: ``values (layer, pos | head)``, ``axes``, ``labels``, ``metric_name``, clean/corrupted metric,
  ``recovered()``, ``to_dict()``
* metrics: `logit_diff(answer_id, wrong_id, *, position=-1)`, `token_prob(ids, *, position=-1)`, `Metric`
"""

from knowlens.patching.activation import (
    SITES,
    Metric,
    PatchResult,
    activation_patch,
    activation_patch_sweep,
    logit_diff,
    token_prob,
)
from knowlens.patching.interventions import (
    Intervention,
    ablate_latents,
    intervene,
    latent_direction,
    patch_from_cache,
    project_out,
    steer,
)

__all__ = [
    "ablate_latents",
    "steer",
    "latent_direction",
    "project_out",
    "patch_from_cache",
    "Intervention",
    "intervene",
    "activation_patch",
    "activation_patch_sweep",
    "PatchResult",
    "Metric",
    "logit_diff",
    "token_prob",
    "SITES",
]
