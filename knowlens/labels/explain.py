"""Causal explanations of unreliable tokens: which positions and SAE latents drive the primary probe's decision.

`label_generation(..., explain=True, sae=...)` calls `explain_generation` after a batch is generated, and attaches
an `Explanation` to every token labelled ``unreliable`` (``TokenLabel.explanation``; in the JSONL as
``"explanation"``, on hover in the HTML report). Streamed labels (``on_token``) carry none: explanations come after
generation.

Definitions:

* **Sequence.** For generated token ``t`` of a row: the prompt's tokens (no padding) followed by the generated
  tokens up to and including ``t``. The **read position** ``r`` is the column the primary probe reads for ``t``
  (its position rule: ``token``: ``t``'s own column; ``before_token``: the column before ``t``;
  ``prompt_last_token``: the prompt's last column). Only the primary probe is explained (the one p_reliable comes
  from with ``combine="first"``; with ``combine="mean"`` still the first per-token probe).
* **Metric.** ``m`` = the probe's decision ``z`` (its logit before calibration, `LoadedProbe.decision`) at column
  ``r`` on a full forward of the sequence; positive ``z`` pushes towards reliable.
* **Attribution** (ablation attribution: attribution patching, `knowlens.patching.attribution`, against a
  corrupted run whose activation is zero, so it is ``activation x gradient``), with ``g = dm/da`` on that run:
  (a) **positions**: at the residual hook ``position_hook`` (default ``blocks.0.hook_resid_pre``, the tokens as
  the model first sees them: input x gradient; at the probe's own hook only column ``r`` would be non-zero),
  column ``c <= r`` gets ``sum_d a[c, d] * g[c, d]``;
  (b) **latents** (with ``sae``): at the SAE's hook, with ``f = encode(a)``, latent ``i`` at column ``c`` gets
  ``f[c, i] * (dm/df)[c, i]`` (``dm/df = J_decode^T g``; ``W_dec[i] . g`` for an affine decoder), and the error
  term ``e = a - decode(f)`` its own entry ``sum_d e[c, d] * g[c, d]`` (``latent: "error"``), and so does the
  decoder's output with every latent off, ``decode(0) . g[c]`` (``latent: "bias"``; ``b_dec . g`` for an affine
  decoder). With ``position_hook`` the SAE's hook and an affine decoder, a column's latents, error and bias add up
  exactly to its position entry.
  A value estimates minus the change of ``m`` when that activation is set to zero (exact for the parts of the
  network where ``m`` is linear in it); ``check_explanations`` measures the real change for the top latent.
* **Hooks** must be at or before the probe's hook in the forward (the SAE's hook and ``position_hook``);
  otherwise KnowlensError before any work.
* **Report.** Per family the ``top_k`` (default 5) entries by ``|value|``, each with its column, the token there,
  ``value``, ``sign`` (``+`` / ``-``: raises / lowers the decision; entries of value exactly 0 are not listed) and
  ``share`` = ``|value| / sum |value|`` over
  every entry of its family (every column ``<= r``; every (column, latent) plus every column's error and bias
  terms), so the shares of all entries of a family sum to 1.
* **Cost.** One forward of the whole generation (causal attention: every column ``<= r`` is the same as on the
  sequence cut at ``t``, and columns after ``r`` get exactly zero gradient) and one backward per explained token;
  ``seconds`` on each explanation is its share of that time (the forward split evenly).

Hooks go on the model only inside ``model.hooks(...)``; gradients are taken with ``torch.autograd.grad`` from a
detached embedding, so no ``.grad`` is ever written and nothing is left on the model when a run raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knowlens.capture.hooks import stop_layer_for
from knowlens.errors import KnowlensError
from knowlens.probes import LoadedProbe
from knowlens.types import Float, Tensor

DEFAULT_POSITION_HOOK = "blocks.0.hook_resid_pre"
READ_RULES = ("token", "before_token", "prompt_last_token")


@dataclass(frozen=True)
class Entry:
    """One attribution entry: ``latent`` None for a position entry, an int for a latent, ``"error"`` / ``"bias"``
    for the SAE's error term / decoder bias at ``position``."""

    position: int
    token: str
    value: float
    share: float
    latent: int | str | None = None

    @property
    def sign(self) -> str:
        return "+" if self.value >= 0 else "-"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"position": self.position, "token": self.token, "value": _round(self.value),
                               "share": _round(self.share), "sign": self.sign}  # fmt: skip
        if self.latent is not None:
            out["latent"] = self.latent
        return out

    def describe(self) -> str:
        what = f"position {self.position}" if self.latent is None else (
            f"SAE {self.latent} term" if isinstance(self.latent, str) else f"latent {self.latent}")  # fmt: skip
        return f"{what} at {self.token!r}: {self.sign}{self.share:.2f} of the attribution"


