"""Signal gates: does the model's residual stream know what it knows? Measured on held-out questions.

Every figure is an out-of-fold AUROC of a logistic probe (`knowlens.probes`): 5 folds grouped by entity (an
entity's rows are never in both a probe's training and test rows, stratified by class), the L2 strength
*and* the hook/position chosen inside each outer training fold by a 3-fold inner grouped CV, so the figure
is not biased by picking the best of many probes. ``best_single`` is the best single hook/position's own
out-of-fold AUROC, an optimistic figure (picked on the test rows), shown for comparison. Intervals: 95%
percentile bootstrap over entities (1,000 resamples) with the out-of-fold scores held fixed.

Candidates: the residual stream before the first block and after every block (`signal_hooks`: that is
``hook_resid_pre`` and ``hook_resid_post`` of every layer, since ``blocks.{l+1}.hook_resid_pre`` is
``blocks.{l}.hook_resid_post``), at two prompt positions: ``entity`` (the last token of the entity's name
in the prompt) and ``answer`` (the last prompt token, where the first answer token is predicted); and, for
the entity gates, at ``decision``: the position in the model's own answer that predicted its first value or
refusal token (`Grade.first_decision`; the last prompt token when the answer has neither, or refuses with
an "I ..." sentence). Where an answer copies the name before its value ("Ab Cor works as a ..."), the
answer-or-refuse choice is made there, not at the last prompt token.

- ``entity_known``: known vs unknown entities, attribute questions only (biography requests are left out:
  their prompt template differs, and every unknown entity's biography request is held out but only some
  known entities', so a probe could partly read the template instead of familiarity);
- ``entity_known_when_hallucinating``: known entities vs the unknown entities whose answer the grader's
  verdict calls hallucinated (a wrong value, or an invented subject, stated), attribute questions;
- ``token_hallucination``: hallucinated vs correct answer *value* tokens (the value spans of the grader's
  claims; template words and substituted subject names are left out), in the answers to every held-out
  question and biography request, probed at the position that predicted the token (the one before it);
  beside it the AUROC of top-1 probability and of entropy of the same tokens (as scores for "correct"),
  and ``token_hallucination_margin``: probe minus the better of the two (paired bootstrap interval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from knowlens.analyses.answers import Answer
from knowlens.errors import KnowlensError
from knowlens.probes import (
    L2_GRID,
    auroc,
    bootstrap_aurocs,
    cross_validate_select,
    max_folds,
    most_chosen,
    percentile_interval,
)
from knowlens.types import Tensor

ENTITY_KNOWN_MIN = 0.95
ENTITY_KNOWN_WHEN_HALLUCINATING_MIN = 0.90
TOKEN_HALLUCINATION_MIN = 0.90
TOKEN_HALLUCINATION_MARGIN_MIN = 0.10
SIGNAL_GATES = {
    "entity_known": (">=", ENTITY_KNOWN_MIN),
    "entity_known_when_hallucinating": (">=", ENTITY_KNOWN_WHEN_HALLUCINATING_MIN),
    "token_hallucination": (">=", TOKEN_HALLUCINATION_MIN),
    "token_hallucination_margin": (">=", TOKEN_HALLUCINATION_MARGIN_MIN),
}
POSITIONS = ("entity", "answer", "decision")


def signal_hooks(n_layers: int) -> tuple[str, ...]:
    """Every distinct residual: before block 0, and after each block."""
    return ("blocks.0.hook_resid_pre", *(f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)))


def signal_figures(
    answers: Sequence[Answer],
    *,
    k: int = 5,
    inner_k: int = 3,
    l2_grid: Sequence[float] = L2_GRID,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The signal gates of answers made by `answer_items(..., hooks=signal_hooks(n_layers))`, JSON-ready.

    A gate that cannot be measured (a class with fewer than 2 entities) has value None and fails, with a
    ``reason``.
    """
    if not answers or any(a.activations is None for a in answers):
        raise KnowlensError("signal gates need answers with activations: answer_items(..., hooks=signal_hooks(...))")
    hooks = [h for h in answers[0].activations or {} if "hook_resid" in h]
    opts = dict(k=k, inner_k=inner_k, l2_grid=l2_grid, n_boot=n_boot, seed=seed)
    questions = [a for a in answers if a.item.kind == "question"]
    known = [a for a in questions if a.item.split == "known"]
    unknown = [a for a in questions if a.item.split == "unknown"]
    fooled = [a for a in unknown if a.grade.verdict == "hallucinated"]
    gates = {
        "entity_known": _entity_gate(known, unknown, hooks, names=("known", "unknown"), **opts),
        "entity_known_when_hallucinating": _entity_gate(
            known, fooled, hooks, names=("known", "unknown_hallucinated"), **opts
        ),
        **_token_gates(answers, hooks, **opts),
    }
    for name, (op, threshold) in SIGNAL_GATES.items():
        g = gates[name]
        g.update(op=op, threshold=threshold, passed=g["value"] is not None and g["value"] >= threshold)
        gates[name] = {key: g[key] for key in ("value", "ci95", "op", "threshold", "passed")} | g
    return {
        "gates": gates,
        "all_passed": all(g["passed"] for g in gates.values()),
        "method": f"out-of-fold logistic probe AUROC, {k} folds grouped by entity; hook, position and L2 chosen "
        f"inside each training fold ({inner_k}-fold inner CV); 95% bootstrap over entities ({n_boot} resamples); "
        "blocks.{l}.hook_resid_post is also blocks.{l+1}.hook_resid_pre",
    }


