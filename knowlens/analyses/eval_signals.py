"""The signals `knowlens.analyses.evaluation` compares, each scored on the same rows: the answer-value tokens of graded
answers (`value_rows`). Every builder returns `Signal` s whose ``score`` is higher for "more reliable" (correct) and
whose ``prob``, when the signal is a probability of being correct, is that probability.

* **labels** (`label_signals`): knowlens's exemplar-free labels, ``p_reliable`` of `knowlens.labels.label_generation`
  (greedy, the same batches as `answer_items`, so the same tokens; an answer whose tokens differ is reported and
  left out of every signal). Probes: the files given, or self-consistency probes fitted on the fly with
  `fit_pseudo_probes` on the evaluated *question prompts* (prompts only, never the grader's verdicts):
  ``fit="cross"`` (default) fits one probe per half of the entities and labels each half's answers with the probe
  of the *other* half (so no evaluated prompt was seen by the probe that labels it); ``fit="all"`` fits one probe on
  every question prompt (in-sample for the prompts). Further probes (``probe:<name>``) and ``entity_known`` are
  signals of their own. Without probe files, ``entity_slot`` options add ``probe:entity_slot``: the entity-contrast
  probe at the answer slot (`knowlens.probes.pseudo_labels.entity_contrast_labels` with ``position="slot"``:
  self-generated vs fabricated names, read where the model's own answers first depend on the entity), fitted once
  (its names come from the model's samples and from fabrication, not from the evaluated items) and applied before
  every token in the same labelling pass.
* **ground-truth probe** (`ground_truth_signal`): the upper-bound reference, as the organism's signal gate
  `knowlens.analyses.signals` builds it: rows the value tokens, the residual at the position that predicted the
  token, every residual hook a candidate, out-of-fold logistic scores from ``folds`` folds grouped by entity (hook
  and L2 chosen inside each training fold, `cross_validate_select`), trained on the grader's classes.
* **best single SAE latent** (`sae_signal`): the SAE's latents at the position that predicted the token; on each
  half of the entities the latent whose AUROC is farthest from 0.5 (either sign) is picked and Platt-scaled there,
  and scores the other half (pooled: a probability fitted on other entities).
* **top-1 probability** and **entropy** (`output_signals`) of the distribution the token was drawn from.
* **self-consistency** (`self_consistency_signal`): ``k`` answers sampled at temperature 1 per prompt; a value
  token's agreement is the share of the samples that contain its claim's whole value span (the grader's
  `Claim.value_tokens`, as token ids, contiguous, anywhere: `knowlens.probes.pseudo.span_agreement`).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knowlens.analyses.answers import Answer
from knowlens.capture import generate
from knowlens.capture.prompts import eos_token_ids
from knowlens.errors import KnowlensError
from knowlens.labels import label_generation
from knowlens.organism.corpus import EvalItem
from knowlens.probes import L2_GRID, cross_validate_select, fit_calibration, load_probe, max_folds
from knowlens.probes.pseudo import default_hooks, fit_entity_slot_probe, fit_pseudo_probes, span_agreement
from knowlens.types import Tensor

EPS = 1e-12


@dataclass(frozen=True)
class ValueRow:
    """One answer-value token: its answer, its index there and its claim's value span ``[start, stop)``."""

    answer: int
    index: int
    span: tuple[int, int]


@dataclass(frozen=True, eq=False)
class Signal:
    """Per value-token row: ``score`` (higher = more reliable) and ``prob`` (P(correct)) when it is a probability."""

    name: str
    title: str
    score: Tensor  # float64 (n,)
    prob: Tensor | None
    passes: int  # forward passes per generated token
    cost: str
    details: dict[str, Any] = field(default_factory=dict)


def value_rows(answers: Sequence[Answer]) -> list[ValueRow]:
    """The value tokens of the grader's claims whose class is correct or hallucinated (as the signal gates)."""
    rows: list[ValueRow] = []
    for i, a in enumerate(answers):
        for c in a.grade.claims:
            rows += [ValueRow(i, j, c.value_tokens) for j in range(*c.value_tokens)
                     if a.grade.classes[j] in ("correct", "hallucinated")]  # fmt: skip
    return rows


