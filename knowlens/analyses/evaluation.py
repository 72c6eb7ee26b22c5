"""The evaluation harness: `evaluate_signals(model, world, items, ...) -> Evaluation`.

How well does each reliability signal tell the organism's hallucinated answer tokens from its correct ones? The
organism's grader gives the ground truth; the signals never see it (except the ground-truth probe, the upper-bound
reference).

**Rows.** The greedy answers to ``items`` (`answer_items`: held-out questions and biography requests), graded; the
rows are the answer-*value* tokens (the value spans of the grader's claims, class ``correct`` or ``hallucinated``;
template words and copied names are left out), as the organism's signal gate reads them
(`knowlens.analyses.signals`). Class 1, the one to detect, is ``hallucinated``.

**Signals** (`knowlens.analyses.eval_signals`): knowlens's exemplar-free labels (``p_reliable``), the ground-truth
probe, the best single SAE latent (with ``sae``), top-1 probability, entropy, self-consistency (``k`` samples).

**Metrics** per signal (`knowlens.analyses.eval_metrics`: definitions): AUROC, AUPRC and recall at 10% false-positive
rate of hallucinated tokens; ECE (10 bins) and Brier of P(correct) for the signals that are probabilities
(``p_reliable``, the probes, top-1 probability, the self-consistency agreement; "n/a" for entropy, a raw score); and
for every signal ECE and Brier after **Platt scaling cross-fitted** on ``folds`` folds grouped by entity (each row's
calibrator fitted on the other folds' rows: held out). Each with a 95% percentile bootstrap interval over entities
(``n_boot`` resamples of the entities, each bringing all its rows; the same resamples for every signal; scores and
calibrators held fixed). The same metrics per split (known, partial, refusal, unknown: each split's entities
resampled on their own); undefined where a split holds one class.

**Risk-coverage** (answer level): the answers with at least one value row; an answer is correct when none of its
value tokens is hallucinated; its reliability is the *minimum* of its value tokens' scores (the least reliable
token decides, so one flagged value abstains from the whole answer). Abstaining from the least reliable answers
first, the accuracy of those kept at each coverage, and the area under that curve (`eval_metrics.risk_coverage`),
with a bootstrap interval over entities; beside it the area of a random order (the overall accuracy) and of the
oracle (every correct answer first).

**Cost**: forward passes per generated token. The probes read the generating pass (1); top-1 probability and entropy
come with it (1); an SAE latent needs the pass and an SAE encode; self-consistency ``k`` sampled answers plus the
greedy one (``k + 1``).

Not done here: the sweep over cue strengths (0, the default, 0.95) of issue 9 needs a small organism trained per
cue strength; it is left (no organism is trained by this harness).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knowlens.analyses.answers import Answer, answer_items
from knowlens.analyses.eval_metrics import (
    MAX_FPR,
    bootstrap_weights,
    interval,
    reliability_bins,
    risk_coverage,
    roc_points,
    weighted_auroc,
    weighted_average_precision,
    weighted_brier,
    weighted_ece,
    weighted_rc_area,
    weighted_recall_at_fpr,
)
from knowlens.analyses.eval_signals import (
    Signal,
    ValueRow,
    ground_truth_signal,
    label_signals,
    output_signals,
    sae_signal,
    self_consistency_signal,
    value_rows,
)
from knowlens.analyses.signals import signal_hooks
from knowlens.errors import KnowlensError
from knowlens.fingerprint import model_identity
from knowlens.organism.corpus import EvalItem
from knowlens.organism.world import World
from knowlens.probes import cross_fitted, grouped_folds, max_folds
from knowlens.types import Tensor

FITS = ("cross", "all")
SPLITS = ("known", "partial", "refusal", "unknown")
METRICS = {  # key: column title
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "recall_at_10fpr": "recall@10%FPR",
    "ece": "ECE",
    "brier": "Brier",
    "ece_platt": "ECE (Platt)",
    "brier_platt": "Brier (Platt)",
}
CUE_SWEEP_NOTE = ("cue-strength sweep (0, default, 0.95): not part of one evaluation, which reads one organism; "
                  "`python benchmarks/cue_sweep.py --out DIR` trains a small organism per cue strength and runs this "
                  "evaluation on each (docs/results/cue_sweep.md)")  # fmt: skip


@dataclass(frozen=True)
class SignalResult:
    """One signal's figures: ``metrics[key] = {"value", "ci95"}`` (None where undefined or n/a), per split the same
    with counts, the risk-coverage summary and curve, ROC points and reliability-diagram bins."""

    name: str
    title: str
    passes: int
    cost: str
    probability: bool
    metrics: dict[str, dict[str, Any]]
    by_split: dict[str, dict[str, Any]]
    risk_coverage: dict[str, Any]
    curves: dict[str, Any] = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "passes_per_token": self.passes, "cost": self.cost,
                "probability": self.probability, "metrics": self.metrics, "by_split": self.by_split,
                "risk_coverage": self.risk_coverage, "curves": self.curves, "details": self.details}  # fmt: skip


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate_signals` measured: `to_markdown`, `to_dict` (JSON-ready), `to_html`."""

    signals: tuple[SignalResult, ...]
    counts: dict[str, Any]
    references: dict[str, float]  # risk-coverage area of a random order and of the oracle
    skipped: dict[str, str]  # signal -> why it was not measured
    params: dict[str, Any]
    model: dict[str, str]
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> SignalResult:
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "counts": self.counts, "params": self.params,
                "signals": [s.to_dict() for s in self.signals], "risk_coverage_references": self.references,
                "skipped": self.skipped, "notes": list(self.notes)}  # fmt: skip

    def to_markdown(self) -> str:
        from knowlens.analyses.eval_report import markdown

        return markdown(self)

    def to_html(self, path: str | Path, *, title: str = "knowlens evaluation") -> Path:
        """One self-contained HTML file (plotly.js inlined): the table, ROC curves, reliability diagram and
        risk-coverage curves."""
        from knowlens.analyses.eval_report import write_html

        return write_html(self, Path(path), title=title)