@dataclass(frozen=True)
class Explanation:
    """Why one token's primary probe decision is what it is (module docstring)."""

    probe: str
    hook: str
    read_position: int
    read_token: str
    decision: float
    position_hook: str
    positions: tuple[Entry, ...]
    sae_hook: str | None = None
    latents: tuple[Entry, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "probe": self.probe, "hook": self.hook, "read_position": self.read_position, "read_token": self.read_token,
            "decision": _round(self.decision), "metric": "probe decision (logit)", "method": "activation x gradient",
            "positions": {"hook": self.position_hook, "top": [e.to_dict() for e in self.positions]},
        }  # fmt: skip
        if self.sae_hook is not None:
            out["latents"] = {"hook": self.sae_hook, "top": [e.to_dict() for e in self.latents]}
        out["seconds"] = _round(self.seconds)
        return out

    def summary(self, n: int = 3) -> list[str]:
        """One line per top entry (latents first), e.g. ``latent 412 at 'Tav': -0.41 of the attribution``."""
        return [e.describe() for e in (*self.latents[:n], *self.positions[:n])]


@dataclass(frozen=True, eq=False)
class Attribution:
    """The full attribution of one read: ``positions[c]`` for columns ``0..r``; with an SAE ``latents[c, i]``,
    ``error[c]`` and ``bias[c]`` (module docstring). Values in float64 on the CPU."""

    read_position: int
    decision: float
    positions: Float[Tensor, " pos"]
    latents: Float[Tensor, "pos d_sae"] | None = None
    error: Float[Tensor, " pos"] | None = None
    bias: Float[Tensor, " pos"] | None = None
    seconds: float = 0.0


def read_position(probe: LoadedProbe, prompt_len: int, index: int) -> int:
    """The column the probe reads for generated token ``index`` (0-based) after a prompt of ``prompt_len``."""
    if probe.position == "token":
        return prompt_len + index
    if probe.position == "before_token":
        return prompt_len + index - 1
    if probe.position == "prompt_last_token":
        return prompt_len - 1
    raise KnowlensError(f"probe {probe.name}: cannot explain position rule {probe.position!r} (one of "
                        f"{', '.join(READ_RULES)})")  # fmt: skip


def check_explain_hooks(model: Any, probe: LoadedProbe, *, sae: Any = None, position_hook: str | None = None) -> str:
    """Check the hooks an explanation needs (module docstring) and return the position hook; KnowlensError if not."""
    if probe.position not in READ_RULES:
        read_position(probe, 1, 0)
    hook = position_hook or DEFAULT_POSITION_HOOK
    if not hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post")):
        raise KnowlensError(f"explanations attribute onto residual positions; {hook} is not a residual hook")
    names = [hook, probe.hook] + ([_sae_hook(sae)] if sae is not None else [])
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise KnowlensError(f"explanations need hook {missing[0]}, which this model does not have")
    order = _firing_order(model, names)
    for what, name in (("the position hook", hook), ("the SAE's hook", names[-1] if sae is not None else None)):
        if name is not None and order[name] > order[probe.hook]:
            raise KnowlensError(f"{what} {name} runs after the probe's hook {probe.hook}; it cannot drive the probe "
                                "(give an SAE / hook at or before the probe's layer)")  # fmt: skip
    return hook


def attribute_reads(
    model: Any,
    tokens: Sequence[int] | Tensor,
    reads: Sequence[int],
    probe: LoadedProbe,
    *,
    sae: Any = None,
    position_hook: str | None = None,
) -> list[Attribution]:
    """The full attribution (module docstring) of the probe's decision at each column of ``reads``, on one forward
    of ``tokens`` (one sequence, no padding) and one backward per read."""
    hook = check_explain_hooks(model, probe, sae=sae, position_hook=position_hook)
    return _attribute(model, tokens, reads, probe, sae=sae, hook=hook)