def answer_batches(items: Sequence[EvalItem], batch_size: int) -> list[list[int]]:
    """The batches `answer_items` makes (items sorted by prompt length), as item indices."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def token_ids(model: Any, a: Answer) -> list[int]:
    return [int(t) for t in model.tokenizer.convert_tokens_to_ids(list(a.tokens))]


def _logit(p: Tensor) -> Tensor:
    p = p.to(torch.float64).clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------------------------------------------------------- labels


def label_signals(
    model: Any,
    answers: Sequence[Answer],
    rows: Sequence[ValueRow],
    *,
    probes: Sequence[Any] | None,
    halves: dict[str, int],
    fit: str,
    k: int,
    seed: int,
    batch_size: int,
    max_new_tokens: int,
    sae: Any = None,
    entity_slot: dict[str, Any] | None = None,
    log: Callable[[str], object] = lambda _: None,
) -> tuple[list[Signal], set[int], dict[str, Any]]:
    """The labels' signals, the answers whose labelled tokens differ from the graded ones, and how the probes were
    made (module docstring). ``entity_slot``: options of the entity contrast at the answer slot (``templates``,
    ``exclude_texts``, ...) to fit that probe too when no probes are given; None leaves it out."""
    items = [a.item for a in answers]
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="knowlens-eval-") as tmp:
        extra: list[Any] = []
        if not probes and entity_slot is not None:
            log("fitting an entity-contrast probe at the answer slot (self-generated vs fabricated names)")
            try:
                slot_probe, details["entity_slot"] = _fit_entity_slot(model, Path(tmp) / "slot", entity_slot, seed=seed)
                extra.append(slot_probe)
            except KnowlensError as err:
                details["entity_slot"] = f"left out: {err}"
        if probes:
            labelled = [_label(model, items, list(probes), batch_size, max_new_tokens, sae)]
            pick = [0] * len(items)
            details["probes"] = "given: " + ", ".join(str(getattr(p, "path", p)) for p in probes)
        else:
            parts = (0, 1) if fit == "cross" else (None,)
            labelled, details["fits"] = [], []
            for part in parts:
                fit_items = [h for h in items if h.kind == "question" and (part is None or halves[h.entity] != part)]
                log(f"fitting a self-consistency probe on {len(fit_items)} question prompts (k={k})"
                    + ("" if part is None else f" for entity half {part}"))  # fmt: skip
                probe, info = _fit_probe(model, fit_items, Path(tmp) / f"fit{part}", k=k, seed=seed,
                                         max_new_tokens=max_new_tokens)  # fmt: skip
                details["fits"].append({"labels_entity_half": part, "fit_prompts": len(fit_items), **info})
                labelled.append(_label(model, items, [probe, *extra], batch_size, max_new_tokens, None))
            pick = [0 if fit == "all" else halves[h.entity] for h in items]
    gens = [labelled[pick[i]][0][i] for i in range(len(items))]
    mismatched = {i for i, (a, g) in enumerate(zip(answers, gens))
                  if [t.token_id for t in g.tokens][: len(a.tokens)] != token_ids(model, a)}  # fmt: skip
    probe_info = labelled[0][1]
    primary = next(p for p in probe_info if p["role"] == "primary")
    how = ("self-consistency probe fitted on the other entity half's question prompts" if not probes and fit == "cross"
           else "self-consistency probe fitted on every question prompt" if not probes
           else f"probe {primary['name']}")  # fmt: skip
    details["primary"] = {k: primary[k] for k in ("name", "hook", "position", "label_source")}
    details["fit"] = None if probes else fit
    details["how"] = how

    def take(get: Callable[[Any], float | None]) -> list[float | None]:
        return [None if r.answer in mismatched else get(gens[r.answer].tokens[r.index]) for r in rows]

    p = take(lambda t: t.p_reliable)
    title = f"knowlens labels (probe {primary['name']})" if probes else "knowlens labels (exemplar-free)"
    out = [_prob_signal("labels", title, p, 1, "1 (same pass)", details)]
    for info in probe_info:
        if info["role"] != "primary" and info["role"] != "entity signal":
            key = f"probe:{info['name']}"
            out.append(_prob_signal(key, f"probe {info['name']}", take(lambda t, key=key: t.signals.get(key)), 1,
                                    "1 (same pass)", {"probe": info}))  # fmt: skip
    if any(i["role"] == "entity signal" for i in probe_info):
        carried = take(lambda t: t.signals.get("entity_known"))
        if all(v is not None for r, v in zip(rows, carried) if r.answer not in mismatched):
            out.append(_prob_signal("entity_known", "entity_known (carried from the last name)", carried, 1,
                                    "1 (same pass)", {}))  # fmt: skip
        else:
            details["entity_known"] = "left out: some value tokens come before any entity name"
    return out, mismatched, details


def _prob_signal(name: str, title: str, values: list[float | None], passes: int, cost: str,
                 details: dict[str, Any]) -> Signal:  # fmt: skip
    prob = torch.tensor([0.5 if v is None else v for v in values], dtype=torch.float64)
    return Signal(name, title, _logit(prob), prob, passes, cost, details)


def _label(model: Any, items: Sequence[EvalItem], probes: list[Any], batch_size: int, max_new_tokens: int,
           sae: Any) -> tuple[list[Any], Any]:  # fmt: skip
    """`label_generation` on every item, batch by batch as `answer_items` generates (same padding, same tokens);
    the generations in item order and the probes' descriptions."""
    out: list[Any] = [None] * len(items)
    probe_info: Any = None
    for batch in answer_batches(items, batch_size):
        prompts = [items[i].prompt for i in batch]
        limit = min(max_new_tokens, model.cfg.n_ctx - max(len(model.to_tokens(p)[0]) for p in prompts))
        labels = label_generation(model, prompts, probes, max_new_tokens=limit, batch_size=len(batch), sae=sae)
        probe_info = labels.probes
        for i, g in zip(batch, labels):
            out[i] = g
    return out, probe_info


