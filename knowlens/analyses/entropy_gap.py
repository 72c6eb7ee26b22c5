"""Entropy-gap study: `entropy_gap(model, prompts, *, others=...) -> EntropyGap`.

Is the model's output entropy different when it continues its *own* text than when the same positions after the
same prompt hold *other* text? (Stated confidence is biased toward the model's own text: ../shared/DESIGN.md.)

Definitions:

* **Own continuation.** What `knowlens.capture.generate` produces for the prompt (greedy at ``temperature`` 0,
  else sampled with ``seed``; ``batch_size`` prompts per call, in the given order), at most ``max_new_tokens``
  tokens (fewer where the longest prompt of its batch leaves less room in the context), **cut before its first
  EOS** (the EOS and anything after it are dropped).
* **Other continuation**, per ``others``:
  - a sequence with one entry per prompt: text (tokenized as is, no BOS: give it the leading space a BPE
    tokenizer expects) or token ids, cut before its first EOS and to the context left after the prompt;
  - ``"derange"``: the own continuation of another prompt, by a derangement of the prompts (no prompt keeps its
    own) drawn with ``seed`` (``params["derangement"]``), cut to the context left after this prompt; needs at
    least two prompts;
  - ``"sample"``: a second continuation of the same prompt, sampled at temperature 1 with seed ``seed + 1``.
* **Teacher forcing.** One forward pass on prompt + continuation (batched rows right-padded, with an explicit
  attention mask: exact under causal attention). For a continuation ``c_1 .. c_n`` after a prompt of ``P``
  tokens, at continuation position ``j`` (column ``P + j - 1``, the one holding ``c_j``):
  - output entropy ``H_j = -sum_v p(v | prompt, c_<=j) log p(v | prompt, c_<=j)`` (nats): the next-token
    distribution *at the position that holds* ``c_j``, i.e. how uncertain the model is continuing after it;
  - input surprisal ``S_j = -log p(c_j | prompt, c_<j)`` (nats): how surprising the fed token was, from the
    logits one column earlier (for ``j = 1``: the prompt's last token).
  Both from the log-softmax of the logits in float64.
* **Alignment.** Per prompt the positions ``j = 1 .. m`` with ``m = min(len(own), len(other))``, lengths counted
  after the EOS cut: the positions that exist in both. The longer continuation's tail is not compared.
* **Per position** ``j``: the mean of ``H`` (and ``S``) over the prompts whose ``m >= j``, own and other, and
  that count.
* **Ratio** own/other: ``sum H_own / sum H_other`` over every aligned position of every prompt (= the mean of
  ``H_own`` over them divided by the mean of ``H_other``); the same for ``S``. NaN with no aligned position.
* **Interval.** Percentile bootstrap over prompts (clusters, each with all its positions): ``n_bootstrap``
  resamples with replacement from a ``torch.Generator`` seeded with ``seed`` (the same resamples for ``H`` and
  ``S``), the ratio of each, its ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear
  interpolation). Resamples whose denominator is 0 are dropped. A resampled ratio is a weighted mediant of the
  per-prompt ratios, so it lies between the smallest and the largest of them.

No hooks are used.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knowlens.capture import generate
from knowlens.capture.prompts import (
    PromptsArg,
    eos_token_ids,
    pad_token_id,
    tokenize_prompts,
    warn_unknown_words,
)
from knowlens.errors import KnowlensError
from knowlens.fingerprint import model_identity
from knowlens.types import Bool, Float, Int, Tensor

FORMAT = "knowlens.entropy_gap"
MODES = ("derange", "sample")
_MATRICES = ("own_entropy", "other_entropy", "own_surprisal", "other_surprisal")
_BOOTSTRAP_CHUNK = 1 << 22  # resample indices held at once (resamples x prompts)


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class EntropyGap:
    """What `entropy_gap` measured (float64 CPU tensors). Per-prompt matrices hold the aligned positions only
    (``aligned``; 0 elsewhere); ``*_by_position`` are the means over prompts at each position (``n_by_position``)."""

    model: dict[str, str]  # model_identity: name, fingerprint, shape_fingerprint
    others: str  # "supplied" | "derange" | "sample"
    own_tokens: tuple[tuple[int, ...], ...]  # each prompt's own continuation, EOS cut
    other_tokens: tuple[tuple[int, ...], ...]  # the other continuation placed after it, EOS cut
    aligned: Bool[Tensor, "prompts pos"]
    own_entropy: Float[Tensor, "prompts pos"]
    other_entropy: Float[Tensor, "prompts pos"]
    own_surprisal: Float[Tensor, "prompts pos"]
    other_surprisal: Float[Tensor, "prompts pos"]
    n_by_position: Int[Tensor, " pos"]
    own_entropy_by_position: Float[Tensor, " pos"]
    other_entropy_by_position: Float[Tensor, " pos"]
    own_surprisal_by_position: Float[Tensor, " pos"]
    other_surprisal_by_position: Float[Tensor, " pos"]
    entropy_ratio: float
    entropy_interval: tuple[float, float]
    surprisal_ratio: float
    surprisal_interval: tuple[float, float]
    params: dict[str, Any]

    @property
    def n_prompts(self) -> int:
        return len(self.own_tokens)

    @property
    def n_positions(self) -> int:
        """Aligned positions, all prompts together."""
        return int(self.aligned.sum())

    @property
    def aligned_length(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.aligned.sum(dim=1))

    @property
    def n_empty(self) -> int:
        """Prompts with no aligned position (an empty own or other continuation)."""
        return sum(m == 0 for m in self.aligned_length)

    @property
    def n_identical(self) -> int:
        """Prompts whose own and other continuation are the same tokens (their values are equal)."""
        return sum(a == b for a, b in zip(self.own_tokens, self.other_tokens))

    def means(self) -> dict[str, float]:
        """Pooled means over every aligned position: own/other entropy and surprisal (NaN with none)."""
        n = self.n_positions
        return {k: float(getattr(self, k).sum()) / n if n else math.nan for k in _MATRICES}

    def subset(self, rows: Sequence[int]) -> EntropyGap:
        """The study restricted to the prompts ``rows`` (e.g. one entity split): ratios and intervals recomputed
        with the same bootstrap settings and seed; ``params["subset_rows"]`` records ``rows``."""
        idx = [int(r) for r in rows]
        if not idx:
            raise KnowlensError("an entropy-gap subset needs at least one prompt")
        if min(idx) < 0 or max(idx) >= self.n_prompts:
            raise KnowlensError(f"subset rows must lie in [0, {self.n_prompts}), got {min(idx)}..{max(idx)}")
        sel = torch.tensor(idx, dtype=torch.long)
        width = int(self.aligned[sel].sum(dim=1).max())
        mats = [getattr(self, k)[sel, :width] for k in _MATRICES]
        return _build(
            model=self.model, others=self.others, own_tokens=tuple(self.own_tokens[i] for i in idx),
            other_tokens=tuple(self.other_tokens[i] for i in idx), aligned=self.aligned[sel, :width],
            matrices=mats, params={**self.params, "subset_rows": idx},
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None): settings, counts, ratios with intervals, per-position means, lengths."""
        means = self.means()
        out: dict[str, Any] = {
            "format": FORMAT, "model": dict(self.model), "others": self.others, "params": dict(self.params),
            "n_prompts": self.n_prompts, "n_positions": self.n_positions, "n_identical": self.n_identical,
            "n_empty": self.n_empty,
        }  # fmt: skip
        for what in ("entropy", "surprisal"):
            out[what] = {
                "ratio": getattr(self, f"{what}_ratio"), "interval": list(getattr(self, f"{what}_interval")),
                "own_mean": means[f"own_{what}"], "other_mean": means[f"other_{what}"],
            }  # fmt: skip
        out["by_position"] = {"n": self.n_by_position.tolist()}
        out["by_position"].update({k: getattr(self, f"{k}_by_position").tolist() for k in _MATRICES})
        out["per_prompt"] = {
            "own_length": [len(t) for t in self.own_tokens],
            "other_length": [len(t) for t in self.other_tokens],
            "aligned_length": list(self.aligned_length),
        }
        return _json_safe(out)


