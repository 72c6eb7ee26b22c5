"""`FeatureSet`: SAE latents located for one purpose (e.g. entity-known at the name token), saved and checked.

A feature set holds the model's identity (name, weight fingerprint, shape fingerprint), the hook and SAE it reads,
the position rule, the chosen latents in rank order with their scores, decoder rows and held-out AUROC, every
latent's statistics (``per_latent``: named ``d_sae`` vectors), how the contrast sets were built and the parameters.

`FeatureSet.save(path)` writes ``path`` (safetensors: ``latents``, ``scores``, ``decoder``, ``heldout_auroc`` and
``per_latent.<name>``) and ``path`` with suffix ``.json`` (a card: everything else, the knowlens version and the
SHA-256 of the tensor file), each atomically. `FeatureSet.load(path, model=None)` reads them without unpickling,
refuses a tensor file that does not match its card (truncated or replaced), tensors whose shapes do not fit
together, and, given a model, one whose weight fingerprint differs; each with a one-line KnowlensError. The file
pair itself is written and checked by `save_with_card` / `load_with_card`, for any tensors + card artifact.

`latent_activations(model, sae, tokens, latents)` and `top_contexts(...)`: the chosen latents' activations over
token rows and where each is highest (what a report shows beside each latent).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knowlens.errors import KnowlensError
from knowlens.fingerprint import check_same_model, model_identity
from knowlens.saes.activations import encode_latents
from knowlens.saes.cards import load_with_card, one_line, save_with_card
from knowlens.types import Bool, Float, Int, Tensor

FORMAT = "knowlens.feature_set"
FORMAT_VERSION = 1
_TOP = ("latents", "scores", "heldout_auroc")
_CARD = ("model", "hook", "sae_label", "name", "position", "contrast", "params")
_PER = "per_latent."


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """Latents of one SAE that mark one thing (``name``) at one position; tensors on the CPU."""

    model: dict[str, str]  # model_identity: name, fingerprint, shape_fingerprint
    hook: str
    sae_label: str
    name: str  # what the latents mark, e.g. "entity-known" / "entity-unknown"
    position: str  # the position rule, e.g. "name" (the entity's last name token) or "answer"
    latents: Int[Tensor, " top"]  # in rank order
    scores: Float[Tensor, " top"]  # the ranking score of each
    decoder: Float[Tensor, "top d_in"]  # W_dec rows of the latents
    heldout_auroc: Float[Tensor, " top"]  # NaN where not measured
    per_latent: dict[str, Float[Tensor, " d_sae"]] = field(default_factory=dict)
    contrast: dict[str, Any] = field(default_factory=dict)  # Contrast.to_dict(): how the sets were built
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latents.numel())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.safetensors`` appended if missing) and its ``.json`` card; return the tensor file."""
        tensors = {n: getattr(self, n) for n in (*_TOP, "decoder")}
        tensors.update({_PER + k: v for k, v in self.per_latent.items()})
        card = {n: getattr(self, n) for n in _CARD} | {"per_latent": sorted(self.per_latent)}
        return save_with_card(path, tensors, card, fmt=FORMAT, version=FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: Any = None) -> FeatureSet:
        """Read a saved feature set; with ``model``, refuse it unless it was made with that model's weights."""
        card, tensors, (tensors_path, card_path) = load_with_card(path, fmt=FORMAT, version=FORMAT_VERSION,
                                                                  what="feature set")  # fmt: skip
        what = f"feature set {tensors_path}"
        per_names = card.get("per_latent")
        if not isinstance(per_names, list):
            raise KnowlensError(f"feature set {card_path}: malformed card (no per_latent list)")
        missing = [n for n in (*_TOP, "decoder", *(_PER + k for k in per_names)) if n not in tensors]
        if missing:
            raise KnowlensError(f"{what}: missing tensors {', '.join(missing)}")
        per = {k: tensors[_PER + k] for k in per_names}
        _check_shapes(tensors, per, what)
        if model is not None:
            check_same_model(card.get("model") or {}, model_identity(model), what=what, error=KnowlensError)
        try:
            values = {n: card[n] for n in _CARD}
            if not all(isinstance(values[n], str) for n in ("hook", "sae_label", "name", "position")):
                raise TypeError("hook, sae_label, name and position must be strings")
            if not all(isinstance(values[n], dict) for n in ("model", "contrast", "params")):
                raise TypeError("model, contrast and params must be objects")
        except (KeyError, TypeError) as err:
            raise KnowlensError(f"feature set {card_path}: malformed card ({type(err).__name__}: {one_line(err)})") from None
        return cls(model=values["model"], hook=values["hook"], sae_label=values["sae_label"], name=values["name"],
                   position=values["position"], latents=tensors["latents"], scores=tensors["scores"],
                   decoder=tensors["decoder"], heldout_auroc=tensors["heldout_auroc"], per_latent=per,
                   contrast=values["contrast"], params=values["params"])  # fmt: skip

    def summary_rows(self) -> list[dict[str, Any]]:
        """One dict per latent in rank order: latent, score, held-out AUROC and its ``per_latent`` values."""
        rows = []
        for i, latent in enumerate(self.latents.tolist()):
            row = {"rank": i + 1, "latent": latent, "score": float(self.scores[i]),
                   "heldout_auroc": float(self.heldout_auroc[i])}  # fmt: skip
            row.update({k: float(v[latent]) for k, v in self.per_latent.items()})
            rows.append(row)
        return rows


