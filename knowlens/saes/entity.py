"""Entity-known latents: `locate_entity_known(model, sae, known, unknown) -> {(position, direction): FeatureSet}`.

Definitions (after Ferrando et al. 2025; the contrast sets come from `knowlens.saes.contrast`, without exemplars):

* **Prompts.** Every entity name fills every template (``{name}`` exactly once); each prompt is tokenized with
  the model's tokenizer, BOS prepended. The *name span* is the tokens of ``prefix + name`` (``prefix``: the
  template before ``{name}``) that are not shared with the tokens of ``prefix`` alone; the prompt's tokens must
  begin with those of ``prefix + name`` (else the name merges with what follows it: refused).
* **Positions.** ``name``: the entity's last name token; ``answer``: the prompt's last token (where the model
  starts to answer). One forward pass per prompt gives both. ``slot``: the last token of a *slot template*, a
  template followed by a frame of the model's own answers (`knowlens.saes.frames`: e.g. ``"Q : Tell me about
  {name} . A : {name} is a city in"``), where its answers first depend on the entity; the frames are found from
  the known side's answers (``slot_templates=`` gives them instead: the templates, or an `AnswerFrames`), and each entity is encoded on every slot
  template.
* **Per entity.** ``a_e[j]``: latent ``j``'s activation averaged over the templates; ``on_e[j]``: the share of
  templates on which it is active (> 0). Entities, not prompts, are the units of every statistic below.
* **Split.** Within each side (and type) the entities are shuffled (``seed``) and ``floor(holdout * n)`` of the
  ``n`` held out (at least one left to pick with); the rest pick the latents. ``holdout=0``: all pick,
  no held-out AUROC (NaN).
* **Statistics** on the picking entities: ``f_known[j]`` = mean of ``on_e[j]`` over known entities (the share of
  their prompts, as every entity has as many), ``f_unknown`` likewise; ``s_known = f_known - f_unknown``,
  ``s_unknown = f_unknown - f_known``. When every entity on both sides has a type, both are computed within each
  type present on both sides and the *minimum over types* is taken (a latent must separate in every type).
  ``mean_diff`` = mean ``a_e`` known - unknown and Welch's ``welch_t`` of ``a_e`` (known vs unknown), pooled.
* **Frequency filter.** A latent's ``generic_frequency`` is the share of generic tokens on which it is active:
  ``generic_tokens`` (positions >= 1 where ``generic_mask``) or by default every prompt token except BOS, the
  name span and the last token (the measured positions: in name-heavy prompts a latent marking known names is
  active on many name tokens, which says nothing about it being generic). Latents with ``generic_frequency >
  max_frequency`` are dropped.
* **Ranking.** Per direction the score is ``s_known`` / ``s_unknown`` (``rank_by="separation"``), ``±welch_t``,
  ``±mean_diff`` or ``auroc_known`` / ``auroc_unknown`` (``rank_by="auroc"``: the Mann-Whitney AUROC of ``a_e``,
  known vs unknown, for the direction's side, on the picking entities, the minimum over types as for the
  separation; the default); the ``top`` kept latents by score (NaN never ranked; ties: by ``±welch_t``, then index).
  Each top latent's **held-out AUROC**: ``a_e`` of the held-out entities as the score for the direction's side
  (Mann-Whitney). Why AUROC by default: Ferrando et al.'s separation score counts how often a latent fires, which
  suits JumpReLU SAEs whose latents are mostly silent; in the organisms' TopK SAEs the latent that tracks
  familiarity at the slot fires for nearly every entity and separates them by how strongly (second world, k 16:
  active for 87% of the known and 100% of the unknown names, separation 0.13, ranked ninth; AUROC 1.00 on the
  held-out half, 0.989 on every unused true entity). On six SAEs at ``blocks.3`` of three organisms, same contrast
  sets: the AUROC ranking's top latent 0.61-0.996 on every unused true entity, the frequency difference's
  0.46-0.996 (issue 8's closing note).

`compare_with_truth` (organism): the same locator on a world's true known and unknown entities, and both sets of
top latents scored on the true held-out entities that the exemplar-free sets did not use.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from knowlens.errors import KnowlensError
from knowlens.fingerprint import model_identity
from knowlens.saes.activations import (
    active_counts,
    architecture,
    checked_tokens,
    default_label,
    encode_latents,
    flatten_heads,
)
from knowlens.saes.contrast import Contrast, EntitySet, _check_template
from knowlens.saes.features import FeatureSet
from knowlens.saes.frames import AnswerFrames
from knowlens.saes.stats import auroc, auroc_interval, column_aurocs, welch_t
from knowlens.types import Bool, Float, Int, Tensor

POSITIONS = ("name", "answer", "slot")
DIRECTIONS = ("known", "unknown")
RANK_BY = ("separation", "welch_t", "mean_diff", "auroc")
DEFAULT_TEMPLATES = ("{name}", "Q: Who is {name}? A:")
POSITION_RULES = {"name": "the entity's last name token", "answer": "the prompt's last token",
                  "slot": "the last token of the prompt followed by a frame of the model's own answers, where they "
                          "first depend on the entity, past branches its answers about the unknown names follow too "
                          "(knowlens.saes.frames)"}  # fmt: skip
EntitiesArg = EntitySet | Sequence[str] | Sequence[tuple[str, str]]


@dataclass(frozen=True, eq=False)
class _Encoded:
    acts: dict[str, Float[Tensor, "entity template d_sae"]]  # per position, float32 on the CPU
    generic_counts: Int[Tensor, " d_sae"]
    n_generic: int


def organism_templates(world: Any) -> tuple[str, ...]:
    """The world's biography questions as Q/A prompts (``Q : Tell me about {name} . A :`` ...): type-free."""
    from knowlens.organism.corpus import qa_prompt

    return tuple(qa_prompt(q) for q in world.spec.biography_questions)