def entropy_gap(
    model: Any,
    prompts: PromptsArg,
    *,
    others: str | Sequence[Any] = "derange",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    batch_size: int = 64,
) -> EntropyGap:
    """Output entropy and input surprisal on the model's own continuations vs other text (module docstring).

    Args:
        model: a TransformerLens ``HookedTransformer``.
        prompts: strings (tokenized with BOS) or token-id rows, as `knowlens.capture.generate` takes them.
        others: one alternative continuation per prompt (text or token ids), ``"derange"`` (another prompt's own
            continuation) or ``"sample"`` (a second sample at temperature 1).
        max_new_tokens, temperature, top_p, seed: the own generation (``seed`` also draws the derangement,
            ``seed + 1`` the second sample, and ``seed`` the bootstrap).
        eos_token_id: where continuations are cut (default: the tokenizer's EOS; none without a tokenizer).
    """
    _check_options(max_new_tokens, n_bootstrap, confidence, batch_size)
    rows = tokenize_prompts(model, prompts)
    n_ctx = int(model.cfg.n_ctx)
    for i, row in enumerate(rows):
        if row.numel() >= n_ctx:
            raise KnowlensError(f"prompt {i} has {row.numel()} tokens: no room left in the model's context of {n_ctx}")
    eos = eos_token_ids(model, eos_token_id)
    supplied: list[Tensor] | None = None
    if isinstance(others, str):
        if others not in MODES:
            raise KnowlensError(
                f"others must be {' or '.join(map(repr, MODES))} or one continuation per prompt, got {others!r}"
            )
        if others == "derange" and len(rows) < 2:
            raise KnowlensError("others='derange' swaps continuations between prompts: give at least two prompts")
    else:
        supplied = _other_rows(model, others, len(rows))
    own = _continue(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    eos=eos, batch_size=batch_size)  # fmt: skip
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "temperature": float(temperature), "top_p": top_p, "seed": seed,
        "eos_token_ids": list(eos), "n_bootstrap": n_bootstrap, "confidence": confidence,
    }  # fmt: skip
    if supplied is not None:
        mode = "supplied"
        other = [_cut(s, eos)[: n_ctx - row.numel()] for s, row in zip(supplied, rows)]
    elif others == "derange":
        mode = "derange"
        perm = _derangement(len(rows), seed)
        params["derangement"] = perm
        other = [own[j][: n_ctx - row.numel()] for j, row in zip(perm, rows)]
    else:
        mode = "sample"
        other = _continue(model, rows, max_new_tokens=max_new_tokens, temperature=1.0, top_p=None, seed=seed + 1,
                          eos=eos, batch_size=batch_size)  # fmt: skip
    own_h, own_s = _teacher_forced(model, rows, own, batch_size)
    other_h, other_s = _teacher_forced(model, rows, other, batch_size)
    lengths = [min(a.numel(), b.numel()) for a, b in zip(own, other)]
    width = max(lengths)
    aligned = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    mats = []
    for per_prompt in (own_h, other_h, own_s, other_s):
        mat = torch.zeros((len(rows), width), dtype=torch.float64)
        for i, (values, m) in enumerate(zip(per_prompt, lengths)):
            mat[i, :m] = values[:m]
        mats.append(mat)
    return _build(
        model=model_identity(model), others=mode, own_tokens=tuple(tuple(t.tolist()) for t in own),
        other_tokens=tuple(tuple(t.tolist()) for t in other), aligned=aligned, matrices=mats, params=params,
    )  # fmt: skip


