"""Activation patching between a clean and a corrupted prompt: `activation_patch(...) -> PatchResult`.

Definitions (the quantities ``transformer_lens.patching`` computes; the tests check agreement):

* **Inputs.** ``clean`` and ``corrupted`` are token tensors ``(batch, pos)`` (or ``(pos,)``; strings are
  tokenized with ``model.to_tokens``, BOS prepended) of the same shape: the same token length, so position
  ``p`` of one run corresponds to position ``p`` of the other.
* **Metric.** ``metric(logits) -> scalar`` on the model's logits ``(batch, pos, d_vocab)`` for all batch rows
  together (a 0-d tensor or a number); `logit_diff` and `token_prob` build the usual ones.
* **Sites.** For ``site`` in ``resid_pre``, ``attn_out``, ``mlp_out``, layer ``L`` and position ``p``:
  ``values[L, p] = metric(model(corrupted))`` with ``blocks.L.hook_{site}[:, p]`` replaced by the clean run's
  ``blocks.L.hook_{site}[:, p]`` (every batch row, one patch per run): ``get_act_patch_resid_pre``,
  ``get_act_patch_attn_out``, ``get_act_patch_mlp_out``. For ``site="head"``: ``values[L, h]`` with
  ``blocks.L.attn.hook_z[:, :, h]`` (head ``h``'s output before ``W_O``, at every position) replaced:
  ``get_act_patch_attn_head_out_all_pos``.
* **Recovered fraction.** `PatchResult.recovered` is ``(values - corrupted_metric) / (clean_metric -
  corrupted_metric)``: 0 where the patch changes nothing, 1 where it restores the clean metric.
* **Batching.** ``patches_per_pass = k`` runs ``k`` patches as one forward of ``k * batch`` rows (row block
  ``j`` carries patch ``j``); each block's metric equals the one-patch run up to the rounding of batched
  matrix products. ``k = 1`` (the default) performs exactly TransformerLens's computation.

Hooks go on the model only inside ``model.hooks(...)``; every run is under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from knowlens.errors import KnowlensError
from knowlens.types import Float, Int, Tensor

SITES = ("resid_pre", "attn_out", "mlp_out", "head")
_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
}


@dataclass(frozen=True)
class Metric:
    """A named metric: ``metric(logits) -> scalar``. ``name`` goes into `PatchResult.metric_name`."""

    name: str
    fn: Callable[[Tensor], Any]

    def __call__(self, logits: Tensor) -> Any:
        return self.fn(logits)


def logit_diff(
    answer_id: int | Sequence[int] | Tensor, wrong_id: int | Sequence[int] | Tensor, *, position: int = -1
) -> Metric:
    """``mean_b (logits[b, position, answer_b] - logits[b, position, wrong_b])`` in float64; ids are one per
    batch row or one for all rows."""
    answer, wrong = _ids(answer_id, "answer_id"), _ids(wrong_id, "wrong_id")

    def fn(logits: Tensor) -> Tensor:
        last = logits[:, position].double()
        return (_take(last, answer) - _take(last, wrong)).mean()

    return Metric(f"logit_diff(answer={_show(answer)}, wrong={_show(wrong)}, position={position})", fn)


def token_prob(ids: int | Sequence[int] | Tensor, *, position: int = -1) -> Metric:
    """``mean_b sum_{i in ids} softmax(logits[b, position])[i]`` (softmax in float64): the probability that the
    next token is one of ``ids``, e.g. the first tokens of a refusal ("refusal probability")."""
    wanted = _ids(ids, "ids").reshape(-1)
    if wanted.numel() == 0:
        raise KnowlensError("token_prob: ids is empty")

    def fn(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits[:, position].double(), dim=-1)
        return probs[:, wanted.to(probs.device)].sum(-1).mean()

    return Metric(f"token_prob(ids={wanted.tolist()}, position={position})", fn)


@dataclass(frozen=True, eq=False)
class PatchResult:
    """Activation-patching values for one site; ``values[i, j]`` indexes ``axes`` (``("layer", "pos")`` or
    ``("layer", "head")``), ``labels`` names every index (positions: ``"p:token"``, or ``"p:clean|corrupted"``
    where the first rows' tokens differ). ``hook`` is the hook name with ``{layer}`` left open."""

    values: Float[Tensor, "layer index"]
    site: str
    hook: str
    axes: tuple[str, str]
    labels: tuple[tuple[str, ...], tuple[str, ...]]
    metric_name: str
    clean_metric: float
    corrupted_metric: float

    def recovered(self) -> Float[Tensor, "layer index"]:
        """``(values - corrupted_metric) / (clean_metric - corrupted_metric)``; NaN if the two are equal."""
        span = self.clean_metric - self.corrupted_metric
        if span == 0.0:
            return torch.full_like(self.values, float("nan"))
        return (self.values - self.corrupted_metric) / span

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: site, hook, metric, axes, labels, values, clean/corrupted metric, recovered (or None)."""
        span = self.clean_metric - self.corrupted_metric
        return {
            "site": self.site,
            "hook": self.hook,
            "metric": self.metric_name,
            "axes": list(self.axes),
            "labels": {axis: list(lab) for axis, lab in zip(self.axes, self.labels)},
            "values": self.values.tolist(),
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "recovered": self.recovered().tolist() if span != 0.0 else None,
        }


def activation_patch(
    model: Any,
    clean: Tensor | str | Sequence[str],
    corrupted: Tensor | str | Sequence[str],
    metric: Callable[[Tensor], Any],
    *,
    site: str = "resid_pre",
    patches_per_pass: int = 1,
    progress: bool = False,
) -> PatchResult:
    """Patch each clean activation of ``site`` into the corrupted run, one (layer, position) or (layer, head)
    at a time, and measure ``metric`` (module docstring). ``progress`` shows a tqdm bar over the runs."""
    return activation_patch_sweep(
        model, clean, corrupted, metric, sites=(site,), patches_per_pass=patches_per_pass, progress=progress
    )[site]


def activation_patch_sweep(
    model: Any,
    clean: Tensor | str | Sequence[str],
    corrupted: Tensor | str | Sequence[str],
    metric: Callable[[Tensor], Any],
    *,
    sites: Sequence[str] = SITES,
    patches_per_pass: int = 1,
    progress: bool = False,
) -> dict[str, PatchResult]:
    """`activation_patch` for several sites (default: all four), from one clean run; keyed by site."""
    sites = tuple(dict.fromkeys(sites))
    for site in sites:
        if site not in _HOOKS:
            raise KnowlensError(f"unknown patching site {site!r}; choose from {', '.join(SITES)}")
    if isinstance(patches_per_pass, bool) or not isinstance(patches_per_pass, int) or patches_per_pass < 1:
        raise KnowlensError(f"patches_per_pass must be an integer >= 1, got {patches_per_pass!r}")
    clean_t, corrupt_t = _tokens(model, clean, "clean"), _tokens(model, corrupted, "corrupted")
    if clean_t.shape != corrupt_t.shape:
        raise KnowlensError(
            f"clean and corrupted prompts must have the same shape (batch, tokens): clean {tuple(clean_t.shape)}, "
            f"corrupted {tuple(corrupt_t.shape)}"
        )
    n_layers = int(model.cfg.n_layers)
    names = [_HOOKS[s].format(layer=layer) for s in sites for layer in range(n_layers)]
    for name in names:
        if name not in model.hook_dict:
            raise KnowlensError(f"model {getattr(model.cfg, 'model_name', '?')!r} has no hook {name!r}")
    name_of = getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__

    with torch.no_grad():
        _, cache = model.run_with_cache(clean_t, names_filter=lambda n: n in names)
        clean_acts = {n: cache[n] for n in names}
        del cache
        clean_metric = _scalar(metric(model(clean_t)), name_of)
        corrupted_metric = _scalar(metric(model(corrupt_t)), name_of)
        widths = {s: (int(model.cfg.n_heads) if s == "head" else int(corrupt_t.shape[1])) for s in sites}
        total = sum(n_layers * -(-widths[s] // patches_per_pass) for s in sites)
        results: dict[str, PatchResult] = {}
        with tqdm(total=total, desc="activation patching", disable=not progress) as bar:
            for site in sites:
                values = _sweep_site(
                    model, corrupt_t, clean_acts, metric, site=site, width=widths[site], n_layers=n_layers,
                    per_pass=patches_per_pass, metric_name=name_of, bar=bar,
                )  # fmt: skip
                second = "head" if site == "head" else "pos"
                second_labels = (
                    tuple(str(h) for h in range(widths[site]))
                    if site == "head"
                    else _position_labels(model, clean_t[0], corrupt_t[0])
                )
                results[site] = PatchResult(
                    values=values,
                    site=site,
                    hook=_HOOKS[site],
                    axes=("layer", second),
                    labels=(tuple(str(layer) for layer in range(n_layers)), second_labels),
                    metric_name=str(name_of),
                    clean_metric=clean_metric,
                    corrupted_metric=corrupted_metric,
                )
    return results


def _sweep_site(
    model: Any,
    corrupted: Tensor,
    clean_acts: dict[str, Tensor],
    metric: Callable[[Tensor], Any],
    *,
    site: str,
    width: int,
    n_layers: int,
    per_pass: int,
    metric_name: str,
    bar: Any,
) -> Tensor:
    """``values[L, i]`` for one site: the corrupted run with index ``i`` of layer ``L`` patched from the clean."""
    batch = corrupted.shape[0]
    values = torch.empty((n_layers, width), dtype=torch.float64)
    for layer in range(n_layers):
        name = _HOOKS[site].format(layer=layer)
        clean = clean_acts[name]
        for start in range(0, width, per_pass):
            chunk = list(range(start, min(start + per_pass, width)))
            hook = _patch_hook(clean, chunk, batch=batch, heads=site == "head")
            with model.hooks(fwd_hooks=[(name, hook)]):
                logits = model(corrupted.repeat(len(chunk), 1) if len(chunk) > 1 else corrupted)
            for j, index in enumerate(chunk):
                values[layer, index] = _scalar(metric(logits[j * batch : (j + 1) * batch]), metric_name)
            bar.update(1)
    return values


def _patch_hook(
    clean: Tensor, chunk: list[int], *, batch: int, heads: bool
) -> Callable[[Tensor, Any], Tensor]:
    """Row block ``j`` of the activation gets the clean values at index ``chunk[j]`` (a position, or a head at
    every position)."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        for j, index in enumerate(chunk):
            rows = slice(j * batch, (j + 1) * batch)
            if heads:
                x[rows, :, index] = clean[:, :, index]
            else:
                x[rows, index] = clean[:, index]
        return x

    return hook


def _tokens(model: Any, prompt: Tensor | str | Sequence[str], what: str) -> Int[Tensor, "batch pos"]:
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt)):
        if getattr(model, "tokenizer", None) is None:
            raise KnowlensError(f"{what}: text prompts need a model with a tokenizer; pass token ids")
        tokens = model.to_tokens(prompt, prepend_bos=True)
    elif isinstance(prompt, Tensor):
        tokens = prompt
    else:
        raise KnowlensError(f"{what}: expected a token tensor or text, got {type(prompt).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.numel() == 0 or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise KnowlensError(
            f"{what}: expected integer token ids (batch, pos), got {tokens.dtype} {tuple(tokens.shape)}"
        )
    d_vocab = int(model.cfg.d_vocab)
    if int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab:
        raise KnowlensError(f"{what}: token ids must be in [0, {d_vocab})")
    device = next(iter(model.parameters())).device
    return tokens.to(device=device, dtype=torch.long)


