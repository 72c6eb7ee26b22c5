"""`label_generation(model, prompts, probes, ...) -> TokenLabels`: per-token reliability labels while the model generates.

The capture loop (`knowlens.capture.generate`, KV-cached, batched) records every probe's hook, and the probes are
applied inside its ``on_step`` callback on the model's device, as each token is produced; no second pass.

Each probe is read by its card's position rule (`knowlens.probes.pseudo.POSITION_RULES`):

* ``token``: the score of generated token ``t`` is the probe on ``t``'s own activation (computed in the step that
  fed ``t``);
* ``before_token``: the probe on the activation at the position before ``t`` (the one that predicted it): the
  prompt's last token for the first generated token (read by a hook during the prompt pass), then the previous
  step's token;
* ``prompt_last_token``: the probe on the prompt's last token, the same for every token of the generation;
* ``entity_last_token`` (an entity-known probe; at most one): the probe is applied at every token, prompt and
  generated, and the signal ``entity_known`` of token ``t`` is its score at the last *name-ending* token at or
  before ``t``; null until a name is seen. A token ends a name when it and the token before it are both name pieces
  (``name_piece(text)``; default: a capitalised alphabetic word of 2+ letters, as
  `knowlens.saes.contrast.capitalised_names` reads names of 2+ words), so for a name of several pieces the carried
  score is that of its last piece once the name is complete.

**p_reliable.** ``combine="first"`` (default): the calibrated probability of the first ``token`` /
``before_token`` probe given (the primary; the others are reported as signals). ``combine="mean"``: the mean of
the calibrated probabilities of every ``token`` / ``before_token`` probe. ``prompt_last_token`` and entity probes
are signals only. **label**: ``reliable`` when ``p_reliable >= threshold`` (the argument, else the primary
probe's card threshold, else 0.5), else ``unreliable``.

**Signals** per token: ``probe:<name>`` for every probe but the entity probe (its calibrated probability),
``entity_known`` (with an entity probe), ``input_surprise`` = ``-log p(token)`` under the model (nats),
``top1_prob`` and ``entropy`` of the distribution the token was chosen from (temperature 1, as
`knowlens.capture.record` defines them).

**Streaming.** With ``on_token``, each step's values are copied to the host once (one sync per step) and
``on_token(TokenLabel)`` is called for every row still generating, in row order, before the next step runs.
Without it nothing leaves the device until a batch is done. Probes are checked against the model (weight
fingerprint, hook) before any work; a failing run leaves no hook on the model.

**Explanations** (``explain=True``): after each batch, every unreliable token gets the positions and SAE latents
that most drive the primary probe's decision, by activation x gradient (`knowlens.labels.explain`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from knowlens.capture import StepState, generate
from knowlens.capture.hooks import validate_hook_names
from knowlens.capture.prompts import PromptsArg, tokenize_prompts
from knowlens.errors import KnowlensError
from knowlens.fingerprint import check_same_model, model_identity
from knowlens.labels.explain import check_explain_hooks, explain_generation
from knowlens.labels.tokens import GenerationLabels, TokenLabel, TokenLabels
from knowlens.probes import LoadedProbe, load_probe
from knowlens.probes.pseudo import POSITION_RULES
from knowlens.types import Tensor

COMBINE = ("first", "mean")
PER_TOKEN = ("token", "before_token")
ProbeArg = LoadedProbe | str | os.PathLike[str]


def capitalised_piece(text: str) -> bool:
    """The default name-piece test: a capitalised alphabetic word of 2 or more letters."""
    w = text.strip()
    return len(w) >= 2 and w.isalpha() and w[0].isupper()


def label_generation(
    model: Any,
    prompts: PromptsArg,
    probes: Sequence[ProbeArg],
    *,
    max_new_tokens: int = 32,
    threshold: float | None = None,
    combine: str = "first",
    on_token: Callable[[TokenLabel], object] | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    batch_size: int = 16,
    sae: Any = None,
    name_piece: Callable[[str], bool] = capitalised_piece,
    progress: bool = False,
    explain: bool = False,
    explain_top_k: int = 5,
    explain_hook: str | None = None,
) -> TokenLabels:
    """Generate from ``prompts`` and label every generated token with ``probes`` (module docstring).

    Args:
        probes: `LoadedProbe` s or probe files (loaded with ``load_probe(path, model=model, sae=sae)``).
        sae: the SAE a probe over SAE latents reads (for probe files).
        temperature, top_p, seed, stop_at_eos: as `knowlens.capture.generate` (greedy by default).
        batch_size: prompts per `generate` call.
        progress: a progress bar of generation steps (tqdm, on stderr).
        explain: attach to every unreliable token the positions (and, with ``sae``, the SAE latents) that most
            drive the primary probe's decision (`knowlens.labels.explain`), after each batch is generated;
            ``explain_top_k`` entries per family, positions at ``explain_hook`` (default
            ``blocks.0.hook_resid_pre``). ``params["explain"]`` gets the count and the seconds per explained token.
    """
    if combine not in COMBINE:
        raise KnowlensError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise KnowlensError(f"threshold must be in (0, 1), got {threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KnowlensError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    loaded = resolve_probes(model, probes, sae=sae)
    token_idx = [i for i, p in enumerate(loaded) if p.position in PER_TOKEN]
    primary = loaded[token_idx[0]]
    cut = float(threshold if threshold is not None else primary.threshold if primary.threshold is not None else 0.5)
    hooks = validate_hook_names(model, [p.hook for p in loaded])
    explain_at = None
    if explain:
        if isinstance(explain_top_k, bool) or not isinstance(explain_top_k, int) or explain_top_k < 1:
            raise KnowlensError(f"explain_top_k must be an integer >= 1, got {explain_top_k!r}")
        explain_at = check_explain_hooks(model, primary, sae=sae, position_hook=explain_hook)
    explained, explain_s = 0, 0.0
    rows = tokenize_prompts(model, prompts)
    originals = _originals(prompts, rows)
    text_of = _Texts(model)
    starts = range(0, len(rows), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * max_new_tokens, desc="labelling", unit="step")
    generations: list[GenerationLabels] = []
    try:
        for start in starts:
            batch = _Batch(loaded, token_idx, combine, cut, rows[start : start + batch_size], start, max_new_tokens,
                           text_of, name_piece, on_token, None if bar is None else bar.update)  # fmt: skip
            with model.hooks(fwd_hooks=batch.prompt_hooks()):
                rec = generate(model, batch.rows, hooks=hooks, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stop_at_eos=stop_at_eos, on_step=batch.on_step)  # fmt: skip
            done = batch.finish(rec, originals[start : start + batch_size])
            if explain_at is not None:
                t0 = time.perf_counter()
                done = [_explained(model, g, row, primary, sae, explain_at, explain_top_k, text_of)
                        for g, row in zip(done, batch.rows)]  # fmt: skip
                explain_s += time.perf_counter() - t0
                explained += sum(t.explanation is not None for g in done for t in g.tokens)
            generations += done
            if bar is not None:
                bar.update(max_new_tokens - batch.n_steps)  # the steps every row's EOS made unneeded
    finally:
        if bar is not None:
            bar.close()
    info = [_probe_info(p, i, token_idx, combine) for i, p in enumerate(loaded)]
    params = {"max_new_tokens": max_new_tokens, "temperature": float(temperature), "top_p": top_p, "seed": seed,
              "stop_at_eos": stop_at_eos, "batch_size": batch_size,
              "rule": _rule_text(combine, primary.name, cut)}  # fmt: skip
    if explain_at is not None:
        params["explain"] = {"tokens": explained, "seconds": round(explain_s, 6), "position_hook": explain_at,
                             "sae_hook": None if sae is None else sae.cfg.metadata.hook_name, "top_k": explain_top_k,
                             "seconds_per_token": round(explain_s / explained, 6) if explained else None}  # fmt: skip
    return TokenLabels(generations=tuple(generations), probes=tuple(info), threshold=cut, combine=combine,
                       model=model_identity(model), params=params)  # fmt: skip


def resolve_probes(model: Any, probes: Sequence[ProbeArg], *, sae: Any = None) -> list[LoadedProbe]:
    """Load probe files and check every probe against ``model`` (fingerprint, hook), its kind, position rule and
    inputs; one KnowlensError line for anything that cannot label tokens."""
    if isinstance(probes, (str, os.PathLike, LoadedProbe)) or len(probes) == 0:
        raise KnowlensError("give a list of one or more probes (LoadedProbe objects or probe files)")
    device = model.embed.W_E.device
    identity = model_identity(model)
    out: list[LoadedProbe] = []
    for p in probes:
        if isinstance(p, LoadedProbe):
            what = f"probe {p.path}"
            check_same_model(p.model, identity, what=what, error=KnowlensError)
            if p.hook not in model.hook_dict:
                raise KnowlensError(f"{what}: reads hook {p.hook}, which this model does not have")
        elif isinstance(p, (str, os.PathLike)):
            p = load_probe(p, model=model, sae=sae if _reads_sae(p) else None, device=device)
        else:
            raise KnowlensError(f"a probe must be a LoadedProbe or a probe file, got {type(p).__name__}")
        what = f"probe {p.path}"
        if p.kind != "logistic":
            raise KnowlensError(f"{what} is a {p.kind} probe; labels need logistic probes (probabilities)")
        if p.position not in POSITION_RULES:
            raise KnowlensError(f"{what}: position rule {p.position!r} is not one of {', '.join(POSITION_RULES)}")
        if p.input.kind != "residual" and p.sae is None:
            raise KnowlensError(f"{what} reads {p.input.describe()}: pass sae= (the SAE it was fitted on)")
        out.append(p)
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise KnowlensError(f"two probes are named {dup!r}; their signals would collide (rename one in its card)")
    if sum(p.position == "entity_last_token" for p in out) > 1:
        raise KnowlensError("give at most one entity probe (position rule entity_last_token)")
    if not any(p.position in PER_TOKEN for p in out):
        raise KnowlensError("no per-token probe given: p_reliable needs a probe with position rule token or before_token")
    return out


def _reads_sae(path: Any) -> bool:
    import json
    from pathlib import Path

    card = Path(path).with_suffix(".json")
    try:
        return json.loads(card.read_text()).get("input", {}).get("kind", "residual") != "residual"
    except (OSError, ValueError, AttributeError):
        return False  # load_probe reports what is wrong with the files


class _Texts:
    """Token id -> display text (``tokenizer.decode([id])``, cached; the id itself without a tokenizer)."""

    def __init__(self, model: Any) -> None:
        self.tok = getattr(model, "tokenizer", None)
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = str(self.tok.decode([token_id])) if self.tok is not None else str(token_id)
            self.cache[token_id] = text
        return text


class _Batch:
    """One `generate` call: device buffers the probes write into at every step, and the host-side assembly."""

    def __init__(self, probes: list[LoadedProbe], token_idx: list[int], combine: str, threshold: float,
                 rows: list[Tensor], offset: int, steps: int, text_of: _Texts, name_piece: Callable[[str], bool],
                 on_token: Callable[[TokenLabel], object] | None, tick: Callable[[int], object] | None) -> None:  # fmt: skip
        self.probes, self.token_idx, self.combine, self.threshold = probes, token_idx, combine, threshold
        self.rows, self.offset, self.steps = rows, offset, steps
        self.text_of, self.name_piece, self.on_token, self.tick = text_of, name_piece, on_token, tick
        self.entity = next((i for i, p in enumerate(probes) if p.position == "entity_last_token"), None)
        self.pending: dict[int, Tensor] = {}  # before_token / prompt_last_token: the score for the next token
        self.entity_prompt: Tensor | None = None  # (batch, prompt_len) entity scores on the prompt columns
        self.seen: set[str] = set()
        self.n_steps = 0
        self.scores: Tensor | None = None  # (n_probes, batch, steps) float64
        self.stats: Tensor | None = None  # (3, batch, steps): input surprise, top-1 probability, entropy
        self.carry: list[tuple[float | None, bool]] | None = None  # per row: entity score carried, last was a piece
        self.emitted: list[list[TokenLabel]] = [[] for _ in rows]

    def prompt_hooks(self) -> list[tuple[str, Any]]:
        names = {p.hook for p in self.probes if p.position != "token"}
        return [(h, partial(self._prompt_pass, name=h)) for h in sorted(names)]

    def _prompt_pass(self, act: Tensor, hook: Any, *, name: str) -> None:
        if name in self.seen:  # only the first forward pass (the prompt) is read here
            return
        self.seen.add(name)
        for i, p in enumerate(self.probes):
            if p.hook != name or p.position == "token":
                continue
            if p.position == "entity_last_token":
                self.entity_prompt = p.score(act)
            else:
                self.pending[i] = p.score(act[:, -1])

    def on_step(self, state: StepState) -> None:
        s = state.step
        if self.scores is None:
            n, device = len(self.rows), state.tokens.device
            dtype = torch.float32 if device.type == "mps" else torch.float64  # as LoadedProbe.score
            self.scores = torch.full((len(self.probes), n, self.steps), math.nan, dtype=dtype, device=device)
            self.stats = torch.zeros((3, n, self.steps), dtype=torch.float32, device=device)
        assert self.stats is not None
        for i, p in enumerate(self.probes):
            act = state.activations[p.hook]
            if p.position in ("token", "entity_last_token"):
                value = p.score(act)
            elif p.position == "before_token":
                value = self.pending[i]
                self.pending[i] = p.score(act)
            else:  # prompt_last_token
                value = self.pending[i]
            self.scores[i, :, s] = value
        self.stats[:, :, s] = torch.stack((-state.logprobs, state.top1_prob, state.entropy))
        if self.on_token is not None:
            scores = self.scores[:, :, s].cpu()
            stats = self.stats[:, :, s].cpu()
            for label in self._emit(s, state.tokens.tolist(), state.alive.tolist(), scores, stats):
                self.on_token(label)
        self.n_steps += 1
        if self.tick is not None:
            self.tick(1)

    def finish(self, rec: Any, originals: list[Any]) -> list[GenerationLabels]:
        """Labels of every row (emitting now what was not streamed), in row order."""
        P = rec.prompt_len
        n_steps = int(rec.tokens.shape[1]) - P
        if self.on_token is None and self.scores is not None and self.stats is not None:
            scores, stats = self.scores.cpu(), self.stats.cpu()
            tokens, alive = rec.tokens[:, P:].cpu(), rec.generated_mask[:, P:].cpu()
            for s in range(n_steps):
                list(self._emit(s, tokens[:, s].tolist(), alive[:, s].tolist(), scores[:, :, s], stats[:, :, s]))
        out = []
        for r, row in enumerate(self.rows):
            prompt_tokens = tuple(self.text_of(int(t)) for t in row.tolist())
            out.append(GenerationLabels(row=self.offset + r, prompt=originals[r], prompt_tokens=prompt_tokens,
                                        tokens=tuple(self.emitted[r])))  # fmt: skip
        return out

    def _emit(self, s: int, tokens: list[int], alive: list[bool], scores: Tensor, stats: Tensor) -> list[TokenLabel]:
        """Labels of step ``s``'s live rows; ``scores`` (n_probes, batch) and ``stats`` (3, batch) on the host."""
        if self.carry is None:
            self.carry = [self._prompt_carry(r) for r in range(len(self.rows))]
        per_token = scores[self.token_idx]
        p_all = (per_token[0] if self.combine == "first" else per_token.mean(dim=0)).tolist()
        score_rows, (surprise, top1, entropy) = scores.tolist(), stats.tolist()  # Python floats: one conversion
        probe_keys = [(i, f"probe:{p.name}") for i, p in enumerate(self.probes) if i != self.entity]
        out = []
        for r, (tid, live) in enumerate(zip(tokens, alive)):
            if not live:
                continue
            text = self.text_of(int(tid))
            signals: dict[str, float | None] = {key: score_rows[i][r] for i, key in probe_keys}
            if self.entity is not None:
                carried, was_piece = self.carry[r]
                piece = self.name_piece(text)
                if piece and was_piece:
                    carried = score_rows[self.entity][r]
                self.carry[r] = (carried, piece)
                signals["entity_known"] = carried
            signals["input_surprise"] = surprise[r]
            signals["top1_prob"] = top1[r]
            signals["entropy"] = entropy[r]
            p = p_all[r]
            label = TokenLabel(row=self.offset + r, index=len(self.emitted[r]), token_id=int(tid), text=text,
                               p_reliable=p, label="reliable" if p >= self.threshold else "unreliable",
                               signals=signals)  # fmt: skip
            self.emitted[r].append(label)
            out.append(label)
        return out

    def _prompt_carry(self, r: int) -> tuple[float | None, bool]:
        """The entity score carried into row ``r``'s generation from its prompt, and whether it ends in a piece."""
        if self.entity is None or self.entity_prompt is None:
            return None, False
        row = self.rows[r].tolist()
        P = int(self.entity_prompt.shape[1])
        scores = self.entity_prompt[r, P - len(row) :].double().cpu().tolist()  # left padding: real columns last
        carried, was_piece = None, False
        for tid, score in zip(row, scores):
            piece = self.name_piece(self.text_of(int(tid)))
            if piece and was_piece:
                carried = float(score)
            was_piece = piece
        return carried, was_piece