def _fit_probe(model: Any, items: Sequence[EvalItem], folder: Path, *, k: int, seed: int,
               max_new_tokens: int) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    fits = fit_pseudo_probes(model, [h.prompt for h in items], hooks=default_hooks(model), out_dir=folder,
                             sources=("self_consistency",), k=k, seed=seed, groups=[h.entity for h in items],
                             options={"self_consistency": {"max_new_tokens": max_new_tokens}}, n_boot=0,
                             model_name=getattr(model.cfg, "model_name", None))  # fmt: skip
    f = fits["self_consistency"]
    pseudo = f.training["pseudo"]
    info = {"hook": pseudo["hook"], "counts": pseudo["counts"], "threshold": round(pseudo["threshold"], 4),
            "pseudo_oof_auroc": round(float(f.metrics["oof_auroc"]), 4), "label_source": pseudo["label_source"]}  # fmt: skip
    return load_probe(folder / "self_consistency.safetensors", model=model, device=model.embed.W_E.device), info


def _fit_entity_slot(model: Any, folder: Path, options: dict[str, Any], *, seed: int) -> tuple[Any, dict[str, Any]]:
    """The exemplar-free entity-slot probe (`fit_entity_slot_probe`; ``options``: its ``templates``,
    ``exclude_texts``, ...), fitted once (its names come from the model's own samples and from fabrication, not from
    the evaluated items)."""
    f = fit_entity_slot_probe(model, folder, seed=seed, model_name=getattr(model.cfg, "model_name", None), **options)
    pseudo = f.training["pseudo"]
    frames = pseudo["params"].get("answer_frames") or {}
    info = {"hook": pseudo["hook"], "counts": pseudo["counts"], "threshold": round(pseudo["threshold"], 4),
            "pseudo_oof_auroc": round(float(f.metrics["oof_auroc"]), 4), "label_source": pseudo["label_source"],
            "frames": frames.get("frames")}  # fmt: skip
    return load_probe(folder / "entity_slot.safetensors", model=model, device=model.embed.W_E.device), info


# ---------------------------------------------------------------------------------------- ground-truth probe


def _before(answers: Sequence[Answer], rows: Sequence[ValueRow], hook: str) -> Tensor:
    """The activation at ``hook`` at the position that predicted each row's token."""
    return torch.stack([answers[r.answer].activations[hook][len(answers[r.answer].prompt_tokens) + r.index - 1]  # type: ignore[index]
                        for r in rows]).cpu()  # fmt: skip


def ground_truth_signal(answers: Sequence[Answer], rows: Sequence[ValueRow], hooks: Sequence[str], *, folds: int,
                        inner_k: int, seed: int) -> Signal:  # fmt: skip
    """Out-of-fold logistic probe on the grader's classes (module docstring)."""
    hallucinated = torch.tensor([answers[r.answer].grade.classes[r.index] == "hallucinated" for r in rows])
    groups = [answers[r.answer].item.entity for r in rows]
    k = min(folds, max_folds(hallucinated, groups))
    if k < 2:
        raise KnowlensError("fewer than 2 entities hold a class")
    features = {f"{h}@before_token": _before(answers, rows, h) for h in hooks}
    sel = cross_validate_select(features, hallucinated, groups, l2_grid=L2_GRID, k=k, inner_k=inner_k, seed=seed)
    z = -sel.nested.scores.to(torch.float64)  # logit of "correct"
    details = {"folds": k, "inner_k": inner_k, "chosen_per_fold": list(sel.chosen), "l2_per_fold": list(sel.nested.l2),
               "trained_on": "the grader's classes (upper-bound reference, not exemplar-free)"}  # fmt: skip
    return Signal("ground_truth_probe", "ground-truth probe (upper bound)", z, torch.sigmoid(z), 1, "1 (same pass)",
                  details)  # fmt: skip


# ----------------------------------------------------------------------------------------------- SAE latent


