"""Input-surprise latents and direction: `locate_surprise(model, sae, tokens) -> SurpriseResult`.

Definitions (Asvin G. & Lindsey 2026: a model represents how unlikely its latest input token was):

* **Surprisal.** ``s[b, t] = -log p(tokens[b, t] | tokens[b, :t])`` in nats, from the model's own logits at
  position ``t - 1`` (log-softmax in float64). It exists for ``t >= 1`` only.
* **Alignment.** ``s[b, t]`` is paired with the hook's activation (and the SAE's latents) *at position t*: the
  residual of the token ``x_t`` whose surprisal is measured, which has seen ``x_<=t`` but not the logits at
  ``t - 1`` (the model must recompute how surprising ``x_t`` was). The residual at ``t - 1`` predicts the
  distribution ``x_t`` is drawn from (output uncertainty): that is not this pairing.
* **Valid tokens.** ``mask[b, t]`` (default: every position) and ``t >= 1``: position 0 (the BOS) never counts,
  whatever the mask says. The caller masks padding out; right padding is exact (causal attention).
* **Spearman.** Per latent, the Pearson correlation of the ranks of its activation and of ``s`` over all valid
  tokens, ties (the many zeros among them) given their average rank; ranks in torch, from the nonzero entries
  only (memory O(nonzero activations), not O(tokens x d_sae)). NaN for a latent constant on the valid tokens.
* **Frequency filter.** A latent's frequency is the fraction of the *generic sample*'s tokens on which its
  activation is > 0: ``generic_tokens`` (valid positions: ``generic_mask`` and ``t >= 1``) or, by default, the
  valid tokens analysed. A latent active on *more than* ``max_frequency`` of them is dropped (``frequency <=
  max_frequency`` is kept), as Ferrando et al. 2025 drop always-on latents (2%). Top latents: the ``top`` kept
  ones by ``|rho|`` (NaN excluded), each with its signed rho, frequency and decoder row ``W_dec[latent]``.
* **Ridge direction.** ``s_t`` regressed on the hook's activation at ``t`` (flattened per position, standardised
  with the training rows' mean and standard deviation; constant features scaled by 1), closed form in float64
  on the model's device: ``w = (X'X/n + l2 I)^-1 X'(y - ȳ)/n``. Sequences (rows of ``tokens``) with a valid
  token are split at random (``seed``) into held-out (a ``holdout`` fraction) and training ones, so no sequence
  is on both sides; ``l2`` is the grid value with the lowest pooled squared error in a ``folds``-fold
  cross-validation over the training sequences (again grouped by sequence; standardised per fold). The fit on
  all training rows is scored on the held-out rows: ``r2 = 1 - Σ(y - ŷ)² / Σ(y - ȳ_test)²`` and Pearson r of
  ``ŷ`` with ``y``. Returned unstandardised: ``ŷ = intercept + x · direction`` with ``x`` the raw activation.

Hooks go on the model only inside ``model.hooks(...)``, which removes them whatever happens.
`SurpriseResult.save(path)` writes ``path`` (safetensors) and ``path`` with suffix ``.json`` (a card: model
identity, hook, SAE label, parameters, scores, the SHA-256 of the tensor file), each atomically; `load` reads
them without unpickling and refuses a file that does not match its card or a model that is not the one used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from knowlens.errors import KnowlensError
from knowlens.fingerprint import check_same_model, model_identity
from knowlens.saes.activations import (
    active_counts,
    architecture,
    checked_tokens,
    default_label,
    encode_latents,
    flatten_heads,
)
from knowlens.saes.cards import load_with_card, one_line, save_with_card
from knowlens.saes.stats import DEFAULT_L2_GRID, ridge_fit, spearman_sparse
from knowlens.types import Bool, Float, Int, Tensor

FORMAT = "knowlens.surprise"
FORMAT_VERSION = 1
_TENSORS = ("latents", "rho", "frequency", "decoder", "rho_all", "frequency_all", "direction", "test_sequences")


@dataclass(frozen=True, eq=False)
class SurpriseResult:
    """What `locate_surprise` found; tensors on the CPU. ``rho_all``/``frequency_all`` cover every latent."""

    model: dict[str, str]  # model_identity: name, fingerprint, shape_fingerprint
    hook: str
    sae_label: str
    latents: Int[Tensor, " top"]
    rho: Float[Tensor, " top"]
    frequency: Float[Tensor, " top"]
    decoder: Float[Tensor, "top d_in"]
    rho_all: Float[Tensor, " d_sae"]
    frequency_all: Float[Tensor, " d_sae"]
    direction: Float[Tensor, " d_in"]
    intercept: float
    l2: float
    r2: float
    pearson: float
    cv_mse: tuple[float, ...]
    test_sequences: Int[Tensor, " n_test"]  # rows of ``tokens`` held out from the ridge fit
    n_tokens: int
    n_sequences: int
    n_test_tokens: int
    n_generic_tokens: int
    surprisal_mean: float
    params: dict[str, Any]

    def predict(self, resid: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch"]:
        """The ridge direction's surprisal estimate (nats) from raw activations at the hook."""
        return self.intercept + resid.double() @ self.direction.to(resid.device, torch.float64)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.safetensors`` appended if missing) and its ``.json`` card; return the tensor file."""
        tensors = {name: getattr(self, name) for name in _TENSORS}
        card = {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.name not in _TENSORS}  # fmt: skip
        return save_with_card(path, tensors, card, fmt=FORMAT, version=FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: Any = None) -> SurpriseResult:
        """Read a saved result; with ``model``, refuse it unless it was made with that model's weights."""
        card, tensors, (tensors_path, card_path) = load_with_card(path, fmt=FORMAT, version=FORMAT_VERSION,
                                                                  what="surprise result")  # fmt: skip
        missing = [n for n in _TENSORS if n not in tensors]
        if missing:
            raise KnowlensError(f"surprise result {tensors_path}: missing tensors {', '.join(missing)}")
        _check_shapes(tensors, tensors_path)
        if model is not None:
            check_same_model(card.get("model") or {}, model_identity(model), what=f"surprise result {tensors_path}",
                             error=KnowlensError)  # fmt: skip
        values: dict[str, Any] = {n: tensors[n] for n in _TENSORS}
        try:
            for f in fields(cls):
                if f.name in _TENSORS:
                    continue
                value = card[f.name]
                if f.name in ("intercept", "l2", "r2", "pearson", "surprisal_mean"):
                    value = math.nan if value is None else float(value)
                elif f.name == "cv_mse":
                    value = tuple(math.nan if v is None else float(v) for v in value)
                values[f.name] = value
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise KnowlensError(f"surprise result {card_path}: malformed card ({type(err).__name__}: {one_line(err)})") from None