def _check_shapes(t: dict[str, Tensor], per: dict[str, Tensor], what: str) -> None:
    top = t["latents"].shape
    if len(top) != 1 or t["latents"].is_floating_point():
        raise KnowlensError(f"{what}: tensor latents is not a 1-D integer tensor")
    for n in ("scores", "heldout_auroc"):
        if t[n].shape != top:
            raise KnowlensError(f"{what}: tensor {n} has shape {tuple(t[n].shape)}, expected {tuple(top)}")
    if t["decoder"].ndim != 2 or t["decoder"].shape[0] != top[0]:
        raise KnowlensError(f"{what}: tensor decoder has shape {tuple(t['decoder'].shape)}, expected ({top[0]}, d_in)")
    sizes = {tuple(v.shape) for v in per.values()}
    if len(sizes) > 1 or any(len(s) != 1 for s in sizes):
        raise KnowlensError(f"{what}: per-latent tensors are not 1-D of one length ({sorted(sizes)})")
    if sizes and top[0] and not (0 <= int(t["latents"].min()) and int(t["latents"].max()) < next(iter(sizes))[0]):
        raise KnowlensError(f"{what}: latent indices outside 0..{next(iter(sizes))[0] - 1}")


@torch.no_grad()
def latent_activations(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    latents: Int[Tensor, " n"] | list[int],
    *,
    batch_size: int = 32,
) -> Float[Tensor, "batch pos n"]:
    """The activations of ``latents`` of ``sae`` at every position of ``tokens`` (float32, CPU); no hook is left
    on the model."""
    from knowlens.capture.hooks import stop_layer_for

    hook = sae.cfg.metadata.hook_name
    idx = torch.as_tensor(latents, dtype=torch.long)
    device = next(iter(model.parameters())).device
    seen: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen["act"] = act.detach()

    out = []
    with model.hooks(fwd_hooks=[(hook, capture)]):
        for start in range(0, tokens.shape[0], batch_size):
            seen.clear()
            model(tokens[start : start + batch_size].to(device), stop_at_layer=stop_layer_for(model, [hook]))
            out.append(encode_latents(sae, seen["act"])[..., idx.to(sae.W_dec.device)].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, tokens.shape[1], len(idx))


def top_contexts(
    acts: Float[Tensor, "batch pos n"], mask: Bool[Tensor, "batch pos"], *, n: int = 5
) -> list[list[tuple[int, int, float]]]:
    """Per latent (last axis), up to ``n`` (row, position, activation) of its highest activations > 0 at valid
    positions (``mask``), at most one per row."""
    out = []
    masked = acts.masked_fill(~mask.to(acts.device)[..., None], -math.inf)
    best, where = masked.max(dim=1)  # (batch, n): each row's best position per latent
    for j in range(acts.shape[-1]):
        order = torch.argsort(best[:, j], descending=True, stable=True)[:n]
        out.append([(int(r), int(where[r, j]), float(best[r, j])) for r in order if float(best[r, j]) > 0])
    return out
