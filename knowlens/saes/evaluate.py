"""How well an SAE stands in for the activations it reads: `sae_metrics(model, sae, tokens) -> SaeMetrics`.

Definitions (every figure over the *evaluated positions*: ``mask``, by default every position but the last of a
row, i.e. the positions whose next token is scored):

* ``l0``: the mean number of latents with an activation > 0 per evaluated position.
* ``explained_variance``: ``1 - sum_t ||x_t - x̂_t||^2 / sum_t ||x_t - x̄||^2``, with ``x_t`` the hook's activation,
  ``x̂_t = decode(encode(x_t))`` and ``x̄`` the mean activation over the evaluated positions (pooled over all
  dimensions, not averaged per token).
* ``dead_fraction``: the fraction of latents never active (> 0) at any evaluated position.
* ``ce_clean`` / ``ce_spliced`` / ``ce_ablated``: the mean next-token cross-entropy (nats) over the evaluated
  positions when the hook's activation is left alone, replaced by the SAE's reconstruction ``x̂`` at every
  position, or ablated at every position: with ``ablation="zero"`` (the default, as sae-lens's own evals do)
  replaced by zeros, with ``"mean"`` by the mean activation ``x̄``.
* ``loss_recovered = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)``: 1.0 when the splice costs nothing,
  0.0 when it is as bad as the ablation (NaN when the ablation itself costs nothing).

The reconstruction is always ``sae.decode(sae.encode(x))``, never ``sae(x)``, so an SAE loaded with
``use_error_term=True`` cannot pass its input through. Splicing uses ``model.hooks(fwd_hooks=...)`` only, which
removes its hooks whatever happens inside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from knowlens.errors import KnowlensError
from knowlens.types import Bool, Int, Tensor

Ablation = Literal["zero", "mean"]


@dataclass(frozen=True)
class SaeMetrics:
    hook: str
    l0: float
    explained_variance: float
    dead_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    loss_recovered: float
    ablation: Ablation
    mse: float  # mean over evaluated positions of ||x - x̂||^2 / d_in
    n_positions: int
    d_sae: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a figure that is not finite (a NaN loss recovered) becomes None."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}

    def meets(self, *, min_loss_recovered: float = 0.90, max_l0: float | int = 32) -> bool:
        """Whether loss recovered >= ``min_loss_recovered`` at L0 <= ``max_l0`` (issue 8's target)."""
        return self.loss_recovered >= min_loss_recovered and self.l0 <= max_l0


@torch.no_grad()
def sae_metrics(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    mask: Bool[Tensor, "batch pos"] | None = None,
    ablation: Ablation = "zero",
    batch_size: int = 64,
) -> SaeMetrics:
    """L0, explained variance, dead-latent fraction and CE loss recovered of ``sae`` at its hook of ``model``,
    on ``tokens`` (rows the SAE was not trained on); see the module docstring for the exact definitions.

    ``mask[b, t]`` marks the positions evaluated: their activation enters L0, explained variance and the dead
    count, and their prediction of token ``t + 1`` enters the cross-entropies (so ``mask[:, -1]`` must be
    False). Default: every position but the last. Padding after a row's end never changes the positions before
    it (causal attention), so right-padded rows with the padding masked out are exact.
    """
    if ablation not in ("zero", "mean"):
        raise KnowlensError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    hook = sae.cfg.metadata.hook_name
    if not isinstance(hook, str) or hook not in model.hook_dict:
        raise KnowlensError(f"SAE reads hook {hook!r}, which the model does not have")
    if sae.cfg.metadata.get("hook_head_index") is not None:
        raise KnowlensError(f"SAE at {hook} reads one attention head; sae_metrics splices whole hooks only")
    device = next(iter(model.parameters())).device
    tokens = tokens.to(device)
    if mask is None:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, -1] = False
    mask = mask.to(device)
    if mask.shape != tokens.shape:
        raise KnowlensError(
            f"mask shape {tuple(mask.shape)} does not match tokens shape {tuple(tokens.shape)}"
        )
    if bool(mask[:, -1].any()):
        raise KnowlensError("mask marks a row's last position, whose next token is not in the rows")
    if not bool(mask.any()):
        raise KnowlensError("no positions to evaluate (the mask is empty)")

    batches = [slice(i, i + batch_size) for i in range(0, tokens.shape[0], batch_size)]
    # pass 1: clean loss, activation statistics, latent counts
    n = 0
    sum_x = sum_x2 = sse = None
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    ce = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
    seen: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen["act"] = act.detach()

    for sl in batches:
        toks, m = tokens[sl], mask[sl]
        seen.clear()
        with model.hooks(fwd_hooks=[(hook, capture)]):
            logits = model(toks, return_type="logits")
        ce["clean"] += _ce_sum(logits, toks, m)
        x = _flat(seen["act"])[m].double()  # (n_batch, d_in)
        feats, recon = _encode_decode(sae, seen["act"])
        feats, recon = _flat(feats)[m], _flat(recon)[m].double()
        active = feats > 0
        l0_sum += active.sum().item()
        fired |= active.any(0)
        n += x.shape[0]
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sum_x2 = (x * x).sum() if sum_x2 is None else sum_x2 + (x * x).sum()
        err = ((x - recon) ** 2).sum()
        sse = err if sse is None else sse + err
    assert sum_x is not None and sum_x2 is not None and sse is not None
    mean = sum_x / n
    total_var = (sum_x2 - n * (mean * mean).sum()).item()
    explained = 1.0 - sse.item() / total_var if total_var > 0 else float("nan")

    # pass 2: the spliced and the ablated loss
    mean_act = mean.to(torch.float32)

    def splice(act: Tensor, hook: Any) -> Tensor:
        return _encode_decode(sae, act)[1].to(act.dtype)

    def ablate(act: Tensor, hook: Any) -> Tensor:
        if ablation == "zero":
            return torch.zeros_like(act)
        return mean_act.to(act.dtype).reshape(act.shape[2:]).expand_as(act).clone()

    for name, fn in (("spliced", splice), ("ablated", ablate)):
        for sl in batches:
            toks, m = tokens[sl], mask[sl]
            with model.hooks(fwd_hooks=[(hook, fn)]):
                logits = model(toks, return_type="logits")
            ce[name] += _ce_sum(logits, toks, m)
    clean, spliced, ablated = (ce[k] / n for k in ("clean", "spliced", "ablated"))
    gap = ablated - clean
    return SaeMetrics(
        hook=hook,
        l0=l0_sum / n,
        explained_variance=explained,
        dead_fraction=1.0 - fired.float().mean().item(),
        ce_clean=clean,
        ce_spliced=spliced,
        ce_ablated=ablated,
        loss_recovered=(ablated - spliced) / gap if gap != 0 else math.nan,
        ablation=ablation,
        mse=sse.item() / (n * mean.numel()),
        n_positions=n,
        d_sae=int(sae.cfg.d_sae),
    )


def _flat(t: Tensor) -> Tensor:
    """(batch, pos, ...) -> (batch, pos, prod(...)): head dimensions flattened as sae-lens's activation store does."""
    return t if t.ndim == 3 else t.reshape(*t.shape[:2], -1)


def _encode_decode(sae: Any, act: Tensor) -> tuple[Tensor, Tensor]:
    """The latents and the reconstruction of ``act`` (batch, pos, ...), the reconstruction in ``act``'s shape."""
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        feats = sae.encode(act)  # the SAE flattens (and unflattens) the heads itself
        return feats, sae.decode(feats)
    feats = sae.encode(_flat(act))
    return feats, sae.decode(feats).reshape(act.shape)


def _ce_sum(logits: Tensor, tokens: Tensor, mask: Tensor) -> float:
    """Sum of -log p(tokens[:, t+1]) over the positions t that ``mask`` marks."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return nll[mask[:, :-1]].sum().item()