def _entity_gate(
    pos: Sequence[Answer], neg: Sequence[Answer], hooks: Sequence[str], *, names: tuple[str, str], **opts: Any
) -> dict[str, Any]:
    rows = [*pos, *neg]
    labels = torch.tensor([1] * len(pos) + [0] * len(neg), dtype=torch.bool)
    counts = {names[0]: len(pos), names[1]: len(neg), "entities": len({a.item.entity for a in rows})}

    def features() -> dict[str, Tensor]:
        at = {
            "entity": [_name_end(a) for a in rows],
            "answer": [len(a.prompt_tokens) - 1 for a in rows],
            "decision": [_decision(a) for a in rows],
        }
        return {f"{h}@{p}": _stack(rows, h, at[p]) for h in hooks for p in POSITIONS}

    return _probe_gate(features, labels, [a.item.entity for a in rows], counts, **opts)[0]


def _token_gates(answers: Sequence[Answer], hooks: Sequence[str], **opts: Any) -> dict[str, dict[str, Any]]:
    rows: list[tuple[Answer, int]] = []  # answer, index of a value token in it
    for a in answers:
        for c in a.grade.claims:
            rows += [(a, j) for j in range(*c.value_tokens) if a.grade.classes[j] in ("correct", "hallucinated")]
    labels = torch.tensor([a.grade.classes[j] == "hallucinated" for a, j in rows], dtype=torch.bool)
    groups = [a.item.entity for a, _ in rows]
    counts = {"hallucinated": int(labels.sum()), "correct": int((~labels).sum()), "entities": len(set(groups))}
    # output confidence as scores for "hallucinated": low top-1 probability, high entropy
    top1 = -torch.tensor([a.top1[j] for a, j in rows], dtype=torch.float64)
    entropy = torch.tensor([a.entropy[j] for a, j in rows], dtype=torch.float64)

    def features() -> dict[str, Tensor]:
        at = [len(a.prompt_tokens) + j - 1 for a, j in rows]  # the position that predicted the token
        return {f"{h}@before_token": _stack([a for a, _ in rows], h, at) for h in hooks}

    gate, reps = _probe_gate(features, labels, groups, counts, extra=(top1, entropy), **opts)
    margin: dict[str, Any] = {k: gate[k] for k in ("value", "ci95", "where", "n", "folds")}
    if reps is None:
        margin["reason"] = gate["reason"]
        return {"token_hallucination": gate, "token_hallucination_margin": margin}
    auc_top1, auc_entropy = auroc(top1, labels), auroc(entropy, labels)
    gate["baselines"] = {
        "top1": {"value": round(auc_top1, 4), "ci95": _ci(reps[1])},
        "entropy": {"value": round(auc_entropy, 4), "ci95": _ci(reps[2])},
    }
    first = torch.tensor([any(c.value_tokens[0] == j for c in a.grade.claims) for a, j in rows])
    if 0 < int(labels[first].sum()) < int(first.sum()):
        gate["baselines"]["first_value_token_only"] = {
            "top1": round(auroc(top1[first], labels[first]), 4),
            "entropy": round(auroc(entropy[first], labels[first]), 4),
            "n": {"hallucinated": int(labels[first].sum()), "correct": int((~labels[first]).sum())},
        }
    margin.update(
        value=round(gate["value"] - max(auc_top1, auc_entropy), 4),
        ci95=_ci(reps[0] - torch.maximum(reps[1], reps[2])),  # paired: the same entity resamples
        against="top1" if auc_top1 >= auc_entropy else "entropy",
    )
    return {"token_hallucination": gate, "token_hallucination_margin": margin}


