"""Attribution patching: the gradient x activation-difference approximation of activation patching.

Definitions (``clean``, ``corrupted``, sites, positions, batching and the metric are as in
`knowlens.patching.activation`; the approximation is of patching the *clean* activation into the *corrupted* run):

* **Gradient.** ``g = dm/da`` is taken on the **corrupted** run: one forward of ``corrupted`` with the hooks'
  activations kept in the autograd graph, then ``torch.autograd.grad(m, activations)``. One clean forward (no
  graph) and one corrupted forward + backward give every site at once.
* **Attribution.** For hook ``h`` (``blocks.L.hook_{site}``) and position ``p``:
  ``values[L, p] = sum_b sum_d (a_clean[b, p, d] - a_corrupted[b, p, d]) * g[b, p, d]``, the first-order Taylor
  estimate of ``activation_patch(...).values[L, p] - corrupted_metric`` (the change of the metric when position
  ``p`` of ``h`` is patched from the clean run, every batch row at once). Positive: patching the clean value in
  raises the metric. For ``site="head"``: ``values[L, h]`` sums over positions and ``d_head`` of
  ``blocks.L.attn.hook_z[:, :, h]`` (head ``h``'s output at every position). It is exact when the metric is
  linear in the patched activation (e.g. a logit difference, with no LayerNorm after the last layer's
  ``mlp_out``; the tests check this) and an approximation otherwise: a saturated metric (a probability near 0
  or 1 on the corrupted run) has a gradient near 0 and badly underestimates large patching effects; prefer a
  logit difference or log-odds there.
* **SAE latents** (`attribute_latents`). At the SAE's hook ``a = decode(f) + e`` with ``f = encode(a)`` and the
  error term ``e = a - decode(f)`` (so nothing is lost): latent ``i`` at position ``t`` gets
  ``sum_b (f_clean - f_corrupted)[b, t, i] * (dm/df)[b, t, i]`` with ``dm/df = J_decode^T g`` (for the usual
  affine decoder ``W_dec[i] . g``; computed by autograd through ``sae.decode``, so a scaling factor is
  included), and the error term its own row, ``sum_b sum_d (e_clean - e_corrupted)[b, t, d] * g[b, t, d]``.
  For an affine decoder the latents and the error term add up exactly to the position's ``resid`` attribution
  ``(a_clean - a_corrupted) . g`` (completeness).
* **Metrics.** ``metric(logits) -> scalar tensor`` (a `Metric`, `logit_diff`, `token_prob`, or any callable that
  keeps the result differentiable: no ``.item()``, no ``torch.no_grad``). With ``metric_hooks=(names)`` the
  metric is called ``metric(logits, acts)``, ``acts`` a dict of those hooks' activations ``(batch, pos, ...)`` on
  the same run (in the graph), e.g. a linear probe's score on a generated token: ``lambda logits, acts:
  acts["blocks.2.hook_resid_post"][:, -1] @ w + b``. Activation patching with such a metric (for the
  comparison) captures the hooks after the patch.

`attribution_vs_activation` runs both on the same inputs and reports the Pearson and Spearman correlation of
``attribution`` with ``activation_patch(...).values - corrupted_metric`` over all cells.

Hooks go on the model only inside ``model.hooks(...)`` (removed whatever happens). The embedding is detached
(``hook_embed``) so no gradient reaches a parameter and nothing is left in any ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from knowlens.errors import KnowlensError
from knowlens.patching.activation import (
    _HOOKS,
    SITES,
    PatchResult,
    _patch_hook,
    _position_labels,
    _scalar,
    _tokens,
    activation_patch,
)
from knowlens.saes.activations import encode_latents
from knowlens.types import Float, Tensor

Prompt = Tensor | str | Sequence[str]


@dataclass(frozen=True, eq=False)
class AttributionResult:
    """Attribution-patching estimates for one site: ``values[i, j]`` is the estimated change of the metric when
    index ``j`` of layer ``i`` is patched from the clean run (module docstring); axes and labels as in
    `PatchResult`."""

    values: Float[Tensor, "layer index"]
    site: str
    hook: str
    axes: tuple[str, str]
    labels: tuple[tuple[str, ...], tuple[str, ...]]
    metric_name: str
    clean_metric: float
    corrupted_metric: float

    def estimated(self) -> Float[Tensor, "layer index"]:
        """``corrupted_metric + values``: the estimate of `PatchResult.values` (the patched metric)."""
        return self.corrupted_metric + self.values

    def recovered(self) -> Float[Tensor, "layer index"]:
        """``values / (clean_metric - corrupted_metric)``; NaN if the two are equal."""
        span = self.clean_metric - self.corrupted_metric
        if span == 0.0:
            return torch.full_like(self.values, float("nan"))
        return self.values / span

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: site, hook, metric, axes, labels, values (the estimated changes), clean/corrupted metric."""
        return {"site": self.site, "hook": self.hook, "metric": self.metric_name, "axes": list(self.axes),
                "labels": {axis: list(lab) for axis, lab in zip(self.axes, self.labels)},
                "values": self.values.tolist(), "clean_metric": self.clean_metric,
                "corrupted_metric": self.corrupted_metric}  # fmt: skip