def bootstrap_ratio(
    pairs: Sequence[tuple[Float[Tensor, " clusters"], Float[Tensor, " clusters"]]],
    *, n_bootstrap: int, confidence: float, seed: int,
) -> list[tuple[float, float]]:  # fmt: skip
    """Percentile intervals of ``sum(num) / sum(den)`` for each ``(num, den)`` pair of per-cluster sums,
    resampling clusters with replacement; every pair sees the same resamples. Zero-denominator resamples are
    dropped; (NaN, NaN) when none is left or there is no cluster."""
    n = int(pairs[0][0].numel()) if pairs else 0
    if n == 0:
        return [(math.nan, math.nan) for _ in pairs]
    gen = torch.Generator().manual_seed(seed)
    ratios: list[list[Tensor]] = [[] for _ in pairs]
    chunk = max(1, _BOOTSTRAP_CHUNK // n)
    for start in range(0, n_bootstrap, chunk):
        idx = torch.randint(n, (min(chunk, n_bootstrap - start), n), generator=gen)
        for k, (num, den) in enumerate(pairs):
            a, b = num.double()[idx].sum(dim=1), den.double()[idx].sum(dim=1)
            ok = b > 0
            ratios[k].append(a[ok] / b[ok])
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    out: list[tuple[float, float]] = []
    for parts in ratios:
        r = torch.cat(parts)
        lo, hi = torch.quantile(r, q).tolist() if r.numel() else (math.nan, math.nan)
        out.append((float(lo), float(hi)))
    return out


def format_entropy_gap(gap: EntropyGap, *, positions: int = 8, title: str = "") -> str:
    """A few lines: counts, both ratios with their intervals, and the first ``positions`` per-position means."""
    m = gap.means()
    pct = round(100 * float(gap.params.get("confidence", 0.95)))
    head = title or f"entropy gap, own vs {gap.others}"
    lines = [
        f"{head}: {gap.n_prompts} prompts, {gap.n_positions} aligned positions "
        f"({gap.n_identical} identical continuations, {gap.n_empty} with no aligned position)",
        f"  output entropy   own {_num(m['own_entropy'])}  other {_num(m['other_entropy'])}  "
        f"ratio {_num(gap.entropy_ratio)} [{_num(gap.entropy_interval[0])}, {_num(gap.entropy_interval[1])}]",
        f"  input surprisal  own {_num(m['own_surprisal'])}  other {_num(m['other_surprisal'])}  "
        f"ratio {_num(gap.surprisal_ratio)} [{_num(gap.surprisal_interval[0])}, {_num(gap.surprisal_interval[1])}]",
        f"  ({pct}% bootstrap intervals over prompts, {gap.params.get('n_bootstrap')} resamples; nats)",
    ]
    shown = min(positions, int(gap.n_by_position.numel()))
    if shown:
        lines.append("  pos      n   H own  H other   S own  S other")
        for j in range(shown):
            lines.append(
                f"  {j + 1:>3} {int(gap.n_by_position[j]):>6} {_num(float(gap.own_entropy_by_position[j])):>7} "
                f"{_num(float(gap.other_entropy_by_position[j])):>8} {_num(float(gap.own_surprisal_by_position[j])):>7} "
                f"{_num(float(gap.other_surprisal_by_position[j])):>8}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ helpers


def _build(
    *, model: dict[str, str], others: str, own_tokens: tuple[tuple[int, ...], ...],
    other_tokens: tuple[tuple[int, ...], ...], aligned: Tensor, matrices: list[Tensor], params: dict[str, Any],
) -> EntropyGap:  # fmt: skip
    """Per-position means, ratios and intervals from the per-prompt aligned matrices (in `_MATRICES` order)."""
    mats = [m.masked_fill(~aligned, 0.0) for m in matrices]
    n_pos = aligned.sum(dim=0)
    sums = [m.sum(dim=1) for m in mats]
    lo_hi = bootstrap_ratio([(sums[0], sums[1]), (sums[2], sums[3])], n_bootstrap=int(params["n_bootstrap"]),
                            confidence=float(params["confidence"]), seed=int(params["seed"]))  # fmt: skip
    by_pos = {f"{k}_by_position": m.sum(dim=0) / n_pos.clamp(min=1) for k, m in zip(_MATRICES, mats)}
    return EntropyGap(
        model=model, others=others, own_tokens=own_tokens, other_tokens=other_tokens, aligned=aligned,
        **dict(zip(_MATRICES, mats)), n_by_position=n_pos.long(), **by_pos,
        entropy_ratio=_ratio(sums[0], sums[1]), entropy_interval=lo_hi[0],
        surprisal_ratio=_ratio(sums[2], sums[3]), surprisal_interval=lo_hi[1], params=params,
    )  # fmt: skip


def _continue(
    model: Any, rows: list[Tensor], *, max_new_tokens: int, temperature: float, top_p: float | None, seed: int,
    eos: tuple[int, ...], batch_size: int,
) -> list[Tensor]:  # fmt: skip
    """Each prompt's continuation by `generate` (``batch_size`` prompts at a time, in the given order: a sampled
    continuation is what ``generate`` draws for that batch with ``seed``), cut before its first EOS."""
    n_ctx = int(model.cfg.n_ctx)
    out: dict[int, Tensor] = {}
    for k in range(0, len(rows), batch_size):
        batch = list(range(k, min(k + batch_size, len(rows))))
        limit = min(max_new_tokens, n_ctx - max(rows[i].numel() for i in batch))
        rec = generate(
            model, [rows[i] for i in batch], hooks=(), max_new_tokens=limit, temperature=temperature,
            top_p=top_p, seed=seed, stop_at_eos=bool(eos), eos_token_id=list(eos) or None,
        )  # fmt: skip
        for r, i in enumerate(batch):
            cols = rec.generated_mask[r].nonzero().flatten()
            out[i] = _cut(rec.tokens[r, cols].cpu(), eos)
    return [out[i] for i in range(len(rows))]


def _teacher_forced(
    model: Any, rows: list[Tensor], conts: list[Tensor], batch_size: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Per prompt, ``(H, S)`` at each continuation position (float64, CPU), from one forward pass per batch."""
    device = model.embed.W_E.device
    pad = pad_token_id(model)
    entropies: list[Tensor] = []
    surprisals: list[Tensor] = []
    for k in range(0, len(rows), batch_size):
        idx = range(k, min(k + batch_size, len(rows)))
        seqs = [torch.cat([rows[i], conts[i]]) for i in idx]
        width = max(s.numel() for s in seqs)
        tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            tokens[r, : s.numel()] = s
            mask[r, : s.numel()] = 1
        with torch.inference_mode():
            logits = model(tokens.to(device), attention_mask=mask.to(device), return_type="logits")
        for r, i in enumerate(idx):
            P, n = rows[i].numel(), conts[i].numel()
            logp = torch.log_softmax(logits[r, P - 1 : P + n].double(), dim=-1).cpu()  # columns P-1 .. P+n-1
            out = logp[1:]  # the distribution at each c_j's own column
            entropies.append(-(out.exp() * out).nan_to_num(0.0).sum(dim=-1))
            surprisals.append(-logp[:n].gather(-1, conts[i][:, None]).squeeze(-1))
    return entropies, surprisals


def _other_rows(model: Any, others: Sequence[Any], n: int) -> list[Tensor]:
    if isinstance(others, torch.Tensor) and others.ndim == 2:
        others = list(others)
    if len(others) != n:
        raise KnowlensError(f"others has {len(others)} continuations for {n} prompts; give one per prompt")
    texts = [o for o in others if isinstance(o, str)]
    if texts:
        if getattr(model, "tokenizer", None) is None:
            raise KnowlensError("text continuations need a model with a tokenizer; pass token ids instead")
        warn_unknown_words(model.tokenizer, texts)
    d_vocab = int(model.cfg.d_vocab)
    out = []
    for i, o in enumerate(others):
        if isinstance(o, str):
            row = model.to_tokens(o, prepend_bos=False, move_to_device=False, truncate=False)[0] if o else torch.zeros(0)
        else:
            row = torch.as_tensor(o)
            if row.ndim != 1:
                raise KnowlensError(
                    f"other continuation {i} must be text or a 1-D list of token ids, got shape {tuple(row.shape)}"
                )
            if row.numel() and (row.is_floating_point() or row.is_complex() or row.dtype == torch.bool):
                raise KnowlensError(f"other continuation {i} must hold integer token ids, got dtype {row.dtype}")
        if row.numel() == 0:
            raise KnowlensError(f"other continuation {i} is empty")
        row = row.detach().to(device="cpu", dtype=torch.long)
        if int(row.min()) < 0 or int(row.max()) >= d_vocab:
            bad = int(row.min()) if int(row.min()) < 0 else int(row.max())
            raise KnowlensError(f"other continuation {i} has token id {bad} outside the vocabulary (d_vocab={d_vocab})")
        out.append(row)
    return out


def _cut(tokens: Tensor, eos: tuple[int, ...]) -> Tensor:
    """``tokens`` before the first EOS."""
    if eos:
        hits = torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype)).nonzero()
        if hits.numel():
            return tokens[: int(hits[0, 0])]
    return tokens


def _derangement(n: int, seed: int) -> list[int]:
    """A uniformly drawn permutation with no fixed point (rejection sampling; ~e draws), n >= 2."""
    rng = random.Random(f"knowlens.entropy_gap/{seed}")
    perm = list(range(n))
    while True:
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def _ratio(num: Tensor, den: Tensor) -> float:
    d = float(den.sum())
    return float(num.sum()) / d if d > 0 else math.nan


def _check_options(max_new_tokens: int, n_bootstrap: int, confidence: float, batch_size: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KnowlensError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise KnowlensError(f"n_bootstrap must be an integer >= 1, got {n_bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise KnowlensError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KnowlensError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