def _explained(model: Any, g: GenerationLabels, row: Tensor, probe: LoadedProbe, sae: Any, hook: str, top_k: int,
               text_of: Callable[[int], str]) -> GenerationLabels:  # fmt: skip
    """``g`` with an explanation on every unreliable token (one forward of the row, one backward per token)."""
    bad = [t.index for t in g.tokens if t.label == "unreliable"]
    if not bad:
        return g
    ids = row.tolist() + [t.token_id for t in g.tokens]
    found = explain_generation(model, ids, len(row), bad, probe, sae=sae, position_hook=hook, top_k=top_k,
                               text_of=text_of, checked=True)  # fmt: skip
    tokens = list(g.tokens)
    for i, ex in zip(bad, found):
        tokens[i] = replace(tokens[i], explanation=ex)
    return replace(g, tokens=tuple(tokens))


def _originals(prompts: PromptsArg, rows: list[Tensor]) -> list[Any]:
    if isinstance(prompts, Tensor):
        return [tuple(r.tolist()) for r in rows]
    return [p if isinstance(p, str) else tuple(int(t) for t in torch.as_tensor(p).tolist()) for p in prompts]


def _probe_info(p: LoadedProbe, i: int, token_idx: list[int], combine: str) -> dict[str, Any]:
    if p.position == "entity_last_token":
        role = "entity signal"
    elif i == token_idx[0]:
        role = "primary"
    elif i in token_idx and combine == "mean":
        role = "combined"
    else:
        role = "signal"
    return {"name": p.name, "path": str(p.path), "hook": p.hook, "position": p.position, "role": role,
            "target": p.card.get("target"), "label_source": p.card.get("label_source"), "threshold": p.threshold,
            "oof_auroc": (p.card.get("metrics") or {}).get("oof_auroc")}  # fmt: skip


def _rule_text(combine: str, primary: str, threshold: float) -> str:
    how = (f"the calibrated probability of the primary probe {primary!r}" if combine == "first"
           else "the mean calibrated probability of the token / before_token probes")  # fmt: skip
    return f"p_reliable = {how}; reliable when p_reliable >= {threshold:g}"
