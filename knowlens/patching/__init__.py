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
* `attribution_patch(model, clean, corrupted, metric, *, site="resid_pre", metric_hooks=()) -> AttributionResult`
  (and `attribution_patch_sweep(..., sites=SITES)`): gradient x activation difference, the gradient taken on the
  corrupted run, ``values[L, p] = sum (a_clean - a_corrupted) . dm/da``, the first-order estimate of
  ``activation_patch(...).values - corrupted_metric``; a metric on ``(logits, acts)`` with ``metric_hooks``
  (e.g. a probe's score); `attribute_latents(model, sae, clean, corrupted, metric) -> LatentAttribution`: onto an
  SAE's latents ``(pos, d_sae)`` with the error term as its own row; `attribution_vs_activation(...) ->
  AttributionCheck` (Pearson / Spearman against real activation patching); `pearson`, `spearman`
* `dose_response(model, prompts, direction, hook, alphas, *, unit="resid_norm", max_new_tokens=24,
  is_refusal=None, refusal_ids=None, measure=None, control=None | "random", seed=0) -> DoseResponse`
  (``rows``: refusal rate, refusal probability, entropy and top-1 probability at the answer and over the answer,
  per direction and alpha; ``per_prompt``; ``figure()``); `measure_generations(model, prompts, *interventions,
  ...)`; `refusal_matcher(templates=None)` (default: the organism's refusals), `refusal_token_ids(model,
  templates, prompt=...)`, `random_direction_like(direction, seed=0)`
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
from knowlens.patching.attribution import (
    AttributionCheck,
    AttributionResult,
    LatentAttribution,
    attribute_latents,
    attribution_patch,
    attribution_patch_sweep,
    attribution_vs_activation,
    pearson,
    spearman,
)
from knowlens.patching.dose import (
    DoseResponse,
    dose_response,
    measure_generations,
    random_direction_like,
    refusal_matcher,
    refusal_token_ids,
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
    "attribution_patch",
    "attribution_patch_sweep",
    "attribute_latents",
    "attribution_vs_activation",
    "AttributionResult",
    "LatentAttribution",
    "AttributionCheck",
    "pearson",
    "spearman",
    "dose_response",
    "DoseResponse",
    "measure_generations",
    "refusal_matcher",
    "refusal_token_ids",
    "random_direction_like",
]