def _attribute(model: Any, tokens: Sequence[int] | Tensor, reads: Sequence[int], probe: LoadedProbe, *, sae: Any,
               hook: str) -> list[Attribution]:  # fmt: skip
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    if not reads:
        return []
    last = max(reads)
    if min(reads) < 0 or last >= ids.shape[1]:
        raise KnowlensError(f"read positions must be in [0, {ids.shape[1]}), got {list(reads)}")
    ids = ids[:, : last + 1].to(model.embed.W_E.device)
    sae_hook = _sae_hook(sae) if sae is not None else None
    extra: list[str] = [sae_hook] if sae_hook is not None else []
    names: list[str] = list(dict.fromkeys([hook, *extra, probe.hook]))
    acts: dict[str, Tensor] = {}

    def leaf_embed(x: Tensor, hook: Any) -> Tensor:
        return x.detach().requires_grad_(True)  # gradients stop here: no parameter gets a .grad

    def keep(x: Tensor, hook: Any) -> None:
        acts[hook.name] = x

    start = time.perf_counter()
    out: list[Attribution] = []
    targets: list[str] = list(dict.fromkeys([hook, *extra]))
    f = recon = None
    with torch.enable_grad():
        with model.hooks(fwd_hooks=[("hook_embed", leaf_embed), *((n, keep) for n in names)]):
            model(ids, stop_at_layer=stop_layer_for(model, names))
        z = probe.decision(probe.features(acts[probe.hook][0, list(reads)]))
        wrt = [acts[n] for n in targets]
        if sae is not None and sae_hook is not None:
            from knowlens.saes.activations import encode_latents

            a_sae = acts[sae_hook].detach()
            f = encode_latents(sae, a_sae).detach().requires_grad_(True)
            recon = sae.decode(f).reshape(a_sae.shape)
            zero = sae.decode(torch.zeros_like(f[:, :1])).detach().reshape(a_sae.shape[0], 1, *a_sae.shape[2:])
    forward_s = time.perf_counter() - start
    for j, r in enumerate(reads):
        t0 = time.perf_counter()
        grads = torch.autograd.grad(z[j], wrt, retain_graph=True, allow_unused=True)
        g = {n: (torch.zeros_like(acts[n]) if gr is None else gr.detach()) for n, gr in zip(targets, grads)}
        a = acts[hook].detach()
        pos = (a.double() * g[hook].double()).reshape(1, a.shape[1], -1).sum(-1)[0, : r + 1].cpu()
        lat = err = bias = None
        if f is not None and recon is not None and sae_hook is not None:
            gs = g[sae_hook].to(recon.dtype)
            (df,) = torch.autograd.grad(recon, f, grad_outputs=gs, retain_graph=True)
            lat = (f.detach().double() * df.double())[0, : r + 1].cpu()
            e = (acts[sae_hook].detach() - recon.detach().to(acts[sae_hook].dtype)).double()
            err = (e * g[sae_hook].double()).reshape(1, e.shape[1], -1).sum(-1)[0, : r + 1].cpu()
            bias = (zero.double() * g[sae_hook].double()).reshape(1, e.shape[1], -1).sum(-1)[0, : r + 1].cpu()
        seconds = time.perf_counter() - t0 + forward_s / len(reads)
        out.append(Attribution(read_position=r, decision=float(z[j].detach()), positions=pos, latents=lat, error=err,
                               bias=bias, seconds=seconds))  # fmt: skip
    return out