@torch.no_grad()
def locate_entity_known(
    model: Any,
    sae: Any,
    known: EntitiesArg,
    unknown: EntitiesArg,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    positions: Sequence[str] = ("name", "answer"),
    max_frequency: float | int = 0.02,
    generic_tokens: Int[Tensor, "gbatch gpos"] | None = None,
    generic_mask: Bool[Tensor, "gbatch gpos"] | None = None,
    top: int = 10,
    holdout: float | int = 0.5,
    rank_by: str = "auroc",
    seed: int = 0,
    batch_size: int = 64,
    sae_label: str | None = None,
    slot_templates: Sequence[str] | AnswerFrames | None = None,
) -> dict[tuple[str, str], FeatureSet]:
    """Latents of ``sae`` that fire for known (or for unknown) entities, one `FeatureSet` per (position,
    direction) (module docstring: exact definitions). ``known``/``unknown``: `EntitySet` s, names, or (name,
    type) pairs; 2 or more each. Leaves no hook on the model, also when it raises."""
    from knowlens.saes.load import check_sae

    if not (isinstance(max_frequency, (int, float)) and 0 <= max_frequency <= 1):
        raise KnowlensError(f"max_frequency must be in [0, 1], got {max_frequency!r}")
    if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise KnowlensError(f"holdout must be in [0, 1), got {holdout!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise KnowlensError(f"top must be an integer >= 0, got {top!r}")
    if rank_by not in RANK_BY:
        raise KnowlensError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise KnowlensError(f"positions must be among {', '.join(POSITIONS)}, got {list(positions)!r}")
    contrast = Contrast(_as_set(known, "known"), _as_set(unknown, "unknown"))
    for side in (contrast.known, contrast.unknown):
        if len(side.names) < 2:
            raise KnowlensError(f"the {side.method} set has {len(side.names)} entities; 2 or more are needed")
    label = sae_label if sae_label is not None else default_label(sae)
    check_sae(sae, model, label=label)
    hook = sae.cfg.metadata.hook_name
    if sae.cfg.metadata.get("hook_head_index") is not None:
        raise KnowlensError(f"SAE {label} reads one attention head at {hook}; locate_entity_known reads whole hooks only")

    names = [*contrast.known.names, *contrast.unknown.names]
    is_known = torch.tensor([True] * len(contrast.known.names) + [False] * len(contrast.unknown.names))
    typed = bool(contrast.known.types) and bool(contrast.unknown.types)
    types: list[str | None] = [*contrast.known.types, *contrast.unknown.types] if typed else [None] * len(names)
    frames: AnswerFrames | None = None
    slots: Sequence[str] | None = None
    if isinstance(slot_templates, AnswerFrames):
        frames, slots = slot_templates, slot_templates.slot_templates
    else:
        slots = slot_templates
    if "slot" in positions and slots is None:
        from knowlens.saes.frames import answer_frames

        frames = answer_frames(model, contrast.known.names, templates, batch_size=batch_size,
                               unknown_names=contrast.unknown.names)
        slots = frames.slot_templates
    if "slot" in positions:
        if not slots:
            raise KnowlensError(f"no answer frame found: the model's answers about the {len(contrast.known.names)} known "
                                "entities share no prefix that then depends on the entity; leave out the slot position")  # fmt: skip
    enc = _encode_entities(model, sae, names, templates, batch_size=batch_size,
                           slot_templates=slots if "slot" in positions else None)  # fmt: skip
    if generic_tokens is not None:
        device = next(iter(model.parameters())).device
        gtok, gvalid = checked_tokens(generic_tokens, generic_mask, device, what="generic_tokens")
        counts, n_generic = active_counts(model, sae, hook, gtok, gvalid, batch_size)
        generic = f"generic_tokens ({n_generic} tokens)"
    else:
        counts, n_generic = enc.generic_counts, enc.n_generic
        generic = f"the prompts' tokens but BOS, the name span and the last token ({n_generic} tokens)"
    if n_generic == 0:
        raise KnowlensError("the generic token sample is empty: pass generic_tokens= or templates with other words")
    generic_frequency = counts.double().cpu() / n_generic
    held = _split(is_known, types, holdout, seed)
    pick = ~held
    compared = _types_compared(is_known[pick], [t for t, p in zip(types, pick.tolist()) if p])
    decoder = sae.W_dec.detach().float().cpu()
    out: dict[tuple[str, str], FeatureSet] = {}
    for pos in positions:
        a = enc.acts[pos].double().mean(1)  # (E, d_sae)
        on = (enc.acts[pos] > 0).double().mean(1)
        stats = _latent_stats(a[pick], on[pick], is_known[pick], [t for t, p in zip(types, pick.tolist()) if p], compared)
        stats["generic_frequency"] = generic_frequency
        for direction in DIRECTIONS:
            sign = 1.0 if direction == "known" else -1.0
            score = {"separation": stats[f"s_{direction}"], "welch_t": sign * stats["welch_t"],
                     "mean_diff": sign * stats["mean_diff"], "auroc": stats[f"auroc_{direction}"]}[rank_by]  # fmt: skip
            latents = _rank(score, sign * stats["welch_t"], generic_frequency <= max_frequency, top)
            target = is_known[held] if direction == "known" else ~is_known[held]
            aucs = [auroc(a[held, j], target) if bool(held.any()) else math.nan for j in latents.tolist()]
            out[pos, direction] = FeatureSet(
                model=model_identity(model), hook=hook, sae_label=label, name=f"entity-{direction}", position=pos,
                latents=latents, scores=score[latents], decoder=decoder[latents],
                heldout_auroc=torch.tensor(aucs, dtype=torch.float64), per_latent=dict(stats),
                contrast=contrast.to_dict(),
                params={"templates": list(templates), "position_rule": POSITION_RULES[pos], "direction": direction,
                        "max_frequency": float(max_frequency), "top": top, "holdout": float(holdout),
                        "rank_by": rank_by, "seed": seed, "generic": generic, "n_generic_tokens": n_generic,
                        "active": "activation > 0", "types_compared": compared,
                        "n_kept_latents": int((generic_frequency <= max_frequency).sum()),
                        "n_pick": {"known": int((pick & is_known).sum()), "unknown": int((pick & ~is_known).sum())},
                        "heldout": {s: [n for n, h, k in zip(names, held.tolist(), is_known.tolist())
                                        if h and k == (s == "known")] for s in DIRECTIONS},
                        "sae_architecture": architecture(sae), "d_sae": int(sae.cfg.d_sae),
                        "slot_templates": list(slots) if pos == "slot" and slots else None,
                        "answer_frames": frames.to_dict() if pos == "slot" and frames is not None else None},
            )  # fmt: skip
    return out


@torch.no_grad()
def entity_activations(
    model: Any,
    sae: Any,
    names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    latents: Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
    slot_templates: Sequence[str] | None = None,
) -> dict[str, Float[Tensor, "entity template n"]]:
    """Per position (``name``, ``answer``; ``slot`` with ``slot_templates``, one per slot template) the
    activations of ``latents`` (default all) for every name and template, float32 on the CPU. Leaves no hook on
    the model."""
    enc = _encode_entities(model, sae, list(names), templates, batch_size=batch_size, slot_templates=slot_templates)
    if latents is None:
        return enc.acts
    idx = torch.as_tensor(latents, dtype=torch.long)
    return {p: a[..., idx] for p, a in enc.acts.items()}


def entity_residuals(
    model: Any,
    hook: str,
    names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    slot_templates: Sequence[str] | None = None,
) -> dict[str, Float[Tensor, "entity template d_in"]]:
    """As `entity_activations`, the hook's activation itself (heads flattened) instead of an SAE's latents: the
    input of a linear probe at the same positions, to compare single latents with. Leaves no hook on the model."""
    width: dict[str, int] = {}

    def shape(act: Tensor, hook: Any) -> None:
        width["d"] = int(flatten_heads(act).shape[-1])

    from knowlens.capture.hooks import stop_layer_for

    with model.hooks(fwd_hooks=[(hook, shape)]):
        model(model.to_tokens("x", prepend_bos=True), stop_at_layer=stop_layer_for(model, [hook]))
    identity = _Activation(hook, width["d"], next(iter(model.parameters())).dtype)
    return _encode_entities(model, identity, list(names), templates, batch_size=batch_size,
                            slot_templates=slot_templates).acts  # fmt: skip


class _Activation:
    """Stands in for an SAE whose latents are the hook's activation (`entity_residuals`)."""

    def __init__(self, hook: str, d: int, dtype: torch.dtype):
        self.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_name=hook), d_sae=d, reshape_activations="none")
        self.W_dec = torch.empty(0, dtype=dtype)

    def encode(self, act: Tensor) -> Tensor:
        return act


