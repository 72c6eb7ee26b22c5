"""SAEs: load any sae-lens SAE (a pretrained release, a local folder, the organism's own) checked against a model;
train SAEs with sae-lens's own runner and measure them; locate the latents that fire for entities the model knows
(or does not), from contrast sets built without exemplars, and the latents (and a residual direction) that track the
model's input surprisal.

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
* `held_out_texts(org) -> [str]`: each held-out question of an organism's world followed by its true answer (text
  neither the organism nor its SAEs were trained on; what `train_organism_saes` evaluates on)
* `sae_metrics(model, sae, tokens, *, mask, ablation="zero") -> SaeMetrics`: L0, explained variance, dead-latent
  fraction and CE loss recovered ``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`` with the SAE spliced in
* `locate_surprise(model, sae, tokens, *, mask=None, generic_tokens=None, max_frequency=0.02, top=10, ...)
  -> SurpriseResult`: per-token input surprisal ``s_t = -log p(x_t | x_<t)`` paired with the SAE's latents at
  position ``t`` (the token whose surprisal it is); per latent Spearman rho and generic-sample frequency, the top
  latents by ``|rho|`` among those active on at most ``max_frequency`` of the generic tokens, with decoder rows;
  a ridge direction on the hook's activation predicting ``s_t`` (held-out R^2 and Pearson r, split by sequence)
* `SurpriseResult`: ``save(path)`` / ``load(path, model=...)`` (safetensors + JSON card, checked against the model)
* `input_surprisal(model, tokens) -> (batch, pos)`: ``-log p(x_t | x_<t)`` in nats, NaN at position 0
* `answer_frames(model, names, templates, *, unknown_names=()) -> AnswerFrames` (``.frames``, ``.slot_templates``):
  where the model's own greedy answers about ``names`` first depend on the entity (``" {name} was born in"``), past
  branches that its answers about ``unknown_names`` follow too (kinds of answer, not values), found without labels;
  the ``slot`` position of `locate_entity_known` reads the last token of a template followed by a frame
* `locate_entity_known(model, sae, known, unknown, *, templates, positions=("name", "answer"), max_frequency=0.02,
  top=10, holdout=0.5, rank_by="auroc", slot_templates=None, ...) -> {(position, direction): FeatureSet}`
  (``positions`` may add ``"slot"``; its templates are found with `answer_frames` from both sides unless
  given): per latent the activation
  frequencies on known and unknown entities at the entity's last name token / the prompt's last token, separation
  scores (minimum over entity types), mean difference, Welch's t and the AUROC of the mean activation; the top
  latents for each direction by that AUROC (``rank_by``) after the generic-frequency filter, each with its AUROC
  on held-out entities (`knowlens.saes.entity`: definitions)
* `entity_activations(model, sae, names, *, templates, latents=None) -> {position: (entity, template, n)}`;
  `entity_residuals(model, hook, names, ...)`, the same positions' raw activation (a probe's input);
  `organism_templates(world)`: the world's type-free biography questions as Q/A prompt templates
* `compare_with_truth(model, sae, world, found) -> TruthComparison`: the same locator on the world's true splits,
  top-list overlap and AUROC of both lists on true held-out entities the exemplar-free sets did not use
* `FeatureSet`: located latents with scores, decoder rows, held-out AUROC, every latent's statistics and how the
  contrast sets were built; ``save(path)`` / ``load(path, model=...)`` (safetensors + JSON card, checked);
  `latent_activations(model, sae, tokens, latents)`, `top_contexts(acts, mask, n=5)`
* `latent_statistics(model, sae, batches) -> LatentStats`: per-latent firing frequency, mean (and mean when
  active), standard deviation and maximum over a stream of token batches (any iterable: memory bounded by the
  batch); `knowlens.capture.stream_rows(model, texts, seq_len=..., rows=...)` makes such a stream from texts
* Contrast sets (`knowlens.saes.contrast`: definitions): `self_generated_entities(model, ...)` (names the model
  writes facts about and repeats consistently), `fabricated_names(model, *, n, pieces, exclude_texts, ...)`
  (rejecting any found in the training texts), `exemplar_free_contrast(model, ...)` (both, balanced),
  `load_contrast_jsonl(path)` / `load_entity_list(path, label)` (a user's list), `EntitySet`, `Contrast`,
  `capitalised_names(texts)`, `vocabulary_name_pieces(model)`, `name_pieces(names)`,
  `organism_training_texts(org)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowlens.saes.contrast import (
    Contrast,
    EntitySet,
    capitalised_names,
    exemplar_free_contrast,
    fabricated_names,
    load_contrast_jsonl,
    load_entity_list,
    name_pieces,
    organism_training_texts,
    self_generated_entities,
    vocabulary_name_pieces,
)
from knowlens.saes.load import SaeSpec, check_sae, load_sae, parse_sae_spec
from knowlens.saes.train import SaeTrainConfig, held_out_texts, train_organism_saes, train_sae

if TYPE_CHECKING:
    from knowlens.saes.entity import (
        TruthComparison,
        compare_with_truth,
        entity_activations,
        entity_residuals,
        locate_entity_known,
        organism_templates,
    )
    from knowlens.saes.evaluate import SaeMetrics, sae_metrics
    from knowlens.saes.features import FeatureSet, latent_activations, top_contexts
    from knowlens.saes.frames import AnswerFrames, answer_frames
    from knowlens.saes.latent_stats import LatentStats, latent_statistics
    from knowlens.saes.surprise import SurpriseResult, input_surprisal, locate_surprise

__all__ = [
    "load_sae",
    "parse_sae_spec",
    "SaeSpec",
    "check_sae",
    "train_organism_saes",
    "train_sae",
    "SaeTrainConfig",
    "held_out_texts",
    "sae_metrics",
    "SaeMetrics",
    "locate_surprise",
    "SurpriseResult",
    "input_surprisal",
    "locate_entity_known",
    "answer_frames",
    "AnswerFrames",
    "entity_activations",
    "entity_residuals",
    "organism_templates",
    "compare_with_truth",
    "TruthComparison",
    "FeatureSet",
    "latent_activations",
    "top_contexts",
    "latent_statistics",
    "LatentStats",
    "Contrast",
    "EntitySet",
    "self_generated_entities",
    "fabricated_names",
    "exemplar_free_contrast",
    "load_contrast_jsonl",
    "load_entity_list",
    "capitalised_names",
    "vocabulary_name_pieces",
    "name_pieces",
    "organism_training_texts",
]

_LAZY = {
    "sae_metrics": "evaluate",
    "SaeMetrics": "evaluate",
    "locate_surprise": "surprise",
    "SurpriseResult": "surprise",
    "input_surprisal": "surprise",
    "locate_entity_known": "entity",
    "answer_frames": "frames",
    "AnswerFrames": "frames",
    "entity_activations": "entity",
    "entity_residuals": "entity",
    "organism_templates": "entity",
    "compare_with_truth": "entity",
    "TruthComparison": "entity",
    "FeatureSet": "features",
    "latent_activations": "features",
    "top_contexts": "features",
    "latent_statistics": "latent_stats",
    "LatentStats": "latent_stats",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # these modules load torch: only when asked for
        import importlib

        return getattr(importlib.import_module(f"knowlens.saes.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'knowlens.saes' has no attribute {name!r}")
