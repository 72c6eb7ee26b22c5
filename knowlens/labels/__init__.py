"""Labels: per-token reliability labels computed while the model generates, with the signals behind them.

Public API (re-exports only):

* `label_generation(model, prompts, probes, *, max_new_tokens, threshold=None, combine="first", on_token=None, ...)
  -> TokenLabels`: the probes applied inside the KV-cached capture loop's ``on_step``, on the model's device;
  `resolve_probes(model, probes)` (the checks it runs), `capitalised_piece` (the default name-piece test)
* `TokenLabels` (``.to_jsonl(path)``, ``.to_html(path)``, ``.with_classes(classes)``, ``.records()``),
  `GenerationLabels`, `TokenLabel`
"""

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
]