def evaluate_signals(
    model: Any,
    world: World,
    items: Sequence[EvalItem],
    *,
    probes: Sequence[Any] | None = None,
    sae: Any = None,
    k: int = 8,
    fit: str = "cross",
    seed: int = 0,
    n_boot: int = 1000,
    folds: int = 5,
    inner_k: int = 3,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    sample_batch_size: int = 128,
    entity_slot: bool = True,
    training_texts: Sequence[str] | None = None,
    log: Callable[[str], object] | None = None,
) -> Evaluation:
    """Score every signal on the answer-value tokens of ``items``' greedy answers (module docstring).

    Args:
        probes: probe files or `LoadedProbe` s for the labels (default: self-consistency probes fitted on the fly
            on the items' question prompts, ``k`` samples each, as ``fit`` says: ``"cross"`` or ``"all"``).
        sae: an SAE (`knowlens.saes.load_sae`) for the best-single-latent signal; None leaves it out.
        k: sampled answers per prompt for self-consistency (the signal, and the fitted probes' pseudo-labels).
        seed: entity halves, sampling, folds and bootstrap resamples.
        entity_slot: without ``probes``, also fit the exemplar-free entity-contrast probe at the answer slot
            (self-generated vs fabricated names, the world's biography questions as templates) and report it as the
            signal ``probe:entity_slot``.
        training_texts: what the model was trained on, to keep fabricated names out of it (None: unchecked).
        log: called with a line per stage (progress).
    Signals that cannot be measured (too few entities of a class, ...) are listed in ``Evaluation.skipped``.
    """
    say = log or (lambda _: None)
    _check(k=k, fit=fit, n_boot=n_boot, folds=folds, inner_k=inner_k, max_new_tokens=max_new_tokens,
           batch_size=batch_size, sample_batch_size=sample_batch_size)  # fmt: skip
    if not items:
        raise KnowlensError("no items to evaluate")
    hooks = signal_hooks(int(model.cfg.n_layers))
    sae_hook = None if sae is None else sae.cfg.metadata.hook_name
    say(f"answering {len(items)} held-out items (greedy, graded)")
    answers = answer_items(model, world, items, hooks=tuple(dict.fromkeys([*hooks, *([sae_hook] if sae_hook else [])])),
                           batch_size=batch_size, max_new_tokens=max_new_tokens)  # fmt: skip
    rows = value_rows(answers)
    n_hal = sum(answers[r.answer].grade.classes[r.index] == "hallucinated" for r in rows)
    if n_hal == 0 or n_hal == len(rows):
        raise KnowlensError(f"the answers hold {n_hal} hallucinated and {len(rows) - n_hal} correct value tokens: "
                            "both classes are needed (give more, or more varied, items)")  # fmt: skip
    entities = sorted({a.item.entity for a in answers})
    random.Random(seed).shuffle(entities)
    halves = {e: i % 2 for i, e in enumerate(entities)}
    signals: list[Signal] = []
    skipped: dict[str, str] = {}
    mismatched: set[int] = set()
    label_details: dict[str, Any] = {}
    try:
        slot_opts = None
        if entity_slot:
            from knowlens.saes.entity import organism_templates

            slot_opts = {"templates": list(organism_templates(world)), "exclude_texts": training_texts}
        found, mismatched, label_details = label_signals(model, answers, rows, probes=probes, halves=halves, fit=fit,
                                                         k=k, seed=seed, batch_size=batch_size,
                                                         max_new_tokens=max_new_tokens, sae=sae,
                                                         entity_slot=slot_opts, log=say)  # fmt: skip
        signals += found
    except KnowlensError as err:
        skipped["labels"] = str(err)
    keep = torch.tensor([r.answer not in mismatched for r in rows])
    rows_kept = [r for r, m in zip(rows, keep.tolist()) if m]
    correct = torch.tensor([answers[r.answer].grade.classes[r.index] == "correct" for r in rows])
    say("ground-truth probe: grouped out-of-fold logistic probe on the grader's classes")
    try:
        signals.append(ground_truth_signal(answers, rows, hooks, folds=folds, inner_k=inner_k, seed=seed))
    except KnowlensError as err:
        skipped["ground_truth_probe"] = str(err)
    if sae is not None:
        say(f"best single SAE latent at {sae_hook}")
        try:
            signals.append(sae_signal(answers, rows, sae, halves=halves, correct=correct))
        except KnowlensError as err:
            skipped["sae_latent"] = str(err)
    else:
        skipped["sae_latent"] = "no SAE given (--sae)"
    signals += output_signals(answers, rows)
    say(f"self-consistency: {k} sampled answers per item")
    signals.append(self_consistency_signal(model, answers, rows, k=k, seed=seed + 1, batch_size=sample_batch_size,
                                           max_new_tokens=max_new_tokens))  # fmt: skip
    say(f"metrics with {n_boot} bootstrap resamples over entities")
    results = _measure([_subset(s, keep) for s in signals], answers, rows_kept, folds=folds, n_boot=n_boot, seed=seed)
    counts = _counts(answers, rows_kept, mismatched)
    rc_correct = _answer_correct(answers, rows_kept)
    references = {"random": round(float(rc_correct.double().mean()), 4),
                  "oracle": round(risk_coverage(rc_correct.double(), rc_correct)[2], 4)}  # fmt: skip
    params = {"k": k, "fit": fit if probes is None else "given probes", "seed": seed, "n_boot": n_boot,
              "folds": folds, "inner_k": inner_k, "max_new_tokens": max_new_tokens, "items": len(items),
              "max_fpr": MAX_FPR, "labels": label_details}  # fmt: skip
    return Evaluation(signals=tuple(results), counts=counts, references=references, skipped=skipped, params=params,
                      model=model_identity(model), notes=(CUE_SWEEP_NOTE,))  # fmt: skip


