"""Probe files: ``name.safetensors`` (weight, bias, mean, std; float64) + ``name.json`` (the card), checked on load.

The card holds the format and its version, the knowlens version, the SHA-256 of the tensor file, the probe's
``name`` and ``kind`` (``logistic`` / ``ridge``), the ``model`` that made it (name, weight fingerprint, shape
fingerprint, d_model, n_layers, d_vocab), the ``hook``, the ``position`` rule, the ``input`` rule
(`knowlens.probes.features.InputRule`: residual, SAE latents, or a FeatureSet's latents, with the SAE's label), the
``target`` and ``label_source``, ``standardisation``, ``regularisation``, ``calibration``, ``threshold``, the
``arithmetic`` (below, in words), ``training`` (how many examples of each class, groups, folds, seed, L2 grid and
choices, class weights) and ``metrics`` (out-of-fold AUROC with its interval, ECE, Brier, log-loss; or R^2).

Arithmetic, for a feature row ``x`` (the hook's activation, or the SAE latents the input rule names):

    z = sum_j (x_j - mean_j) / std_j * weight_j + bias[0]
    logistic: p = 1 / (1 + exp(-(scale * z + shift)))   calibration none: scale 1, shift 0;
              temperature T: scale 1/T, shift 0; platt a, b: scale a, shift b
    ridge:    the prediction is z

Both files are written atomically (`knowlens.saes.cards.save_with_card`). `load_probe` reads them without
unpickling and refuses, with one line naming the file: a missing file, a truncated or replaced tensor file (SHA-256),
a missing tensor, a tensor of another dtype or shape, a malformed card, and, given a model, one whose weight
fingerprint differs from the card's (naming both), or given an SAE, one of another width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knowlens.errors import KnowlensError
from knowlens.fingerprint import check_same_model, model_identity
from knowlens.probes.calibration import Calibration
from knowlens.probes.features import InputRule, check_sae_fits
from knowlens.probes.fit import PROBE_KINDS, ProbeFit
from knowlens.saes.cards import load_with_card, one_line, save_with_card
from knowlens.types import Float, Tensor

FORMAT = "knowlens.probe"
FORMAT_VERSION = 1
TENSORS = ("weight", "bias", "mean", "std")
ARITHMETIC = (
    "z = sum_j (x_j - mean_j) / std_j * weight_j + bias[0]; logistic: p = 1 / (1 + exp(-(scale * z + shift))) "
    "with (scale, shift) = (1, 0) for calibration none, (1 / temperature, 0) for temperature, (a, b) for platt; "
    "ridge: the prediction is z. x: the hook's activation at the position rule, or the SAE latents the input rule "
    "names (sae.encode(x), then [latents] for a feature set)"
)


def save_probe(
    path: str | os.PathLike[str],
    fit: ProbeFit,
    *,
    model: Any,
    hook: str,
    position: str,
    input_rule: InputRule,
    label_source: str,
    target: str = "",
    name: str | None = None,
    model_name: str | None = None,
    threshold: float | None = None,
) -> Path:
    """Write ``fit`` to ``path`` (``.safetensors`` appended if missing) and its ``.json`` card; return the tensor file.

    ``model``: the model the features came from (fingerprinted here) or its `model_identity` dict. ``threshold``:
    the calibrated probability above which a row is called class 1 (default 0.5; none for ridge).
    """
    d = int(fit.weight.numel())
    if input_rule.n_features != d:
        raise KnowlensError(f"the input rule makes {input_rule.n_features} features, the probe has {d} weights")
    identity = dict(model) if isinstance(model, dict) else _identity(model, model_name)
    if not identity.get("fingerprint"):
        raise KnowlensError("the model identity has no weight fingerprint")
    from knowlens.version import __version__

    tensors = {
        "weight": fit.weight.detach().to("cpu", torch.float64),
        "bias": torch.tensor([fit.bias], dtype=torch.float64),
        "mean": fit.mean.detach().to("cpu", torch.float64),
        "std": fit.std.detach().to("cpu", torch.float64),
    }
    path_name = Path(path).name.removesuffix(".safetensors")
    card = {
        "name": name or path_name,
        "kind": fit.kind,
        "model": identity,
        "hook": hook,
        "position": position,
        "input": input_rule.to_dict(),
        "target": target,
        "label_source": label_source,
        "standardisation": {"rule": "(x - mean) / std", "tensors": ["mean", "std"],
                            "note": "mean and std of the training rows (std 0 replaced by 1)"},  # fmt: skip
        "regularisation": {"l2": fit.l2, "objective": _OBJECTIVE[fit.kind]},
        "calibration": fit.calibration.to_dict(),
        "threshold": (0.5 if threshold is None else float(threshold)) if fit.kind == "logistic" else None,
        "dtype": "float64",
        "arithmetic": ARITHMETIC,
        "training": fit.training | {"knowlens_version": __version__},
        "metrics": fit.metrics,
    }
    return save_with_card(path, tensors, card, fmt=FORMAT, version=FORMAT_VERSION)


_OBJECTIVE = {
    "logistic": "sum_i c_i logloss(y_i, z_i) + l2 / 2 ||weight||^2 (c_i: class weight; scikit-learn C = 1 / l2)",
    "ridge": "1/n sum_i (y_i - z_i)^2 + l2 ||weight||^2 (bias = mean(y); scikit-learn Ridge alpha = n l2)",
}


def _identity(model: Any, name: str | None) -> dict[str, Any]:
    identity: dict[str, Any] = dict(model_identity(model, name))
    cfg = getattr(model, "cfg", None)
    for key in ("d_model", "n_layers", "d_vocab"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            identity[key] = value
    return identity


@dataclass(frozen=True, eq=False)
class LoadedProbe:
    """A probe read from its files: ``score(activations)`` applies input rule, standardisation, weights, bias and
    calibration in torch on the activations' device (float64; float32 on MPS)."""

    path: Path
    card: dict[str, Any]
    name: str
    kind: str
    hook: str
    position: str
    input: InputRule
    calibration: Calibration
    threshold: float | None
    weight: Float[Tensor, " d"]
    bias: Float[Tensor, " 1"]
    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    sae: Any = None
    _moved: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> dict[str, Any]:
        return self.card["model"]

    def features(self, activations: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d"]:
        """The feature rows the probe reads, from the hook's activations (encoded with the SAE if the input needs it)."""
        return self.input.apply(activations, self.sae)

    def decision(self, features: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch"]:
        """``z``: the linear output on feature rows (the logit for a logistic probe, the prediction for ridge)."""
        dtype = torch.float32 if features.device.type == "mps" else torch.float64
        key = (features.device, dtype)
        if key not in self._moved:
            self._moved[key] = tuple(t.to(features.device, dtype) for t in (self.weight, self.bias, self.mean, self.std))
        w, b, mu, sd = self._moved[key]
        if features.shape[-1] != w.shape[0]:
            raise KnowlensError(f"probe {self.name} reads {w.shape[0]} features, got rows of {features.shape[-1]}")
        return ((features.to(dtype) - mu) / sd) @ w + b[0]

    def score_features(self, features: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch"]:
        """The calibrated probability of class 1 (logistic) or the prediction (ridge) of feature rows."""
        z = self.decision(features)
        return self.calibration.apply(z) if self.kind == "logistic" else z

    def score(self, activations: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch"]:
        """``p`` for the hook's activations ``(..., d_in)``: calibrated probability of class 1 (ridge: prediction)."""
        return self.score_features(self.features(activations))


def load_probe(
    path: str | os.PathLike[str], *, model: Any = None, sae: Any = None, device: str | torch.device | None = None
) -> LoadedProbe:
    """Read a probe written by `save_probe` (module docstring: what is refused). With ``model``, refuse it unless
    the card's weight fingerprint is that model's and the hook exists on it; with ``sae``, attach it (needed to score
    a probe over SAE latents) after checking its width and hook; ``device``: where its tensors go (default CPU)."""
    card, tensors, (tensors_path, card_path) = load_with_card(path, fmt=FORMAT, version=FORMAT_VERSION, what="probe")
    what = f"probe {tensors_path}"
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise KnowlensError(f"{what}: missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for n in TENSORS:
        if tensors[n].dtype != torch.float64:
            raise KnowlensError(f"{what}: tensor {n} is {str(tensors[n].dtype).removeprefix('torch.')}, expected float64")
    try:
        kind, hook, position = card["kind"], card["hook"], card["position"]
        if kind not in PROBE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
        if not (isinstance(hook, str) and isinstance(position, str) and isinstance(card["model"], dict)):
            raise TypeError("hook and position must be strings, model an object")
        rule = InputRule.from_dict(card["input"])
        calibration = Calibration.from_dict(card["calibration"])
        threshold = card.get("threshold")
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise TypeError("threshold must be a number or null")
        name = str(card.get("name") or tensors_path.stem)
    except (KeyError, TypeError, ValueError, KnowlensError) as err:
        raise KnowlensError(f"probe {card_path}: malformed card ({type(err).__name__}: {one_line(err)})") from None
    _check_shapes(tensors, rule.n_features, what)
    if model is not None:
        check_same_model(card["model"], model_identity(model), what=what, error=KnowlensError)
        hooks = getattr(model, "hook_dict", None)
        if isinstance(hooks, dict) and hook not in hooks:
            raise KnowlensError(f"{what}: reads hook {hook}, which this model does not have")
    if sae is not None:
        if rule.kind == "residual":
            raise KnowlensError(f"{what}: reads the residual itself, not SAE latents; load it without sae=")
        check_sae_fits(rule, sae)
        sae_hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if isinstance(sae_hook, str) and sae_hook != hook:
            raise KnowlensError(f"{what}: reads hook {hook}, the SAE given reads {sae_hook}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t = {n: tensors[n].to(dev, torch.float32 if dev.type == "mps" else torch.float64) for n in TENSORS}
    return LoadedProbe(path=tensors_path, card=card, name=name, kind=kind, hook=hook, position=position, input=rule,
                       calibration=calibration, threshold=None if threshold is None else float(threshold),
                       weight=t["weight"], bias=t["bias"], mean=t["mean"], std=t["std"], sae=sae)  # fmt: skip


def _check_shapes(t: dict[str, Tensor], d: int, what: str) -> None:
    want = {"weight": (d,), "mean": (d,), "std": (d,), "bias": (1,)}
    for n, shape in want.items():
        if tuple(t[n].shape) != shape:
            raise KnowlensError(f"{what}: tensor {n} has shape {tuple(t[n].shape)}, expected {shape}")
        if not bool(torch.isfinite(t[n]).all()):
            raise KnowlensError(f"{what}: tensor {n} holds NaN or infinite values")
    if not bool((t["std"] > 0).all()):
        raise KnowlensError(f"{what}: tensor std holds values <= 0")
