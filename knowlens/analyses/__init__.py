"""Analyses: answers graded against the world, behaviour gates, reports, the entropy-gap study.

Public API (re-exports only):

* `entropy_gap(model, prompts, *, others="derange" | "sample" | one continuation per prompt, max_new_tokens=32,
  temperature=0.0, seed=0, n_bootstrap=2000, confidence=0.95) -> EntropyGap`: output entropy and input surprisal
  at each continuation position, the model's own continuation vs other text after the same prompt, per position,
  with the ratio own/other and a bootstrap interval over prompts (`knowlens.analyses.entropy_gap`)
* `EntropyGap` (``.subset(rows)``, ``.to_dict()``, ``.means()``), `format_entropy_gap(gap) -> str`

The function shares its name with its module: imported here eagerly, so ``knowlens.analyses.entropy_gap`` is the
function (a lazy ``__getattr__`` would find the submodule instead once anything had imported it).
"""

from knowlens.analyses.entropy_gap import EntropyGap, entropy_gap, format_entropy_gap

__all__ = ["entropy_gap", "EntropyGap", "format_entropy_gap"]