def entity_prompts(
    model: Any, names: Sequence[str], templates: Sequence[str], *, repeated: bool = False
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Token ids of every (name, template) prompt, name-major, and each one's name span ``(first, last)`` (of
    the first ``{name}``; ``repeated``: templates may hold it more than once, as slot templates do)."""
    if not templates:
        raise KnowlensError("no prompt templates given")
    for t in templates:
        _check_template(t, repeated=repeated)
    if getattr(model, "tokenizer", None) is None:
        raise KnowlensError("locating entity latents needs a model with a tokenizer")

    def ids(text: str) -> list[int]:
        return model.to_tokens(text, prepend_bos=True, move_to_device=False, truncate=False)[0].tolist()

    prefixes = {t: ids(t[: t.index("{name}")]) for t in templates}
    rows, spans = [], []
    for name in names:
        for t in templates:
            pre, upto, full = prefixes[t], ids(t[: t.index("{name}")] + name), ids(t.format(name=name))
            start = next((i for i, (x, y) in enumerate(zip(pre, upto)) if x != y), min(len(pre), len(upto)))
            if full[: len(upto)] != upto or start >= len(upto):
                raise KnowlensError(f"template {t!r}: the tokens of {name!r} cannot be told apart from the text around it")
            if len(full) > int(model.cfg.n_ctx):
                raise KnowlensError(f"the prompt {t.format(name=name)!r} has {len(full)} tokens, over the model's n_ctx")
            rows.append(full)
            spans.append((start, len(upto) - 1))
    return rows, spans


def _encode_entities(
    model: Any, sae: Any, names: list[str], templates: Sequence[str], *, batch_size: int,
    slot_templates: Sequence[str] | None = None,
) -> _Encoded:
    from knowlens.capture.hooks import stop_layer_for
    from knowlens.capture.prompts import pad_token_id

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KnowlensError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    rows, spans = entity_prompts(model, names, templates)
    hook = sae.cfg.metadata.hook_name
    device = next(iter(model.parameters())).device
    d_sae = int(sae.cfg.d_sae)
    seen: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen["act"] = act.detach()

    acts = {p: torch.zeros(len(rows), d_sae) for p in ("name", "answer")}
    counts = torch.zeros(d_sae, dtype=torch.long)
    n_generic = 0
    pad = pad_token_id(model)
    with model.hooks(fwd_hooks=[(hook, capture)]):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(r) for r in chunk)
            toks = torch.full((len(chunk), width), pad, dtype=torch.long)
            generic = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, r in enumerate(chunk):  # right padding: causal attention leaves the real tokens exact
                toks[i, : len(r)] = torch.tensor(r)
                first, last = spans[start + i]
                generic[i, 1 : len(r) - 1] = True
                generic[i, first : last + 1] = False
            seen.clear()
            model(toks.to(device), stop_at_layer=stop_layer_for(model, [hook]))
            feats = encode_latents(sae, seen["act"]).float().cpu()  # (b, width, d_sae)
            b = torch.arange(len(chunk))
            ends = torch.tensor([spans[start + i][1] for i in range(len(chunk))])
            lasts = torch.tensor([len(r) - 1 for r in chunk])
            acts["name"][start : start + len(chunk)] = feats[b, ends]
            acts["answer"][start : start + len(chunk)] = feats[b, lasts]
            counts += (feats[generic] > 0).sum(0)
            n_generic += int(generic.sum())
    n_t = len(templates)
    out = {p: a.reshape(len(names), n_t, d_sae) for p, a in acts.items() if p != "slot"}
    if slot_templates:
        out["slot"] = _encode_last(model, sae, names, slot_templates, batch_size=batch_size)
    return _Encoded(out, counts, n_generic)


def _encode_last(model: Any, sae: Any, names: list[str], templates: Sequence[str], *, batch_size: int) -> Tensor:
    """SAE latents at the last token of every (name, template) prompt: (entity, template, d_sae)."""
    from knowlens.capture.hooks import stop_layer_for
    from knowlens.capture.prompts import pad_token_id

    rows, _spans = entity_prompts(model, names, templates, repeated=True)
    hook = sae.cfg.metadata.hook_name
    device = next(iter(model.parameters())).device
    seen: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen["act"] = act.detach()

    out = torch.zeros(len(rows), int(sae.cfg.d_sae))
    pad = pad_token_id(model)
    with model.hooks(fwd_hooks=[(hook, capture)]):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            toks = torch.full((len(chunk), max(len(r) for r in chunk)), pad, dtype=torch.long)
            for i, r in enumerate(chunk):  # right padding: causal attention leaves the real tokens exact
                toks[i, : len(r)] = torch.tensor(r)
            seen.clear()
            model(toks.to(device), stop_at_layer=stop_layer_for(model, [hook]))
            lasts = torch.tensor([len(r) - 1 for r in chunk], device=seen["act"].device)
            last_acts = seen["act"][torch.arange(len(chunk), device=lasts.device), lasts]
            out[start : start + len(chunk)] = encode_latents(sae, last_acts[:, None])[:, 0].float().cpu()
    return out.reshape(len(names), len(templates), -1)


def _as_set(entities: EntitiesArg, side: str) -> EntitySet:
    if isinstance(entities, EntitySet):
        return entities
    if isinstance(entities, str):
        raise KnowlensError(f"the {side} entities must be a list of names, not one string")
    items = list(entities)
    if items and all(isinstance(e, tuple) and len(e) == 2 for e in items):
        return EntitySet(names=tuple(e[0] for e in items), types=tuple(e[1] for e in items), method=f"given ({side})")
    return EntitySet(names=tuple(items), method=f"given ({side})")  # type: ignore[arg-type]


def _split(is_known: Tensor, types: list[str | None], holdout: float | int, seed: int) -> Tensor:
    """Held-out mask: within each (side, type) stratum a ``holdout`` share, leaving at least one to pick with."""
    rng = random.Random(seed)
    held = torch.zeros(len(types), dtype=torch.bool)
    strata: dict[tuple[bool, str | None], list[int]] = {}
    for i, (k, t) in enumerate(zip(is_known.tolist(), types)):
        strata.setdefault((k, t), []).append(i)
    for key in sorted(strata, key=lambda x: (x[0], str(x[1]))):
        idx = strata[key]
        rng.shuffle(idx)
        n = min(math.floor(holdout * len(idx)), len(idx) - 1)
        held[idx[:n]] = True
    if holdout > 0:
        for k, side in ((True, "known"), (False, "unknown")):
            if not bool((held & (is_known == k)).any()):
                raise KnowlensError(f"too few {side} entities to hold some out (holdout={holdout}); add entities or "
                                    "pass holdout=0")  # fmt: skip
    return held


def _types_compared(is_known: Tensor, types: list[str | None]) -> list[str | None]:
    k = {t for t, y in zip(types, is_known.tolist()) if y}
    u = {t for t, y in zip(types, is_known.tolist()) if not y}
    both = sorted(k & u, key=str)
    if not both:
        raise KnowlensError(f"no entity type has both known and unknown entities (known: {sorted(map(str, k))}, "
                            f"unknown: {sorted(map(str, u))})")  # fmt: skip
    return both


def _latent_stats(a: Tensor, on: Tensor, is_known: Tensor, types: list[str | None], compared: list[str | None]) -> dict[str, Tensor]:
    """Per-latent statistics on the picking entities (module docstring); float64, CPU."""
    s_known = torch.full((a.shape[1],), math.inf, dtype=torch.float64)
    s_unknown, auc_known, auc_unknown = s_known.clone(), s_known.clone(), s_known.clone()
    for t in compared:
        in_t = torch.tensor([x == t for x in types])
        diff = on[in_t & is_known].mean(0) - on[in_t & ~is_known].mean(0)
        s_known, s_unknown = torch.minimum(s_known, diff), torch.minimum(s_unknown, -diff)
        auc = column_aurocs(a[in_t], is_known[in_t])
        auc_known, auc_unknown = torch.minimum(auc_known, auc), torch.minimum(auc_unknown, 1 - auc)
    return {"f_known": on[is_known].mean(0), "f_unknown": on[~is_known].mean(0), "s_known": s_known,
            "s_unknown": s_unknown, "mean_diff": a[is_known].mean(0) - a[~is_known].mean(0),
            "welch_t": welch_t(a[is_known], a[~is_known]), "auroc_known": auc_known,
            "auroc_unknown": auc_unknown}  # fmt: skip


def _rank(score: Tensor, second: Tensor, kept: Tensor, top: int) -> Tensor:
    """Indices of the ``top`` kept latents with a score (not NaN; +inf first): by score, then ``second`` (NaN
    last), then index."""
    ok = (kept & ~torch.isnan(score)).nonzero().flatten().tolist()
    tie = torch.nan_to_num(second, nan=-math.inf).tolist()
    s = score.tolist()
    ok.sort(key=lambda j: (-s[j], -tie[j], j))
    return torch.tensor(ok[:top], dtype=torch.long)


@dataclass(frozen=True, eq=False)
class TruthComparison:
    """Exemplar-free latents against those found from a world's true splits; ``figures`` is JSON-safe."""

    figures: dict[str, Any]
    truth: dict[tuple[str, str], FeatureSet]


