"""SAEs: load any sae-lens SAE (a pretrained release, a local folder, the organism's own) checked against a model;
train SAEs with sae-lens's own runner and measure them; locate the latents (and a residual direction) that track the
model's input surprisal (locating entity-known features comes with a later part of issue 8).

Public API (re-exports only):

* `load_sae(spec, model, *, device=None) -> sae_lens.SAE`: through sae-lens's own loaders, checked against the
  model (hook exists, ``d_in`` equals the hook's width), on the model's device, in eval mode. ``spec`` is
  ``"release:sae_id"`` / ``(release, sae_id)`` (e.g. ``"gpt2-small-res-jb:blocks.8.hook_resid_pre"``), a folder
  in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``) or ``"organism:<hook>"``
* `parse_sae_spec(spec) -> SaeSpec` (``.kind``, ``.label``): how a spec is read, without loading anything
* `check_sae(sae, model, *, label)`: the model check alone, for an SAE already in memory
* `train_organism_saes(org, hooks=None, *, out_dir, config=SaeTrainConfig()) -> {hook: metrics}`: the organism's
  SAEs (default: resid_post of every layer) trained with sae-lens's ``LanguageModelSAETrainingRunner`` on its corpus
  in memory, each saved to ``out_dir/<hook>/`` in sae-lens's folder format with a ``metrics.json``
* `train_sae(model, docs, hook, *, pad_id, config) -> TrainingSAE`: one SAE on any model's token documents
* `SaeTrainConfig`: architecture (default TopK), width, k, steps, batch, lr, seed, context size (frozen)
* `sae_metrics(model, sae, tokens, *, mask, ablation="zero") -> SaeMetrics`: L0, explained variance, dead-latent
  fraction and CE loss recovered ``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`` with the SAE spliced in
* `locate_surprise(model, sae, tokens, *, mask=None, generic_tokens=None, max_frequency=0.02, top=10, ...)
  -> SurpriseResult`: per-token input surprisal ``s_t = -log p(x_t | x_<t)`` paired with the SAE's latents at
  position ``t`` (the token whose surprisal it is); per latent Spearman rho and generic-sample frequency, the top
  latents by ``|rho|`` among those active on at most ``max_frequency`` of the generic tokens, with decoder rows;
  a ridge direction on the hook's activation predicting ``s_t`` (held-out R^2 and Pearson r, split by sequence)
* `SurpriseResult`: ``save(path)`` / ``load(path, model=...)`` (safetensors + JSON card, checked against the model)
* `input_surprisal(model, tokens) -> (batch, pos)`: ``-log p(x_t | x_<t)`` in nats, NaN at position 0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowlens.saes.load import SaeSpec, check_sae, load_sae, parse_sae_spec
from knowlens.saes.train import SaeTrainConfig, train_organism_saes, train_sae

if TYPE_CHECKING:
    from knowlens.saes.evaluate import SaeMetrics, sae_metrics
    from knowlens.saes.surprise import SurpriseResult, input_surprisal, locate_surprise

__all__ = [
    "load_sae",
    "parse_sae_spec",
    "SaeSpec",
    "check_sae",
    "train_organism_saes",
    "train_sae",
    "SaeTrainConfig",
    "sae_metrics",
    "SaeMetrics",
    "locate_surprise",
    "SurpriseResult",
    "input_surprisal",
]


def __getattr__(name: str) -> Any:
    if name in ("sae_metrics", "SaeMetrics"):  # knowlens.saes.evaluate loads torch: only when asked for
        from knowlens.saes import evaluate

        return getattr(evaluate, name)
    if name in ("locate_surprise", "SurpriseResult", "input_surprisal"):  # loads torch too
        from knowlens.saes import surprise

        return getattr(surprise, name)
    raise AttributeError(f"module 'knowlens.saes' has no attribute {name!r}")
