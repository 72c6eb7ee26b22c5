"""The pseudo-label builders of `knowlens.probes.pseudo` (import them from there): every label comes from the model
itself or from construction, never from the world's ground truth. Each returns `PseudoLabels` (activation rows per
hook, 0/1 labels, groups) ready for `fit_probe`; `knowlens.probes.pseudo.fit_pseudo_probes` fits and saves probes.

* **Self-consistency** (`self_consistency_labels`, target ``reliable``). Per prompt the *greedy* answer (captured
  at ``hooks``) and ``k`` *sampled* answers (``temperature``, ``top_p``; seeds drawn from ``seed``), all by the
  KV-cached `knowlens.capture.generate`, each cut before its first EOS (samples need no hooks: only the greedy
  answer's activations become rows). A greedy token is a **content token** when it is not a special token (BOS,
  EOS, pad, ...), does not occur in its prompt (copied names are not claims) and occurs in at most ``max_df`` of
  the greedy answers of all the prompts (template words such as ``is``, ``the``, ``.`` occur in most;
  ``max_df=1`` keeps every token). A **span** is a maximal run of consecutive content tokens. Its **agreement**
  is the share of the ``k`` samples that contain the span's token ids as a contiguous run, anywhere (span-level,
  so a sample that words the answer differently or shifts it still agrees when it states the same content).
  Every token of a span gets the span's label: 1 (pseudo-reliable) if agreement >= ``threshold`` (default 0.75:
  6 of 8), 0 (pseudo-unreliable) if agreement < ``unreliable_below`` (default ``threshold``: every other span);
  spans in between are left out. Row: the activation at the position that *produced* the token (the one before
  it: position rule ``before_token``); group: the prompt (or ``groups[i]``).
* **Own vs injected** (`own_vs_injected_labels`, target ``own``). Per prompt its own greedy continuation and,
  injected, another prompt's own continuation (a derangement of the prompts drawn with ``seed``: no prompt keeps
  its own), both cut before EOS and to the context left after the prompt. Positions ``j = 0 .. m - 1`` with
  ``m = min(len(own), len(injected))`` are aligned. Both sequences (prompt + continuation) are run through
  `generate` (teacher forcing: the prompt pass computes every column), and the activation at each continuation
  token's *own* column (position rule ``token``: the model has just read it) is a row: own 1, injected 0, so each
  prompt gives ``m`` rows of each label; group: the prompt.
* **Entity contrast** (`entity_contrast_labels`, target ``known entity``). Self-generated names the model repeats
  facts about (known, 1) vs names fabricated from their pieces (unknown, 0) (`knowlens.saes.contrast`), each
  filled into every prompt template; the activation at the name's last token (``position="name"``: rule
  ``entity_last_token``) or at the prompt's last token (``"answer"``: rule ``prompt_last_token``), from the
  prompt pass of `generate`; group: the name. ``position="slot"``: the templates are first continued by the frames
  of the model's own greedy answers about the known names (`knowlens.saes.frames.answer_frames`: up to where they
  first depend on the entity, e.g. ``"... A : {name} was born in"``), and the activation at that slot, the
  position that predicts the answer's first value, is the row; the probe is then applied before every token
  (rule ``before_token``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from knowlens.capture import generate
from knowlens.capture.hooks import is_query_key_hook, validate_hook_names
from knowlens.capture.prompts import PromptsArg, eos_token_ids, tokenize_prompts
from knowlens.errors import KnowlensError
from knowlens.types import Bool, Float, Tensor

POSITION_RULES = {
    "token": "the token's own activation",
    "before_token": "the activation at the position before the token (the one that predicted it)",
    "entity_last_token": "the activation at an entity name's last token",
    "prompt_last_token": "the activation at the prompt's last token",
}


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class PseudoLabels:
    """Rows for a probe: ``activations[hook]`` ``(n, ...)`` (CPU), ``labels`` ``(n,)``, one group per row.

    ``meta`` holds per-row tensors (``prompt``, ``index``, ``token``; ``agreement`` for self-consistency);
    ``params`` the settings and counts; ``label_source`` the provenance line a probe card records.
    """

    source: str  # "self_consistency" | "own_vs_injected" | "entity_contrast"
    target: str  # what label 1 means
    position: str  # a key of POSITION_RULES
    label_source: str
    activations: dict[str, Float[Tensor, "n ..."]]
    labels: Bool[Tensor, " n"]
    groups: tuple[Hashable, ...]
    meta: dict[str, Tensor] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(self.activations)

    def counts(self) -> dict[str, int]:
        n1 = int(self.labels.sum())
        return {"n": len(self), "label_1": n1, "label_0": len(self) - n1, "groups": len(set(self.groups))}

    def rows(self, hook: str) -> tuple[Float[Tensor, "n d"], Bool[Tensor, " n"], tuple[Hashable, ...]]:
        """``(X, y, groups)`` for `fit_probe` (``X`` flattened to ``(n, d)``)."""
        if hook not in self.activations:
            raise KnowlensError(f"no pseudo-label rows for hook {hook!r}; built for {', '.join(self.activations)}")
        x = self.activations[hook]
        return x.reshape(x.shape[0], -1), self.labels, self.groups


# ------------------------------------------------------------------------------------------ self-consistency


def self_consistency_labels(
    model: Any,
    prompts: PromptsArg,
    *,
    hooks: Sequence[str],
    k: int = 8,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    threshold: float = 0.75,
    unreliable_below: float | None = None,
    max_df: float = 0.5,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    groups: Sequence[Hashable] | None = None,
) -> PseudoLabels:
    """Greedy answer tokens labelled by their span's agreement with ``k`` sampled answers (module docstring)."""
    _check_count("k", k)
    _check_count("batch_size", batch_size)
    if not temperature > 0:
        raise KnowlensError(f"temperature must be > 0 to sample answers, got {temperature!r}")
    if not 0 < threshold <= 1:
        raise KnowlensError(f"threshold must be in (0, 1], got {threshold!r}")
    low = threshold if unreliable_below is None else unreliable_below
    if not 0 < low <= threshold:
        raise KnowlensError(f"unreliable_below must be in (0, threshold={threshold}], got {unreliable_below!r}")
    if not 0 < max_df <= 1:
        raise KnowlensError(f"max_df must be in (0, 1], got {max_df!r}")
    names = _per_token_hooks(model, hooks)
    rows = tokenize_prompts(model, prompts)
    group_of = _groups(groups, len(rows))
    eos = eos_token_ids(model, None)
    greedy, acts = _answers(model, rows, hooks=names, max_new_tokens=max_new_tokens, batch_size=batch_size, eos=eos)
    rng = random.Random(seed)
    sample_rows = [r for r in rows for _ in range(k)]
    samples, _ = _answers(model, sample_rows, hooks=(), max_new_tokens=max_new_tokens, batch_size=batch_size,
                          eos=eos, temperature=temperature, top_p=top_p, rng=rng)  # fmt: skip
    special = special_token_ids(model) | set(eos)
    df = Counter(t for a in greedy for t in set(a))
    out_rows: list[tuple[int, int, int, float, bool]] = []  # prompt, index in answer, token id, agreement, label
    n_spans = {"reliable": 0, "unreliable": 0, "left_out": 0}
    for i, answer in enumerate(greedy):
        in_prompt = set(rows[i].tolist())
        content = [t not in special and t not in in_prompt and df[t] / len(rows) <= max_df for t in answer]
        mine = samples[i * k : (i + 1) * k]
        for start, stop in _runs(content):
            agreement = sum(_contains(s, answer[start:stop]) for s in mine) / k
            if agreement >= threshold:
                label, key = True, "reliable"
            elif agreement < low:
                label, key = False, "unreliable"
            else:
                n_spans["left_out"] += 1
                continue
            n_spans[key] += 1
            out_rows += [(i, j, answer[j], agreement, label) for j in range(start, stop)]
    activations = {h: _stack([acts[i][h][j] for i, j, *_ in out_rows], acts, h) for h in names}
    params = {"k": k, "temperature": float(temperature), "top_p": top_p, "seed": seed, "threshold": float(threshold),
              "unreliable_below": float(low), "max_df": float(max_df), "max_new_tokens": max_new_tokens,
              "n_prompts": len(rows), "n_spans": n_spans,
              "rule": "a span (maximal run of content tokens of the greedy answer) is reliable when >= threshold of "
              "the k sampled answers contain its token ids as a contiguous run, unreliable below unreliable_below"}  # fmt: skip
    source = (f"self-consistency k={k} (temperature {temperature:g}, span agreement >= {threshold:g} reliable, "
              f"< {low:g} unreliable, max_df {max_df:g}) on {len(rows)} prompts")  # fmt: skip
    return PseudoLabels(
        source="self_consistency", target="reliable", position="before_token", label_source=source,
        activations=activations, labels=torch.tensor([r[4] for r in out_rows], dtype=torch.bool),
        groups=tuple(group_of[r[0]] for r in out_rows), meta=_meta(out_rows), params=params,
    )  # fmt: skip