def _position_labels(model: Any, clean: Tensor, corrupted: Tensor) -> tuple[str, ...]:
    def words(row: Tensor) -> list[str]:
        if getattr(model, "tokenizer", None) is not None:
            return [str(t) for t in model.to_str_tokens(row)]
        return [str(int(t)) for t in row]

    a, b = words(clean), words(corrupted)
    return tuple(f"{i}:{x}" if x == y else f"{i}:{x}|{y}" for i, (x, y) in enumerate(zip(a, b)))


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise KnowlensError(f"metric {name} must return a scalar, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, int | float):
        return float(value)
    raise KnowlensError(f"metric {name} must return a number or a 0-d tensor, got {type(value).__name__}")


def _ids(ids: int | Sequence[int] | Tensor, what: str) -> Tensor:
    """A 0-d (one int) or 1-D int64 tensor of token ids."""
    if isinstance(ids, int) and not isinstance(ids, bool):
        return torch.tensor(ids, dtype=torch.long)
    if isinstance(ids, Tensor) and ids.ndim <= 1 and not (ids.is_floating_point() or ids.is_complex()):
        if ids.dtype != torch.bool:
            return ids.detach().cpu().long()
    items = list(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else None
    if items is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise KnowlensError(f"{what} must be an integer or a list of integers, got {ids!r}")
    return torch.tensor(items, dtype=torch.long)


def _take(logits: Tensor, ids: Tensor) -> Tensor:
    """``logits[b, ids]`` (one id for all rows) or ``logits[b, ids[b]]`` (one per row)."""
    ids = ids.to(logits.device)
    if ids.ndim == 0:
        return logits[:, ids]
    if ids.numel() != logits.shape[0]:
        raise KnowlensError(
            f"{ids.numel()} ids given for {logits.shape[0]} batch rows (give one, or one per row)"
        )
    return logits.gather(-1, ids[:, None]).squeeze(-1)


def _show(ids: Tensor) -> Any:
    return int(ids) if ids.ndim == 0 else ids.tolist()