def _check(**values: Any) -> None:
    for name, low in (("k", 1), ("n_boot", 0), ("folds", 2), ("inner_k", 2), ("max_new_tokens", 1),
                      ("batch_size", 1), ("sample_batch_size", 1)):  # fmt: skip
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise KnowlensError(f"{name} must be an integer >= {low}, got {v!r}")
    if values["fit"] not in FITS:
        raise KnowlensError(f"fit must be one of {', '.join(FITS)}, got {values['fit']!r}")


def _subset(s: Signal, keep: Tensor) -> Signal:
    return Signal(s.name, s.title, s.score[keep], None if s.prob is None else s.prob[keep], s.passes, s.cost, s.details)


def _answer_correct(answers: Sequence[Answer], rows: Sequence[ValueRow]) -> Tensor:
    ids = sorted({r.answer for r in rows})
    bad = {r.answer for r in rows if answers[r.answer].grade.classes[r.index] == "hallucinated"}
    return torch.tensor([i not in bad for i in ids])


def _counts(answers: Sequence[Answer], rows: Sequence[ValueRow], mismatched: set[int]) -> dict[str, Any]:
    def count(sub: Sequence[ValueRow]) -> dict[str, int]:
        hal = sum(answers[r.answer].grade.classes[r.index] == "hallucinated" for r in sub)
        return {"value_tokens": len(sub), "hallucinated": hal, "correct": len(sub) - hal,
                "entities": len({answers[r.answer].item.entity for r in sub}),
                "answers": len({r.answer for r in sub})}  # fmt: skip

    by_split = {s: count([r for r in rows if answers[r.answer].item.split == s]) for s in _splits(answers, rows)}
    return {**count(rows), "items": len(answers), "by_split": by_split, "answers_left_out": len(mismatched),
            "left_out_reason": "labelled tokens differ from the graded greedy answer" if mismatched else None}  # fmt: skip