def span_agreement(answer: Sequence[int], samples: Sequence[Sequence[int]], start: int, stop: int) -> float:
    """The share of ``samples`` containing ``answer[start:stop]`` as a contiguous run (the self-consistency rule)."""
    if not samples:
        raise KnowlensError("span agreement needs at least one sample")
    return sum(_contains(s, list(answer[start:stop])) for s in samples) / len(samples)


def _contains(seq: Sequence[int], run: Sequence[int]) -> bool:
    n = len(run)
    return any(list(seq[i : i + n]) == list(run) for i in range(len(seq) - n + 1))


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each maximal run of True."""
    out, start = [], None
    for j, f in enumerate([*flags, False]):
        if f and start is None:
            start = j
        elif not f and start is not None:
            out.append((start, j))
            start = None
    return out


# ------------------------------------------------------------------------------------------- own vs injected


def own_vs_injected_labels(
    model: Any,
    prompts: PromptsArg,
    *,
    hooks: Sequence[str],
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    groups: Sequence[Hashable] | None = None,
) -> PseudoLabels:
    """The model's own continuation (1) vs another prompt's swapped in (0), at each aligned token (module docstring)."""
    _check_count("batch_size", batch_size)
    names = _per_token_hooks(model, hooks)
    rows = tokenize_prompts(model, prompts)
    if len(rows) < 2:
        raise KnowlensError("own vs injected swaps continuations between prompts: give at least two prompts")
    group_of = _groups(groups, len(rows))
    n_ctx = int(model.cfg.n_ctx)
    for i, row in enumerate(rows):
        if row.numel() + 1 >= n_ctx:
            raise KnowlensError(f"prompt {i} has {row.numel()} tokens: no room for a continuation in n_ctx {n_ctx}")
    eos = eos_token_ids(model, None)
    own, _ = _answers(model, rows, hooks=(), max_new_tokens=max_new_tokens, batch_size=batch_size, eos=eos)
    perm = derangement(len(rows), seed)
    room = [n_ctx - 1 - r.numel() for r in rows]  # teacher forcing runs prompt + continuation + 1 step
    own = [a[:m] for a, m in zip(own, room)]
    injected = [own[p][:m] for p, m in zip(perm, room)]
    aligned = [min(len(a), len(b)) for a, b in zip(own, injected)]
    seqs = [torch.cat([r, torch.tensor(c[:m], dtype=torch.long)]) for r, c, m in zip(rows, own, aligned)]
    seqs += [torch.cat([r, torch.tensor(c[:m], dtype=torch.long)]) for r, c, m in zip(rows, injected, aligned)]
    forced = _forced_activations(model, seqs, names, batch_size)
    out_rows: list[tuple[int, int, int, float, bool]] = []
    picks: list[tuple[int, int]] = []  # (sequence, column)
    for is_own, offset in ((True, 0), (False, len(rows))):
        for i, m in enumerate(aligned):
            P = rows[i].numel()
            cont = own[i] if is_own else injected[i]
            for j in range(m):
                out_rows.append((i, j, cont[j], float("nan"), is_own))
                picks.append((offset + i, P + j))
    activations = {h: _stack([forced[s][h][c] for s, c in picks], forced, h) for h in names}
    params = {"max_new_tokens": max_new_tokens, "seed": seed, "derangement": perm, "aligned": aligned,
              "n_prompts": len(rows), "eos_token_ids": list(eos)}  # fmt: skip
    source = (f"own vs injected: own greedy continuation (1) vs another prompt's (0, derangement seed {seed}), "
              f"aligned positions, on {len(rows)} prompts")  # fmt: skip
    return PseudoLabels(
        source="own_vs_injected", target="own", position="token", label_source=source, activations=activations,
        labels=torch.tensor([r[4] for r in out_rows], dtype=torch.bool), groups=tuple(group_of[r[0]] for r in out_rows),
        meta={k: v for k, v in _meta(out_rows).items() if k != "agreement"}, params=params,
    )  # fmt: skip


def derangement(n: int, seed: int) -> list[int]:
    """A uniformly drawn permutation of ``range(n)`` with no fixed point (rejection sampling), ``n >= 2``."""
    if n < 2:
        raise KnowlensError(f"a derangement needs at least 2 items, got {n}")
    rng = random.Random(f"knowlens.probes.pseudo/{seed}")
    perm = list(range(n))
    while True:
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


# --------------------------------------------------------------------------------------------- entity contrast


def entity_contrast_labels(
    model: Any,
    *,
    hooks: Sequence[str],
    contrast: Any = None,
    templates: Sequence[str] | None = None,
    position: str = "name",
    seed: int = 0,
    exclude_texts: Sequence[str] | None = None,
    batch_size: int = 64,
    **contrast_options: Any,
) -> PseudoLabels:
    """Known (self-generated) vs fabricated entity names at the name's last token or the prompt's last token.

    ``contrast``: a `knowlens.saes.Contrast`, or None to build one with `exemplar_free_contrast(model, seed=seed,
    exclude_texts=exclude_texts, **contrast_options)`. ``templates``: prompt templates with ``{name}`` (default
    `knowlens.saes.entity.DEFAULT_TEMPLATES`; on an organism, `organism_templates(world)`).
    """
    from knowlens.saes.contrast import exemplar_free_contrast
    from knowlens.saes.entity import DEFAULT_TEMPLATES, entity_prompts

    if position not in ("name", "answer", "slot"):
        raise KnowlensError(f"position must be 'name', 'answer' or 'slot', got {position!r}")
    _check_count("batch_size", batch_size)
    names = _per_token_hooks(model, hooks)
    templates = tuple(DEFAULT_TEMPLATES if templates is None else templates)
    if contrast is None:
        contrast = exemplar_free_contrast(model, seed=seed, exclude_texts=exclude_texts, **contrast_options)
    known, unknown = tuple(contrast.known.names), tuple(contrast.unknown.names)
    if len(known) < 2 or len(unknown) < 2:
        raise KnowlensError(f"entity contrast needs 2 or more names a side, got {len(known)} known, {len(unknown)} unknown")
    frames = None
    if position == "slot":
        from knowlens.saes.frames import answer_frames

        frames = answer_frames(model, known, templates, batch_size=batch_size, unknown_names=unknown)
        if not frames.slot_templates:
            raise KnowlensError(f"entity contrast at the slot: the model's answers about the {len(known)} known names "
                                "share no frame that then depends on the entity")  # fmt: skip
        templates = frames.slot_templates
    entities = [*known, *unknown]
    token_rows, spans = entity_prompts(model, entities, templates, repeated=True)
    forced = _forced_activations(model, [torch.tensor(r, dtype=torch.long) for r in token_rows], names, batch_size)
    cols = [last if position == "name" else len(r) - 1 for r, (_first, last) in zip(token_rows, spans)]
    activations = {h: _stack([forced[s][h][c] for s, c in enumerate(cols)], forced, h) for h in names}
    n_t = len(templates)
    labels = torch.tensor([e < len(known) for e in range(len(entities)) for _ in range(n_t)], dtype=torch.bool)
    meta = {"prompt": torch.arange(len(token_rows)), "index": torch.tensor(cols),
            "token": torch.tensor([r[c] for r, c in zip(token_rows, cols)])}  # fmt: skip
    rule = {"name": "entity_last_token", "answer": "prompt_last_token", "slot": "before_token"}[position]
    params = {"templates": list(templates), "position": position, "seed": seed, "n_known": len(known),
              "n_unknown": len(unknown), "contrast": contrast.to_dict(),
              "answer_frames": frames.to_dict() if frames is not None else None}  # fmt: skip
    source = (f"entity contrast: {len(known)} {contrast.known.method} names (known, 1) vs {len(unknown)} "
              f"{contrast.unknown.method} names (0), {n_t} templates"
              + (" at the answer slot (the position before the first value of the model's own answer frames; "
                 "applied before every token)" if position == "slot" else ""))  # fmt: skip
    return PseudoLabels(
        source="entity_contrast", target="known entity", position=rule, label_source=source, activations=activations,
        labels=labels, groups=tuple(e for e in entities for _ in range(n_t)), meta=meta, params=params,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- helpers


def special_token_ids(model: Any) -> set[int]:
    """The tokenizer's special ids (BOS, EOS, pad, unk ...); empty without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    ids = set(getattr(tok, "all_special_ids", None) or []) if tok is not None else set()
    return {int(i) for i in ids}