def sae_signal(answers: Sequence[Answer], rows: Sequence[ValueRow], sae: Any, *, halves: dict[str, int],
               correct: Tensor) -> Signal:  # fmt: skip
    """The best single latent picked on one entity half, Platt-scaled there, scoring the other (module docstring)."""
    from knowlens.analyses.eval_metrics import weighted_auroc
    from knowlens.saes.activations import encode_latents

    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        acts = encode_latents(sae, _before(answers, rows, hook).to(sae.W_dec.device)[None])[0].double().cpu()
    half = torch.tensor([halves[answers[r.answer].item.entity] for r in rows])
    z = torch.zeros(len(rows), dtype=torch.float64)
    picks = []
    for part in (0, 1):
        pick, score = half != part, half == part  # pick on the other half, score this one
        y = correct[pick]
        if not 0 < int(y.sum()) < len(y):
            raise KnowlensError(f"entity half {1 - part} holds one class only: no latent can be picked on it")
        active = (acts[pick] > 0).any(0).nonzero().flatten().tolist()
        if not active:
            raise KnowlensError(f"no SAE latent is active on entity half {1 - part}'s value tokens")
        ones = torch.ones(1, int(pick.sum()), dtype=torch.float64)
        aucs = {j: float(weighted_auroc(acts[pick, j], y, ones)[0]) for j in active}
        best = max(active, key=lambda j: (abs(aucs[j] - 0.5), -j))
        sign = 1.0 if aucs[best] >= 0.5 else -1.0
        cal = fit_calibration("platt", sign * acts[pick, best], y)
        z[score] = cal.logit(sign * acts[score, best])
        picks.append({"scored_half": part, "latent": best, "sign": sign, "selection_auroc": round(aucs[best], 4),
                      "platt": cal.to_dict()})  # fmt: skip
    details = {"hook": hook, "d_sae": int(sae.cfg.d_sae), "picks": picks,
               "rule": "latent with AUROC farthest from 0.5 on one entity half (either sign), Platt-scaled there, "
               "scores the other half"}  # fmt: skip
    return Signal("sae_latent", "best single SAE latent", z, torch.sigmoid(z), 1, "1 + SAE encode", details)


# ------------------------------------------------------------------------------------------ output confidence


def output_signals(answers: Sequence[Answer], rows: Sequence[ValueRow]) -> list[Signal]:
    top1 = torch.tensor([answers[r.answer].top1[r.index] for r in rows], dtype=torch.float64)
    entropy = torch.tensor([answers[r.answer].entropy[r.index] for r in rows], dtype=torch.float64)
    return [
        Signal("top1_prob", "top-1 probability", _logit(top1), top1, 1, "1", {}),
        Signal("entropy", "entropy (negated)", -entropy, None, 1, "1", {"score": "-entropy (nats)"}),
    ]


# ------------------------------------------------------------------------------------------ self-consistency


def self_consistency_signal(model: Any, answers: Sequence[Answer], rows: Sequence[ValueRow], *, k: int, seed: int,
                            batch_size: int, max_new_tokens: int, temperature: float = 1.0) -> Signal:  # fmt: skip
    """Agreement of each value token's claim span with ``k`` sampled answers (module docstring)."""
    items = [a.item for a in answers]
    needed = sorted({r.answer for r in rows})
    eos = set(eos_token_ids(model, None))
    rng = random.Random(seed)
    samples: dict[int, list[list[int]]] = {i: [] for i in needed}
    jobs = [i for i in needed for _ in range(k)]
    jobs.sort(key=lambda i: len(items[i].prompt))
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        prompts = [items[i].prompt for i in batch]
        limit = min(max_new_tokens, model.cfg.n_ctx - max(len(model.to_tokens(p)[0]) for p in prompts))
        rec = generate(model, prompts, hooks=(), max_new_tokens=limit, temperature=temperature,
                       seed=rng.randrange(2**31))  # fmt: skip
        for r, i in enumerate(batch):
            ids = rec.tokens[r, rec.generated_mask[r]].tolist()
            samples[i].append(ids[: next((j for j, t in enumerate(ids) if t in eos), len(ids))])
    ids_of = {i: token_ids(model, answers[i]) for i in needed}
    cache: dict[tuple[int, tuple[int, int]], float] = {}
    for r in rows:
        key = (r.answer, r.span)
        if key not in cache:
            cache[key] = span_agreement(ids_of[r.answer], samples[r.answer], *r.span)
    agree = torch.tensor([cache[(r.answer, r.span)] for r in rows], dtype=torch.float64)
    details = {"k": k, "temperature": temperature, "seed": seed,
               "rule": "share of the k samples containing the claim's value span (token ids, contiguous)"}  # fmt: skip
    return Signal("self_consistency", f"self-consistency (k={k})", agree, agree, k + 1, f"{k + 1} (k samples + 1)",
                  details)  # fmt: skip