@dataclass(frozen=True, eq=False)
class LatentAttribution:
    """Attribution patching onto an SAE's latents: ``values[t, i]`` for latent ``i`` at position ``t``,
    ``error[t]`` for the SAE's error term there (module docstring); ``positions`` labels ``t``."""

    values: Float[Tensor, "pos d_sae"]
    error: Float[Tensor, " pos"]
    hook: str
    positions: tuple[str, ...]
    metric_name: str
    clean_metric: float
    corrupted_metric: float

    def per_position(self) -> Float[Tensor, " pos"]:
        """Latents plus error term at each position (equals the position's attribution at the hook)."""
        return self.values.sum(-1) + self.error

    def per_latent(self) -> Float[Tensor, " d_sae"]:
        """Each latent's attribution summed over positions."""
        return self.values.sum(0)

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` largest cells by absolute value, error terms included (``latent`` is ``"error"`` there)."""
        flat = torch.cat([self.values, self.error[:, None]], dim=1)
        order = torch.argsort(flat.abs().flatten(), descending=True)[:k]
        width = flat.shape[1]
        out = []
        for idx in order.tolist():
            t, i = divmod(idx, width)
            latent: int | str = "error" if i == width - 1 else i
            out.append({"position": t, "label": self.positions[t], "latent": latent, "value": float(flat[t, i])})
        return out


@dataclass(frozen=True, eq=False)
class AttributionCheck:
    """Attribution patching against real activation patching on the same inputs: correlations over all cells
    of ``attribution.values`` and ``patching.values - corrupted_metric``."""

    site: str
    pearson: float
    spearman: float
    n_cells: int
    max_abs_error: float
    attribution: AttributionResult
    patching: PatchResult

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "pearson": self.pearson, "spearman": self.spearman, "n_cells": self.n_cells,
                "max_abs_error": self.max_abs_error}  # fmt: skip


def attribution_patch(
    model: Any,
    clean: Prompt,
    corrupted: Prompt,
    metric: Callable[..., Any],
    *,
    site: str = "resid_pre",
    metric_hooks: Sequence[str] = (),
) -> AttributionResult:
    """Attribution patching of ``site`` (``resid_pre``, ``attn_out``, ``mlp_out`` or ``head``) for ``metric``
    (module docstring)."""
    return attribution_patch_sweep(model, clean, corrupted, metric, sites=(site,), metric_hooks=metric_hooks)[site]


def attribution_patch_sweep(
    model: Any,
    clean: Prompt,
    corrupted: Prompt,
    metric: Callable[..., Any],
    *,
    sites: Sequence[str] = SITES,
    metric_hooks: Sequence[str] = (),
) -> dict[str, AttributionResult]:
    """`attribution_patch` for several sites from one clean and one corrupted forward + backward."""
    sites = _check_sites(sites)
    clean_t, corrupt_t = _pair(model, clean, corrupted)
    n_layers = int(model.cfg.n_layers)
    names = {s: [_HOOKS[s].format(layer=layer) for layer in range(n_layers)] for s in sites}
    every = [n for s in sites for n in names[s]]
    _check_hooks(model, every)
    name_of = _metric_name(metric)
    run = _gradients(model, clean_t, corrupt_t, metric, every, metric_hooks, name_of)
    out: dict[str, AttributionResult] = {}
    for site in sites:
        rows = []
        for name in names[site]:
            prod = (run.clean[name].double() - run.corrupt[name].double()) * run.grad[name].double()
            rows.append(prod.sum(dim=(0, 1, 3)) if site == "head" else prod.flatten(2).sum(dim=(0, 2)))
        out[site] = AttributionResult(
            values=torch.stack(rows).cpu(),
            site=site,
            hook=_HOOKS[site],
            axes=("layer", "head" if site == "head" else "pos"),
            labels=_labels(model, site, clean_t, corrupt_t),
            metric_name=name_of,
            clean_metric=run.clean_metric,
            corrupted_metric=run.corrupted_metric,
        )
    return out


def attribute_latents(
    model: Any,
    sae: Any,
    clean: Prompt,
    corrupted: Prompt,
    metric: Callable[..., Any],
    *,
    metric_hooks: Sequence[str] = (),
) -> LatentAttribution:
    """Attribution patching onto ``sae``'s latents at its hook, with the error term as its own row (module
    docstring)."""
    from knowlens.patching.interventions import _sae_hook

    hook = _sae_hook(sae)
    clean_t, corrupt_t = _pair(model, clean, corrupted)
    _check_hooks(model, [hook])
    name_of = _metric_name(metric)
    run = _gradients(model, clean_t, corrupt_t, metric, [hook], metric_hooks, name_of)
    a_clean, a_corrupt, g = run.clean[hook], run.corrupt[hook], run.grad[hook]
    dtype = sae.W_dec.dtype
    with torch.no_grad():
        f_clean, f_corrupt = encode_latents(sae, a_clean), encode_latents(sae, a_corrupt)
        e_clean = a_clean.flatten(2).to(dtype) - sae.decode(f_clean).reshape(*a_clean.shape[:2], -1)
        e_corrupt = a_corrupt.flatten(2).to(dtype) - sae.decode(f_corrupt).reshape(*a_corrupt.shape[:2], -1)
    with torch.enable_grad():
        f = f_corrupt.detach().requires_grad_(True)
        out = sae.decode(f)
        (grad_f,) = torch.autograd.grad(out, f, grad_outputs=g.to(out.dtype).reshape(out.shape))
    values = ((f_clean.double() - f_corrupt.double()) * grad_f.double()).sum(0)
    error = ((e_clean.double() - e_corrupt.double()) * g.flatten(2).double()).sum(dim=(0, 2))
    return LatentAttribution(
        values=values.cpu(),
        error=error.cpu(),
        hook=hook,
        positions=_position_labels(model, clean_t[0], corrupt_t[0]),
        metric_name=name_of,
        clean_metric=run.clean_metric,
        corrupted_metric=run.corrupted_metric,
    )


def attribution_vs_activation(
    model: Any,
    clean: Prompt,
    corrupted: Prompt,
    metric: Callable[..., Any],
    *,
    site: str = "resid_pre",
    metric_hooks: Sequence[str] = (),
    patches_per_pass: int = 1,
    progress: bool = False,
) -> AttributionCheck:
    """Attribution patching and real activation patching of ``site`` on the same inputs, and how well they agree:
    Pearson and Spearman correlation over all (layer, position|head) cells of the attribution and the real
    change ``patching.values - corrupted_metric``, and the largest absolute difference."""
    attr = attribution_patch(model, clean, corrupted, metric, site=site, metric_hooks=metric_hooks)
    if metric_hooks:
        real = _activation_patch_with_acts(model, clean, corrupted, metric, site=site, metric_hooks=metric_hooks,
                                           progress=progress)  # fmt: skip
    else:
        real = activation_patch(model, clean, corrupted, metric, site=site, patches_per_pass=patches_per_pass,
                                progress=progress)  # fmt: skip
    x = attr.values.flatten().double()
    y = (real.values - real.corrupted_metric).flatten().double()
    return AttributionCheck(
        site=site,
        pearson=pearson(x, y),
        spearman=spearman(x, y),
        n_cells=int(x.numel()),
        max_abs_error=float((x - y).abs().max()),
        attribution=attr,
        patching=real,
    )


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equal-length vectors (NaN if either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rho of two equal-length vectors: the Pearson correlation of their ranks (ties averaged)."""
    return pearson(_ranks(x.flatten()), _ranks(y.flatten()))


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class _Run:
    clean: dict[str, Tensor]
    corrupt: dict[str, Tensor]
    grad: dict[str, Tensor]
    clean_metric: float
    corrupted_metric: float


def _gradients(
    model: Any,
    clean: Tensor,
    corrupted: Tensor,
    metric: Callable[..., Any],
    names: Sequence[str],
    metric_hooks: Sequence[str],
    name_of: str,
) -> _Run:
    """Clean activations (no graph), corrupted activations and ``dm/da`` at ``names`` on the corrupted run."""
    from knowlens.capture.hooks import validate_hook_names

    metric_hooks = validate_hook_names(model, list(metric_hooks))
    with torch.no_grad():
        clean_acts: dict[str, Tensor] = {}
        metric_acts: dict[str, Tensor] = {}

        def keep_clean(x: Tensor, hook: Any) -> None:
            if hook.name in names:
                clean_acts[hook.name] = x.detach().clone()
            if hook.name in metric_hooks:
                metric_acts[hook.name] = x.detach().clone()

        with model.hooks(fwd_hooks=[(n, keep_clean) for n in dict.fromkeys([*names, *metric_hooks])]):
            logits = model(clean)
        clean_metric = _scalar(_call(metric, logits, metric_acts, metric_hooks), name_of)

    corrupt_acts: dict[str, Tensor] = {}
    metric_acts = {}

    def leaf_embed(x: Tensor, hook: Any) -> Tensor:
        return x.detach().requires_grad_(True)  # gradients stop here: no parameter gets a .grad

    def keep(x: Tensor, hook: Any) -> None:
        if hook.name in names:
            corrupt_acts[hook.name] = x
        if hook.name in metric_hooks:
            metric_acts[hook.name] = x

    hooks = [("hook_embed", leaf_embed), *((n, keep) for n in dict.fromkeys([*names, *metric_hooks]))]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(corrupted)
        value = _call(metric, logits, metric_acts, metric_hooks)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise KnowlensError(f"metric {name_of} must return a scalar tensor for attribution patching")
        if not value.requires_grad:
            raise KnowlensError(
                f"metric {name_of} does not depend differentiably on the run (computed under no_grad or via .item()?)"
            )
        order = list(corrupt_acts)
        grads = torch.autograd.grad(value.reshape(()), [corrupt_acts[n] for n in order], allow_unused=True)
    grad = {n: (torch.zeros_like(corrupt_acts[n]) if g is None else g.detach()) for n, g in zip(order, grads)}
    return _Run(
        clean=clean_acts,
        corrupt={n: a.detach() for n, a in corrupt_acts.items()},
        grad=grad,
        clean_metric=clean_metric,
        corrupted_metric=_scalar(value.detach(), name_of),
    )


def _call(metric: Callable[..., Any], logits: Tensor, acts: dict[str, Tensor], metric_hooks: Sequence[str]) -> Any:
    if not metric_hooks:
        return metric(logits)
    missing = [n for n in metric_hooks if n not in acts]
    if missing:
        raise KnowlensError(f"metric hooks {', '.join(missing)} did not fire on this run")
    return metric(logits, dict(acts))


def _activation_patch_with_acts(
    model: Any,
    clean: Prompt,
    corrupted: Prompt,
    metric: Callable[..., Any],
    *,
    site: str,
    metric_hooks: Sequence[str],
    progress: bool,
) -> PatchResult:
    """Activation patching (as `activation_patch`, one patch per run) for a metric on ``(logits, acts)``."""
    from knowlens.capture.hooks import validate_hook_names

    sites = _check_sites([site])
    site = sites[0]
    metric_hooks = validate_hook_names(model, list(metric_hooks))
    clean_t, corrupt_t = _pair(model, clean, corrupted)
    n_layers = int(model.cfg.n_layers)
    names = [_HOOKS[site].format(layer=layer) for layer in range(n_layers)]
    _check_hooks(model, names)
    name_of = _metric_name(metric)
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        acts[hook.name] = x

    def measure(tokens: Tensor, patch: list[tuple[str, Any]]) -> float:
        acts.clear()
        with model.hooks(fwd_hooks=[*patch, *((n, keep) for n in metric_hooks)]):
            logits = model(tokens)
        return _scalar(_call(metric, logits, acts, metric_hooks), name_of)

    with torch.no_grad():
        _, cache = model.run_with_cache(clean_t, names_filter=lambda n: n in names)
        clean_acts = {n: cache[n] for n in names}
        del cache
        clean_metric, corrupted_metric = measure(clean_t, []), measure(corrupt_t, [])
        width = int(model.cfg.n_heads) if site == "head" else int(corrupt_t.shape[1])
        values = torch.empty((n_layers, width), dtype=torch.float64)
        with tqdm(total=n_layers * width, desc="activation patching", disable=not progress) as bar:
            for layer, name in enumerate(names):
                for index in range(width):
                    hook = _patch_hook(clean_acts[name], [index], batch=corrupt_t.shape[0], heads=site == "head")
                    values[layer, index] = measure(corrupt_t, [(name, hook)])
                    bar.update(1)
    return PatchResult(
        values=values,
        site=site,
        hook=_HOOKS[site],
        axes=("layer", "head" if site == "head" else "pos"),
        labels=_labels(model, site, clean_t, corrupt_t),
        metric_name=name_of,
        clean_metric=clean_metric,
        corrupted_metric=corrupted_metric,
    )


def _labels(model: Any, site: str, clean: Tensor, corrupted: Tensor) -> tuple[tuple[str, ...], tuple[str, ...]]:
    layers = tuple(str(layer) for layer in range(int(model.cfg.n_layers)))
    if site == "head":
        return layers, tuple(str(h) for h in range(int(model.cfg.n_heads)))
    return layers, _position_labels(model, clean[0], corrupted[0])


def _check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = [sites]
    out = tuple(dict.fromkeys(sites))
    for site in out:
        if site not in _HOOKS:
            raise KnowlensError(f"unknown patching site {site!r}; choose from {', '.join(SITES)}")
    if not out:
        raise KnowlensError("no patching site given")
    return out


def _pair(model: Any, clean: Prompt, corrupted: Prompt) -> tuple[Tensor, Tensor]:
    clean_t, corrupt_t = _tokens(model, clean, "clean"), _tokens(model, corrupted, "corrupted")
    if clean_t.shape != corrupt_t.shape:
        raise KnowlensError(
            f"clean and corrupted prompts must have the same shape (batch, tokens): clean {tuple(clean_t.shape)}, "
            f"corrupted {tuple(corrupt_t.shape)}"
        )
    return clean_t, corrupt_t


def _check_hooks(model: Any, names: Sequence[str]) -> None:
    for name in names:
        if name not in model.hook_dict:
            raise KnowlensError(f"model {getattr(model.cfg, 'model_name', '?')!r} has no hook {name!r}")


def _metric_name(metric: Callable[..., Any]) -> str:
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


def _ranks(x: Tensor) -> Tensor:
    """Average ranks from 0 (ties share the mean of their ranks), for Spearman's rho."""
    _, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() + 1) / 2)[inverse]
