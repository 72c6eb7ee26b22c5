"""Labels: per-token reliability labels computed while the model generates, with the signals behind them.

Public API (re-exports only):

* `label_generation(model, prompts, probes, *, max_new_tokens, threshold=None, combine="first", on_token=None, ...)
  -> TokenLabels`: the probes applied inside the KV-cached capture loop's ``on_step``, on the model's device;
  `resolve_probes(model, probes)` (the checks it runs), `capitalised_piece` (the default name-piece test)
* `TokenLabels` (``.to_jsonl(path)``, ``.to_html(path)``, ``.with_classes(classes)``, ``.records()``),
  `GenerationLabels`, `TokenLabel`
* explanations (``label_generation(..., explain=True, sae=...)``, `knowlens.labels.explain`): `Explanation`,
  `Entry`, `explain_generation(model, tokens, prompt_len, indices, probe, *, sae=None, top_k=5) -> [Explanation]`,
  `attribute_reads(model, tokens, reads, probe, *, sae=None, position_hook=None) -> [Attribution]` (full values),
  `check_explanations(model, labels, probe, sae, *, sample=32) -> ExplanationCheck` (real ablation of the top latent)
"""

from knowlens.labels.explain import (
    Attribution,
    Entry,
    Explanation,
    ExplanationCheck,
    attribute_reads,
    check_explanations,
    explain_generation,
)
from knowlens.labels.generation import COMBINE, capitalised_piece, label_generation, resolve_probes
from knowlens.labels.tokens import LABELS, GenerationLabels, TokenLabel, TokenLabels

__all__ = [
    "label_generation",
    "resolve_probes",
    "capitalised_piece",
    "COMBINE",
    "LABELS",
    "TokenLabel",
    "GenerationLabels",
    "TokenLabels",
    "Explanation",
    "Entry",
    "Attribution",
    "ExplanationCheck",
    "attribute_reads",
    "explain_generation",
    "check_explanations",
]
