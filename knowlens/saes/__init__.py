"""SAEs: load any sae-lens SAE (a pretrained release, a local folder, the organism's own) checked against a model
(training the organism's SAEs and locating features come with later parts of issue 8).

Public API (re-exports only):

* `load_sae(spec, model, *, device=None) -> sae_lens.SAE`: through sae-lens's own loaders, checked against the
  model (hook exists, ``d_in`` equals the hook's width), on the model's device, in eval mode. ``spec`` is
  ``"release:sae_id"`` / ``(release, sae_id)`` (e.g. ``"gpt2-small-res-jb:blocks.8.hook_resid_pre"``), a folder
  in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``) or ``"organism:<hook>"``
* `parse_sae_spec(spec) -> SaeSpec` (``.kind``, ``.label``): how a spec is read, without loading anything
* `check_sae(sae, model, *, label)`: the model check alone, for an SAE already in memory
"""

from knowlens.saes.load import SaeSpec, check_sae, load_sae, parse_sae_spec

__all__ = ["load_sae", "parse_sae_spec", "SaeSpec", "check_sae"]
