"""What a probe reads: the hook's activation itself, an SAE's latents of it, or the latents of a FeatureSet.

`probe_features(activations, sae=None, feature_set=None)` turns a hook's activations ``(n, d_in)`` into the probe's
feature matrix and returns the rule it applied (`InputRule`), which the probe card records as its ``input`` and
`InputRule.apply` repeats at scoring time:

* ``residual``: the activations as they are, ``(n, d_in)``;
* ``sae_latents``: ``sae.encode(x)``, all ``d_sae`` latents;
* ``feature_set``: ``sae.encode(x)[:, latents]``, the FeatureSet's latents (indices into the SAE's latent vector)
  in its rank order.

Activations with more than one trailing dimension (attention heads) are flattened to ``d_in``. SAEs are encoded
in their own dtype and device; features come back as float64 on the activations' device (float32 on MPS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from knowlens.errors import KnowlensError
from knowlens.types import Float, Tensor

INPUT_KINDS = ("residual", "sae_latents", "feature_set")


@dataclass(frozen=True)
class InputRule:
    """How a probe's features are made from the hook's activation (module docstring)."""

    kind: str  # "residual" | "sae_latents" | "feature_set"
    d_in: int  # the activation's (flattened) width
    n_features: int
    sae: str | None = None  # the SAE's label (a sae-lens release:id or a folder)
    d_sae: int | None = None
    latents: tuple[int, ...] | None = None  # feature_set: indices into the SAE's latents
    feature_set: str | None = None  # feature_set: what its latents mark, e.g. "entity-known"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "d_in": self.d_in, "n_features": self.n_features}
        if self.kind != "residual":
            out.update(sae=self.sae, d_sae=self.d_sae)
        if self.kind == "feature_set":
            out.update(feature_set=self.feature_set, latents=list(self.latents or ()))
        return out

    @classmethod
    def from_dict(cls, d: Any) -> InputRule:
        """The inverse of `to_dict`; KnowlensError naming the problem for anything else."""
        if not isinstance(d, dict) or d.get("kind") not in INPUT_KINDS:
            raise KnowlensError(f"malformed input rule {d!r}: kind must be one of {', '.join(INPUT_KINDS)}")
        try:
            kind = d["kind"]
            rule = cls(kind=kind, d_in=_count(d["d_in"]), n_features=_count(d["n_features"]))
            if kind == "residual":
                if rule.n_features != rule.d_in:
                    raise ValueError("a residual probe reads d_in features")
                return rule
            if not isinstance(d["sae"], str):
                raise TypeError("sae must be a string")
            d_sae = _count(d["d_sae"])
            if kind == "sae_latents":
                if rule.n_features != d_sae:
                    raise ValueError("an SAE-latent probe reads d_sae features")
                return cls(kind, rule.d_in, rule.n_features, d["sae"], d_sae)
            latents = d["latents"]
            if not (isinstance(latents, list) and all(_is_int(i) and 0 <= i < d_sae for i in latents)):
                raise ValueError(f"latents must be indices in 0..{d_sae - 1}")
            if len(latents) != rule.n_features:
                raise ValueError("a feature-set probe reads one feature per latent")
            name = d.get("feature_set")
            return cls(kind, rule.d_in, rule.n_features, d["sae"], d_sae, tuple(latents), None if name is None else str(name))
        except (KeyError, TypeError, ValueError) as err:
            raise KnowlensError(f"malformed input rule ({type(err).__name__}: {err})") from None

    def describe(self) -> str:
        if self.kind == "residual":
            return f"residual ({self.d_in} features)"
        if self.kind == "sae_latents":
            return f"latents of SAE {self.sae} ({self.d_sae} features)"
        return f"{self.n_features} latents of FeatureSet {self.feature_set!r} of SAE {self.sae}"

    def apply(self, activations: Float[Tensor, "*batch d_in"], sae: Any = None) -> Float[Tensor, "*batch n_features"]:
        """The feature matrix this rule makes from activations ``(..., d_in)`` (``sae`` needed for latents)."""
        x = _flat(activations, self.d_in)
        if self.kind == "residual":
            return x.to(_dtype(x.device))
        if sae is None:
            raise KnowlensError(f"this probe reads {self.describe()}: pass the SAE (load_probe(..., sae=...))")
        check_sae_fits(self, sae)
        feats = _encode(sae, x)
        if self.kind == "feature_set":
            feats = feats[..., torch.tensor(self.latents or (), dtype=torch.long, device=feats.device)]
        return feats.to(x.device, _dtype(x.device))


def probe_features(
    activations: Float[Tensor, "n ..."], *, sae: Any = None, feature_set: Any = None, sae_label: str | None = None
) -> tuple[Float[Tensor, "n n_features"], InputRule]:
    """The feature matrix for rows ``activations`` ``(n, ...)`` and the rule that made it (module docstring).

    ``feature_set`` (a `knowlens.saes.FeatureSet`) needs ``sae``: the SAE it was located on (same hook, same width).
    ``sae_label`` names the SAE in the rule (default: the FeatureSet's label, else the SAE's release:id or hook).
    """
    if activations.ndim < 2:
        raise KnowlensError(f"probe activations must be (n, d_in) rows, got shape {tuple(activations.shape)}")
    activations = activations.reshape(activations.shape[0], -1)
    d_in = int(activations.shape[1])
    if sae is None:
        if feature_set is not None:
            raise KnowlensError("a FeatureSet's latents need the SAE it was located on (sae=...)")
        rule = InputRule("residual", d_in, d_in)
        return rule.apply(activations), rule
    d_sae = int(sae.cfg.d_sae)
    if int(sae.cfg.d_in) != d_in:
        raise KnowlensError(f"SAE reads {int(sae.cfg.d_in)} features, the activations have {d_in}")
    if feature_set is None:
        rule = InputRule("sae_latents", d_in, d_sae, sae_label or _sae_label(sae), d_sae)
        return rule.apply(activations, sae), rule
    latents = tuple(int(i) for i in feature_set.latents.tolist())
    if not latents:
        raise KnowlensError(f"FeatureSet {feature_set.name!r} holds no latents")
    if not all(0 <= i < d_sae for i in latents):
        raise KnowlensError(f"FeatureSet {feature_set.name!r}: latent indices outside the SAE's 0..{d_sae - 1}")
    sae_hook = _sae_hook(sae)
    if sae_hook is not None and feature_set.hook != sae_hook:
        raise KnowlensError(f"FeatureSet {feature_set.name!r} was located at {feature_set.hook}, the SAE reads {sae_hook}")
    widths = {int(v.numel()) for v in feature_set.per_latent.values()}
    if widths and widths != {d_sae}:
        raise KnowlensError(f"FeatureSet {feature_set.name!r} was located on an SAE of {widths.pop()} latents, "
                            f"this one has {d_sae}")  # fmt: skip
    label = sae_label or feature_set.sae_label or _sae_label(sae)
    rule = InputRule("feature_set", d_in, len(latents), label, d_sae, latents, feature_set.name)
    return rule.apply(activations, sae), rule


def check_sae_fits(rule: InputRule, sae: Any) -> None:
    """KnowlensError unless ``sae`` has the width the rule was made with."""
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    if (d_in, d_sae) != (rule.d_in, rule.d_sae):
        raise KnowlensError(f"this probe reads SAE {rule.sae} (d_in {rule.d_in}, d_sae {rule.d_sae}); the SAE given "
                            f"has d_in {d_in}, d_sae {d_sae}")  # fmt: skip


def _flat(x: Tensor, d_in: int) -> Tensor:
    if x.shape[-1] != d_in:
        flat = x.reshape(*x.shape[:-2], -1) if x.ndim >= 2 else x
        if flat.shape[-1] != d_in:
            raise KnowlensError(f"activations of width {x.shape[-1]} (shape {tuple(x.shape)}); this probe reads {d_in}")
        return flat
    return x


def _encode(sae: Any, x: Tensor) -> Tensor:
    param = sae.W_dec
    with torch.no_grad():
        return sae.encode(x.to(param.device, param.dtype))


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _sae_hook(sae: Any) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None)
    return hook if isinstance(hook, str) else None


def _sae_label(sae: Any) -> str:
    from knowlens.saes.activations import default_label

    return default_label(sae)


def _count(v: Any) -> int:
    if not _is_int(v) or v < 1:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return int(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