def _splits(answers: Sequence[Answer], rows: Sequence[ValueRow]) -> list[str]:
    present = {answers[r.answer].item.split for r in rows}
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def _measure(signals: Sequence[Signal], answers: Sequence[Answer], rows: Sequence[ValueRow], *, folds: int,
             n_boot: int, seed: int) -> list[SignalResult]:  # fmt: skip
    correct = torch.tensor([answers[r.answer].grade.classes[r.index] == "correct" for r in rows])
    groups = [answers[r.answer].item.entity for r in rows]
    split = [answers[r.answer].item.split for r in rows]
    k = min(folds, max_folds(correct, groups))
    fold = grouped_folds(groups, k, seed=seed, labels=correct) if k >= 2 else None
    weights = bootstrap_weights(groups, n=n_boot, seed=seed)
    split_weights = {}
    for s in _splits(answers, rows):
        m = torch.tensor([x == s for x in split])
        split_weights[s] = (m, bootstrap_weights([g for g, x in zip(groups, split) if x == s], n=n_boot, seed=seed))
    ids = sorted({r.answer for r in rows})
    pos = {a: i for i, a in enumerate(ids)}
    answer_of = torch.tensor([pos[r.answer] for r in rows])
    a_correct = _answer_correct(answers, rows)
    a_weights = bootstrap_weights([answers[a].item.entity for a in ids], n=n_boot, seed=seed)
    out = []
    for s in signals:
        platt = cross_fitted("platt", s.score, correct, fold) if fold is not None else None
        metrics = _metrics(s, platt, correct, weights)
        by_split = {}
        for name, (m, w) in split_weights.items():
            n_c = int(correct[m].sum())
            by_split[name] = {"n": {"hallucinated": int(m.sum()) - n_c, "correct": n_c},
                              **_metrics(_subset(s, m), None if platt is None else platt[m], correct[m], w)}  # fmt: skip
        rel = torch.full((len(ids),), torch.inf, dtype=torch.float64).scatter_reduce(0, answer_of, s.score, "amin")
        coverage, accuracy, area = risk_coverage(rel, a_correct)
        rc = {"area": round(area, 4), "ci95": _ci(weighted_rc_area(rel, a_correct, a_weights)),
              "answers": len(ids), "coverage": [round(v, 4) for v in coverage.tolist()],
              "accuracy": [round(v, 4) for v in accuracy.tolist()]}  # fmt: skip
        fpr, tpr = roc_points(-s.score, ~correct)
        shown = s.prob if s.prob is not None else platt
        curves = {"roc": {"fpr": [round(v, 4) for v in fpr], "tpr": [round(v, 4) for v in tpr]},
                  "reliability": None if shown is None else reliability_bins(shown, correct),
                  "reliability_of": "probability" if s.prob is not None else "Platt (cross-fitted)"}  # fmt: skip
        out.append(SignalResult(s.name, s.title, s.passes, s.cost, s.prob is not None, metrics, by_split, rc, curves,
                                s.details))  # fmt: skip
    return out


def _metrics(s: Signal, platt: Tensor | None, correct: Tensor, weights: Tensor) -> dict[str, dict[str, Any]]:
    risk, hal = -s.score, ~correct
    fns: dict[str, Callable[[Tensor], Tensor] | None] = {
        "auroc": lambda w: weighted_auroc(risk, hal, w),
        "auprc": lambda w: weighted_average_precision(risk, hal, w),
        "recall_at_10fpr": lambda w: weighted_recall_at_fpr(risk, hal, w, max_fpr=MAX_FPR),
        "ece": None if s.prob is None else (lambda w, p=s.prob: weighted_ece(p, correct, w)),
        "brier": None if s.prob is None else (lambda w, p=s.prob: weighted_brier(p, correct, w)),
        "ece_platt": None if platt is None else (lambda w, p=platt: weighted_ece(p, correct, w)),
        "brier_platt": None if platt is None else (lambda w, p=platt: weighted_brier(p, correct, w)),
    }
    ones = torch.ones(1, len(correct), dtype=torch.float64)
    out: dict[str, dict[str, Any]] = {}
    for key, fn in fns.items():
        if fn is None or len(correct) == 0:
            out[key] = {"value": None, "ci95": None}
            continue
        value = float(fn(ones)[0])
        out[key] = {"value": None if value != value else round(value, 4),
                    "ci95": _ci(fn(weights)) if value == value else None}  # fmt: skip
    return out


def _ci(replicates: Tensor) -> list[float] | None:
    ci = interval(replicates) if replicates.numel() else None
    return None if ci is None else [round(v, 4) for v in ci]