@torch.no_grad()
def locate_surprise(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    mask: Bool[Tensor, "batch pos"] | None = None,
    generic_tokens: Int[Tensor, "gbatch gpos"] | None = None,
    generic_mask: Bool[Tensor, "gbatch gpos"] | None = None,
    max_frequency: float = 0.02,
    top: int = 10,
    ridge_l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    holdout: float = 0.3,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    sae_label: str | None = None,
) -> SurpriseResult:
    """Latents of ``sae`` whose activation tracks the model's input surprisal, and a ridge direction on the
    SAE's hook that predicts it (module docstring: exact definitions and alignment). Needs 3 or more sequences
    with a valid token. Leaves no hook on the model, also when it raises."""
    from knowlens.saes.load import check_sae

    if not (isinstance(max_frequency, (int, float)) and 0 <= max_frequency <= 1):
        raise KnowlensError(f"max_frequency must be in [0, 1], got {max_frequency!r}")
    if not isinstance(top, int) or top < 0:
        raise KnowlensError(f"top must be an integer >= 0, got {top!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KnowlensError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    label = sae_label if sae_label is not None else default_label(sae)
    check_sae(sae, model, label=label)
    hook = sae.cfg.metadata.hook_name
    if sae.cfg.metadata.get("hook_head_index") is not None:
        raise KnowlensError(f"SAE {label} reads one attention head at {hook}; locate_surprise reads whole hooks only")
    device = next(iter(model.parameters())).device
    tokens, mask = checked_tokens(tokens, mask, device, what="tokens")
    d_sae = int(sae.cfg.d_sae)

    seen: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen["act"] = act.detach()

    surprisal: list[Tensor] = []
    resid: list[Tensor] = []
    seqs: list[Tensor] = []
    rows: list[Tensor] = []
    cols: list[Tensor] = []
    vals: list[Tensor] = []
    n = 0
    with model.hooks(fwd_hooks=[(hook, capture)]):
        for start in range(0, tokens.shape[0], batch_size):
            toks, valid = tokens[start : start + batch_size], mask[start : start + batch_size]
            seen.clear()
            s = _surprisal(model(toks, return_type="logits"), toks)
            act = seen["act"]
            feats = encode_latents(sae, act)[valid]  # (n_batch, d_sae)
            surprisal.append(s[valid])
            resid.append(flatten_heads(act)[valid].float())
            seqs.append(torch.nonzero(valid)[:, 0] + start)
            r, c = torch.nonzero(feats, as_tuple=True)
            rows.append(r + n)
            cols.append(c)
            vals.append(feats[r, c].float())
            n += int(valid.sum())
    if n == 0:
        raise KnowlensError("no valid tokens (the mask leaves none at positions >= 1)")
    y = torch.cat(surprisal)
    if not bool(torch.isfinite(y).all()):
        raise KnowlensError("the model gives a token probability of 0 (infinite surprisal)")
    row, col, val = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    rho_all = spearman_sparse(row, col, val, y, d_sae).cpu()

    if generic_tokens is None:
        active = torch.bincount(col[val > 0], minlength=d_sae)
        n_generic = n
    else:
        g_tokens, g_mask = checked_tokens(generic_tokens, generic_mask, device, what="generic_tokens")
        active, n_generic = active_counts(model, sae, hook, g_tokens, g_mask, batch_size)
    frequency_all = (active.double() / max(n_generic, 1)).cpu()

    score = torch.where((frequency_all <= max_frequency) & ~rho_all.isnan(), rho_all.abs(), -1.0)
    order = torch.argsort(score, descending=True, stable=True)[:top]
    latents = order[score[order] >= 0]

    fit = ridge_fit(torch.cat(resid), y, torch.cat(seqs), l2_grid=ridge_l2_grid, holdout=holdout, folds=folds,
                    seed=seed)  # fmt: skip
    test_sequences = torch.unique(torch.cat(seqs)[fit.test.to(device)]).cpu()
    return SurpriseResult(
        model=model_identity(model),
        hook=hook,
        sae_label=label,
        latents=latents,
        rho=rho_all[latents],
        frequency=frequency_all[latents],
        decoder=sae.W_dec.detach()[latents.to(sae.W_dec.device)].float().cpu(),
        rho_all=rho_all,
        frequency_all=frequency_all,
        direction=fit.direction.cpu(),
        intercept=fit.intercept,
        l2=fit.l2,
        r2=fit.r2,
        pearson=fit.pearson,
        cv_mse=fit.cv_mse,
        test_sequences=test_sequences,
        n_tokens=n,
        n_sequences=int(torch.unique(torch.cat(seqs)).numel()),
        n_test_tokens=int(fit.test.sum()),
        n_generic_tokens=n_generic,
        surprisal_mean=float(y.mean()),
        params={
            "max_frequency": float(max_frequency),
            "top": top,
            "ridge_l2_grid": [float(v) for v in ridge_l2_grid],
            "holdout": float(holdout),
            "folds": folds,
            "seed": seed,
            "generic": "the analysed tokens" if generic_tokens is None else f"generic_tokens ({n_generic} tokens)",
            "alignment": "activation at position t vs s_t = -log p(x_t | x_<t) (nats), t >= 1",
            "active": "activation > 0",
            "sae_architecture": architecture(sae),
            "d_sae": d_sae,
        },
    )


def input_surprisal(
    model: Any, tokens: Int[Tensor, "batch pos"], *, batch_size: int = 32
) -> Float[Tensor, "batch pos"]:
    """``s[b, t] = -log p(tokens[b, t] | tokens[b, :t])`` in nats (float64); NaN at position 0."""
    device = next(iter(model.parameters())).device
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            toks = tokens[start : start + batch_size].to(device)
            out.append(_surprisal(model(toks, return_type="logits"), toks))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ helpers


def _surprisal(logits: Tensor, tokens: Tensor) -> Tensor:
    """(batch, pos) float64: -log p(tokens[:, t] | tokens[:, :t]) from the logits at t - 1; NaN at t = 0."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    s = torch.full(tokens.shape, math.nan, dtype=torch.float64, device=logits.device)
    s[:, 1:] = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return s


def _check_shapes(t: dict[str, Tensor], path: Path) -> None:
    """The saved tensors fit together (1-D top-latent fields of one length, decoder rows of the direction's
    width, per-latent fields of one length); KnowlensError naming the first that does not."""
    top, d_in, d_sae = t["latents"].shape, t["direction"].shape, t["rho_all"].shape
    want = {"latents": top, "rho": top, "frequency": top, "rho_all": d_sae, "frequency_all": d_sae,
            "direction": d_in, "decoder": (*top, *d_in)}  # fmt: skip
    for name, shape in want.items():
        if len(shape) != (2 if name == "decoder" else 1) or t[name].shape != shape:
            raise KnowlensError(f"surprise result {path}: tensor {name} has shape {tuple(t[name].shape)}, expected {tuple(shape)}")
    if t["test_sequences"].ndim != 1 or t["latents"].is_floating_point() or t["test_sequences"].is_floating_point():
        raise KnowlensError(f"surprise result {path}: latents / test_sequences are not 1-D integer tensors")