def explain_generation(
    model: Any,
    tokens: Sequence[int] | Tensor,
    prompt_len: int,
    indices: Sequence[int],
    probe: LoadedProbe,
    *,
    sae: Any = None,
    position_hook: str | None = None,
    top_k: int = 5,
    text_of: Callable[[int], str] = str,
    checked: bool = False,
) -> list[Explanation]:
    """Explanations of generated tokens ``indices`` (0-based) of one row: ``tokens`` = its prompt (``prompt_len``
    columns, no padding) followed by its generated tokens (module docstring). ``checked``: ``position_hook`` is
    what `check_explain_hooks` returned (skip the checks)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise KnowlensError(f"top_k must be an integer >= 1, got {top_k!r}")
    hook = position_hook if checked else check_explain_hooks(model, probe, sae=sae, position_hook=position_hook)
    assert hook is not None
    ids = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
    reads = [read_position(probe, prompt_len, i) for i in indices]
    texts = [text_of(t) for t in ids]
    out = []
    for att in _attribute(model, ids, reads, probe, sae=sae, hook=hook):
        r = att.read_position
        positions = _top(att.positions[:, None], texts, top_k, latent_axis=False)
        latents: tuple[Entry, ...] = ()
        if att.latents is not None and att.error is not None and att.bias is not None:
            table = torch.cat([att.latents, att.error[:, None], att.bias[:, None]], dim=1)
            latents = _top(table, texts, top_k, latent_axis=True)
        out.append(Explanation(probe=probe.name, hook=probe.hook, read_position=r, read_token=texts[r],
                               decision=att.decision, position_hook=hook, positions=positions,
                               sae_hook=_sae_hook(sae) if sae is not None else None, latents=latents,
                               seconds=att.seconds))  # fmt: skip
    return out


def shares(values: Tensor) -> Tensor:
    """``|v| / sum |v|`` over every entry (zeros when all are zero)."""
    mag = values.abs().double()
    total = float(mag.sum())
    return mag / total if total > 0 else torch.zeros_like(mag)


def _top(table: Tensor, texts: list[str], k: int, *, latent_axis: bool) -> tuple[Entry, ...]:
    share = shares(table).flatten()
    order = torch.argsort(table.abs().flatten(), descending=True)[:k]
    width = table.shape[1]
    out = []
    for idx in order.tolist():
        if float(table.flatten()[idx]) == 0.0:
            break  # sorted by |value|: the rest are zero too
        c, i = divmod(idx, width)
        latent: int | str | None = None
        if latent_axis:
            latent = "error" if i == width - 2 else "bias" if i == width - 1 else i
        out.append(Entry(position=c, token=texts[c], value=float(table[c, i]), share=float(share[idx]), latent=latent))
    return tuple(out)


# ------------------------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class ExplanationCheck:
    """For each checked token, the top latent of its explanation really ablated (error term kept): ``attributed``
    (minus its attribution: the estimated change of the decision) next to ``real`` (the measured change);
    ``sign_agreement`` (fraction with the same sign) and ``pearson`` over them."""

    rows: tuple[dict[str, Any], ...]
    sign_agreement: float
    pearson: float

    def to_dict(self) -> dict[str, Any]:
        return {"n": len(self.rows), "sign_agreement": _round(self.sign_agreement), "pearson": _round(self.pearson),
                "rows": list(self.rows)}  # fmt: skip


def check_explanations(model: Any, labels: Any, probe: LoadedProbe, sae: Any, *, sample: int | None = 32) -> ExplanationCheck:
    """Ablate the top latent (not the error or bias term) of up to ``sample`` explained tokens of ``labels`` (in order) with
    `knowlens.patching.ablate_latents` at its column only, and compare the real change of the probe's decision at
    the read column with the attributed one (`ExplanationCheck`)."""
    from knowlens.capture.prompts import tokenize_prompts
    from knowlens.patching import ablate_latents, pearson

    rows: list[dict[str, Any]] = []
    for g in labels:
        prompt = tokenize_prompts(model, [g.prompt])[0].tolist()
        for t in g.tokens:
            ex = getattr(t, "explanation", None)
            if ex is None or sample is not None and len(rows) >= sample:
                continue
            top = next((e for e in ex.latents if isinstance(e.latent, int)), None)
            if top is None:
                continue
            ids = prompt + [u.token_id for u in g.tokens[: t.index + 1]]
            r = ex.read_position
            clean = _decision(model, ids[: r + 1], probe, [])
            edit = ablate_latents(sae, [int(top.latent)], positions=[top.position])
            real = _decision(model, ids[: r + 1], probe, list(edit))
            rows.append({"row": g.row, "index": t.index, "latent": top.latent, "position": top.position,
                         "attributed": -top.value, "real": real - clean})  # fmt: skip
    if not rows:
        return ExplanationCheck(rows=(), sign_agreement=math.nan, pearson=math.nan)
    att = torch.tensor([x["attributed"] for x in rows], dtype=torch.float64)
    real = torch.tensor([x["real"] for x in rows], dtype=torch.float64)
    agree = float(((att >= 0) == (real >= 0)).double().mean())
    corr = pearson(att, real) if len(rows) > 1 else math.nan
    return ExplanationCheck(rows=tuple(rows), sign_agreement=agree, pearson=float(corr))


def _decision(model: Any, ids: list[int], probe: LoadedProbe, edits: list[tuple[str, Any]]) -> float:
    seen: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        seen["a"] = x.detach()

    tokens = torch.tensor([ids], dtype=torch.long, device=model.embed.W_E.device)
    names = [n for n, _ in edits] + [probe.hook]
    with torch.no_grad(), model.hooks(fwd_hooks=[*edits, (probe.hook, keep)]):
        model(tokens, stop_at_layer=stop_layer_for(model, names))
    return float(probe.decision(probe.features(seen["a"][0, -1])))


# ------------------------------------------------------------------------------------------- helpers


def _sae_hook(sae: Any) -> str:
    name = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    if not isinstance(name, str):
        raise KnowlensError("the SAE does not say which hook it reads (cfg.metadata.hook_name)")
    return name


def _firing_order(model: Any, names: Sequence[str]) -> dict[str, int]:
    """The order in which hooks ``names`` fire on a one-token forward (each name's first firing)."""
    order: dict[str, int] = {}

    def note(x: Tensor, hook: Any) -> None:
        order.setdefault(hook.name, len(order))

    unique = list(dict.fromkeys(names))
    tokens = torch.zeros((1, 1), dtype=torch.long, device=model.embed.W_E.device)
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, note) for n in unique]):
        model(tokens, stop_at_layer=stop_layer_for(model, unique))
    return order


def _round(v: float) -> float | None:
    if not math.isfinite(v):
        return None
    return round(float(v), 6) + 0.0
