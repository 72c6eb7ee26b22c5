"""Analyses: answers graded against the world, behaviour gates, reports, the entropy-gap study.

Public API (re-exports only):

* `entropy_gap(model, prompts, *, others="derange" | "sample" | one continuation per prompt, max_new_tokens=32,
  temperature=0.0, seed=0, n_bootstrap=2000, confidence=0.95) -> EntropyGap`: output entropy and input surprisal
  at each continuation position, the model's own continuation vs other text after the same prompt, per position,
  with the ratio own/other and a bootstrap interval over prompts (`knowlens.analyses.entropy_gap`)
* `EntropyGap` (``.subset(rows)``, ``.to_dict()``, ``.means()``), `format_entropy_gap(gap) -> str`
* `evaluate_signals(model, world, items, *, probes=None, sae=None, k=8, fit="cross", seed=0, n_boot=1000, folds=5,
  ...) -> Evaluation`: token-level AUROC, AUPRC, recall at 10% false-positive rate, ECE and Brier (raw and after
  cross-fitted Platt scaling) of every reliability signal (exemplar-free labels, ground-truth probe, best SAE latent,
  top-1 probability, entropy, self-consistency) against an organism's grader on answer-value tokens, with bootstrap
  intervals over entities, per split, a risk-coverage curve and the cost per token (`knowlens.analyses.evaluation`)
* `Evaluation` (``.to_markdown()``, ``.to_dict()``, ``.to_html(path)``, ``[name]``), `SignalResult`
* `average_precision(scores, labels)`, `recall_at_fpr(scores, labels, *, max_fpr=0.1)`,
  `risk_coverage(reliability, correct) -> (coverage, accuracy, area)` (`knowlens.analyses.eval_metrics`)

The function shares its name with its module: imported here eagerly, so ``knowlens.analyses.entropy_gap`` is the
function (a lazy ``__getattr__`` would find the submodule instead once anything had imported it).
"""

from knowlens.analyses.entropy_gap import EntropyGap, entropy_gap, format_entropy_gap
from knowlens.analyses.eval_metrics import average_precision, recall_at_fpr, risk_coverage
from knowlens.analyses.evaluation import Evaluation, SignalResult, evaluate_signals

__all__ = [
    "entropy_gap",
    "EntropyGap",
    "format_entropy_gap",
    "evaluate_signals",
    "Evaluation",
    "SignalResult",
    "average_precision",
    "recall_at_fpr",
    "risk_coverage",
]