def compare_with_truth(
    model: Any, sae: Any, world: Any, found: dict[tuple[str, str], FeatureSet], *, batch_size: int = 64
) -> TruthComparison:
    """Run `locate_entity_known` with ``found``'s parameters on ``world``'s true known and unknown entities
    (typed); per (position, direction) report the overlap of the two top lists and each top latent's AUROC on the
    truth's held-out entities that ``found``'s contrast sets did not use (both lists scored on the same ones); and
    each exemplar-free top latent's AUROC, with a bootstrap 95% interval, on every true known and unknown entity
    the contrast sets did not use (``free_top_auroc_all``, ``n_eval_all``)."""
    first = next(iter(found.values()))
    p = first.params
    slots = slot_templates_of(found)
    sides = [world.of(split=s) for s in DIRECTIONS]
    truth_sets = [EntitySet(names=tuple(e.name for e in es), types=tuple(e.type for e in es), method="world splits",
                            params={"split": s}) for es, s in zip(sides, DIRECTIONS)]  # fmt: skip
    truth = locate_entity_known(
        model, sae, *truth_sets, templates=p["templates"], positions=sorted({k[0] for k in found}, key=POSITIONS.index),
        max_frequency=p["max_frequency"], top=p["top"], holdout=max(p["holdout"], 0.5), rank_by=p["rank_by"],
        seed=p["seed"], batch_size=batch_size, sae_label=first.sae_label, slot_templates=slots,
    )  # fmt: skip
    used = {n for side in DIRECTIONS for n in first.contrast[side]["names"]}
    held = next(iter(truth.values())).params["heldout"]
    evals = {s: [n for n in held[s] if n not in used] for s in DIRECTIONS}
    names = evals["known"] + evals["unknown"]
    is_known = torch.tensor([True] * len(evals["known"]) + [False] * len(evals["unknown"]))
    every = sorted({int(j) for fs in (*found.values(), *truth.values()) for j in fs.latents.tolist()})
    acts = entity_activations(model, sae, names, templates=p["templates"], latents=every, batch_size=batch_size,
                              slot_templates=slots)  # fmt: skip
    col = {j: i for i, j in enumerate(every)}
    by: dict[str, Any] = {}
    for (pos, direction), fs in found.items():
        tr = truth[pos, direction]
        target = is_known if direction == "known" else ~is_known
        score = acts[pos].double().mean(1)

        def aucs(latents: Tensor, score: Tensor = score, target: Tensor = target) -> list[float | None]:
            return [_none(auroc(score[:, col[j]], target)) for j in latents.tolist()]

        shared = sorted(set(fs.latents.tolist()) & set(tr.latents.tolist()))
        by[f"{pos}/{direction}"] = {
            "free_top": fs.latents.tolist(), "truth_top": tr.latents.tolist(), "overlap": len(shared),
            "shared": shared, "free_auroc": aucs(fs.latents), "truth_auroc": aucs(tr.latents),
            "free_heldout_auroc_own": [_none(v) for v in fs.heldout_auroc.tolist()],
            "truth_heldout_auroc_own": [_none(v) for v in tr.heldout_auroc.tolist()],
        }  # fmt: skip
    # The exemplar-free search saw no true label, so every true entity outside its contrast sets is held out for
    # its top latent: scored on all of them too, with a bootstrap interval (the halves above are for comparing
    # with the truth-derived pick, which needs half of the truth to pick on).
    every_eval = {s: [e.name for e in es if e.name not in used] for s, es in zip(DIRECTIONS, sides)}
    all_names = every_eval["known"] + every_eval["unknown"]
    all_known = torch.tensor([True] * len(every_eval["known"]) + [False] * len(every_eval["unknown"]))
    tops = sorted({int(fs.latents[0]) for fs in found.values() if len(fs.latents)})
    acts_all = entity_activations(model, sae, all_names, templates=p["templates"], latents=tops,
                                  batch_size=batch_size, slot_templates=slots) if tops and all_names else {}  # fmt: skip
    for (pos, direction), fs in found.items():
        row = by[f"{pos}/{direction}"]
        if not len(fs.latents) or not acts_all:
            row["free_top_auroc_all"], row["free_top_auroc_all_ci"] = None, None
            continue
        target = all_known if direction == "known" else ~all_known
        score = acts_all[pos].double().mean(1)[:, tops.index(int(fs.latents[0]))]
        lo, hi = auroc_interval(score, target, seed=p["seed"])
        row["free_top_auroc_all"] = _none(auroc(score, target))
        row["free_top_auroc_all_ci"] = None if math.isnan(lo) else [lo, hi]
    figures = {"n_eval": {s: len(evals[s]) for s in DIRECTIONS}, "n_truth": {s: len(x) for s, x in zip(DIRECTIONS, sides)},
               "n_eval_all": {s: len(every_eval[s]) for s in DIRECTIONS}, "eval_all": every_eval,
               "n_eval_excluded": sum(len(held[s]) - len(evals[s]) for s in DIRECTIONS),
               "eval": "the truth's held-out entities not in the exemplar-free sets", "by": by}  # fmt: skip
    return TruthComparison(figures=figures, truth=truth)


def slot_templates_of(found: dict[tuple[str, str], FeatureSet]) -> list[str] | None:
    """The slot templates a `locate_entity_known` result was measured on (None without the slot position)."""
    return next((fs.params["slot_templates"] for fs in found.values() if fs.params.get("slot_templates")), None)


def _none(v: float) -> float | None:
    return None if math.isnan(v) else float(v)