def _answers(
    model: Any, rows: list[Tensor], *, hooks: Sequence[str], max_new_tokens: int, batch_size: int,
    eos: tuple[int, ...], temperature: float = 0.0, top_p: float | None = None, rng: random.Random | None = None,
) -> tuple[list[list[int]], list[dict[str, Tensor]]]:  # fmt: skip
    """Each row's generated ids cut before the first EOS and, with ``hooks``, per hook the activations at the
    columns *before* each kept token ``(len, ...)`` (CPU): row j predicted token j."""
    n_ctx = int(model.cfg.n_ctx)
    answers: list[list[int]] = []
    acts: list[dict[str, Tensor]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        limit = min(max_new_tokens, n_ctx - max(int(r.numel()) for r in batch))
        if limit < 1:
            raise KnowlensError(f"a prompt of {max(int(r.numel()) for r in batch)} tokens leaves no room in n_ctx {n_ctx}")
        rec = generate(model, batch, hooks=tuple(hooks), max_new_tokens=limit, temperature=temperature, top_p=top_p,
                       seed=None if rng is None else rng.randrange(2**31))  # fmt: skip
        for r in range(rec.batch_size):
            cols = rec.generated_mask[r].nonzero().flatten()
            ids = rec.tokens[r, cols].tolist()
            cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            answers.append(ids[:cut])
            if hooks:
                before = cols[:cut] - 1
                acts.append({h: rec.activations[h][r, before].cpu() for h in hooks})
    return answers, acts


def _forced_activations(model: Any, seqs: list[Tensor], hooks: Sequence[str], batch_size: int) -> list[dict[str, Tensor]]:
    """Per sequence, per hook its activations at every real column ``(len, ...)`` (CPU), from the prompt pass of
    `generate` (one extra step is generated and ignored)."""
    out: list[dict[str, Tensor]] = []
    for start in range(0, len(seqs), batch_size):
        rec = generate(model, seqs[start : start + batch_size], hooks=tuple(hooks), max_new_tokens=1, stop_at_eos=False)
        for r in range(rec.batch_size):
            lo = rec.real_range(r)[0]
            out.append({h: rec.activations[h][r, lo : rec.prompt_len].cpu() for h in hooks})
    return out


def _stack(parts: list[Tensor], source: Sequence[dict[str, Tensor]], hook: str) -> Tensor:
    if parts:
        return torch.stack(parts)
    shape = next((tuple(s[hook].shape[1:]) for s in source if hook in s), ())
    return torch.zeros((0, *shape))


def _meta(rows: list[tuple[int, int, int, float, bool]]) -> dict[str, Tensor]:
    return {"prompt": torch.tensor([r[0] for r in rows], dtype=torch.long),
            "index": torch.tensor([r[1] for r in rows], dtype=torch.long),
            "token": torch.tensor([r[2] for r in rows], dtype=torch.long),
            "agreement": torch.tensor([r[3] for r in rows], dtype=torch.float64)}  # fmt: skip


def _per_token_hooks(model: Any, hooks: Sequence[str]) -> tuple[str, ...]:
    names = validate_hook_names(model, hooks)
    if not names:
        raise KnowlensError("no hooks given: name the hook points to read, e.g. blocks.3.hook_resid_post")
    bad = [h for h in names if is_query_key_hook(h)]
    if bad:
        raise KnowlensError(f"hook {bad[0]} is an attention pattern (query x key), not a per-token activation")
    return names


def _groups(groups: Sequence[Hashable] | None, n: int) -> list[Hashable]:
    if groups is None:
        return list(range(n))
    if isinstance(groups, str) or len(groups) != n:
        raise KnowlensError(f"groups must give one group per prompt ({n}), got {len(groups)}")
    return list(groups)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KnowlensError(f"{name} must be an integer >= 1, got {value!r}")


__all__ = [
    "POSITION_RULES",
    "PseudoLabels",
    "self_consistency_labels",
    "span_agreement",
    "own_vs_injected_labels",
    "derangement",
    "entity_contrast_labels",
    "special_token_ids",
]