def _probe_gate(
    features: Callable[[], dict[str, Tensor]],
    labels: Tensor,
    groups: list[str],
    counts: dict[str, int],
    *,
    k: int,
    inner_k: int,
    l2_grid: Sequence[float],
    n_boot: int,
    seed: int,
    extra: tuple[Tensor, ...] = (),
) -> tuple[dict[str, Any], Tensor | None]:
    """The nested out-of-fold AUROC of a probe on the best candidate; bootstrap replicates of it and of
    the ``extra`` scores (one row each, the same resamples), or None when it cannot be measured."""
    folds = min(k, max_folds(labels, groups)) if len(labels) else 0
    out: dict[str, Any] = {"value": None, "ci95": None, "where": None, "n": counts, "folds": folds}
    if folds < 2:
        out["reason"] = "fewer than 2 entities in a class"
        return out, None
    try:
        sel = cross_validate_select(features(), labels, groups, l2_grid=l2_grid, k=folds, inner_k=inner_k, seed=seed)
    except KnowlensError as err:  # e.g. an outer training fold whose rarer class sits in one entity
        out["reason"] = str(err)
        return out, None
    scores = torch.stack([sel.nested.scores, *(s.to(sel.nested.scores) for s in extra)])
    reps = bootstrap_aurocs(scores, labels, groups, n=n_boot, seed=seed)
    out.update(
        value=round(sel.nested.auroc, 4),
        ci95=_ci(reps[0]),
        where=_where(most_chosen(sel.chosen)),
        chosen_per_fold=list(sel.chosen),
        l2_per_fold=list(sel.nested.l2),
        best_single={"value": round(sel.candidates[sel.best].auroc, 4), "where": _where(sel.best)},
        candidates={c: round(r.auroc, 4) for c, r in sel.candidates.items()},
    )
    return out, reps


def _where(candidate: str) -> dict[str, Any]:
    hook, position = candidate.split("@")
    return {"name": candidate, "hook": hook, "layer": int(hook.split(".")[1]), "position": position}


def _ci(reps: Tensor) -> list[float] | None:
    if reps.numel() == 0:
        return None
    return [round(v, 4) for v in percentile_interval(reps)]


def _stack(answers: Sequence[Answer], hook: str, at: Sequence[int]) -> Tensor:
    return torch.stack([a.activations[hook][i] for a, i in zip(answers, at)])  # type: ignore[index]


def _decision(a: Answer) -> int:
    """Row (prompt then generated tokens) that predicted the answer's first value or refusal token."""
    j = a.grade.first_decision()
    return len(a.prompt_tokens) - 1 + (j or 0)


def _name_end(a: Answer) -> int:
    """Index (in the prompt's tokens) of the last token of the entity's name: its first occurrence."""
    pieces = tuple(a.item.entity.split(" "))
    toks = a.prompt_tokens
    for i in range(len(toks) - len(pieces) + 1):
        if toks[i : i + len(pieces)] == pieces:
            return i + len(pieces) - 1
    raise KnowlensError(f"the entity {a.item.entity!r} is not among the tokens of its prompt {a.item.prompt!r}")

