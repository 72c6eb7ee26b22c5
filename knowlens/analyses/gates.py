"""The organism's behaviour gates, measured on its held-out questions.

- known accuracy: held-out attribute questions about known entities whose greedy answer states the asked
  fact correctly, about the asked entity by its exact name (>= 0.90); `known_value_accuracy` also counts
  answers that give the right value under a garbled copy of the name;
- refusal: held-out questions and biographies about refusal-trained entities answered with a refusal (>= 0.80);
- unknown: answers about never-seen entities that refuse, and that hallucinate (each >= 0.15);
- confident hallucination: median top-1 probability of the hallucinated answer tokens (>= 0.5): wrong
  values and substituted subject names; `hallucinated_value_top1_median` counts wrong values only.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from knowlens.analyses.answers import Answer

GATES = {
    "known_accuracy": (">=", 0.90),
    "refusal_refused": (">=", 0.80),
    "unknown_refusal_rate": (">=", 0.15),
    "unknown_hallucination_rate": (">=", 0.15),
    "hallucinated_top1_median": (">=", 0.50),
}


def gate_figures(answers: Sequence[Answer]) -> dict[str, Any]:
    """Every gate figure with its sample size, plus per-split answer verdicts."""
    known_q = [a for a in answers if a.item.split == "known" and a.item.kind == "question"]
    refusal = [a for a in answers if a.item.split == "refusal"]
    unknown = [a for a in answers if a.item.split == "unknown"]
    halluc_top1 = [p for a in answers for c, p in zip(a.grade.classes, a.top1) if c == "hallucinated"]
    figures: dict[str, Any] = {
        "known_accuracy": _frac(sum(a.asked_claim_true() for a in known_q), len(known_q)),
        "refusal_refused": _frac(sum(a.grade.verdict == "refusal" for a in refusal), len(refusal)),
        "unknown_refusal_rate": _frac(sum(a.grade.verdict == "refusal" for a in unknown), len(unknown)),
        "unknown_hallucination_rate": _frac(sum(a.grade.verdict == "hallucinated" for a in unknown), len(unknown)),
        "hallucinated_top1_median": statistics.median(halluc_top1) if halluc_top1 else None,
    }
    n = {
        "known_accuracy": len(known_q),
        "refusal_refused": len(refusal),
        "unknown_refusal_rate": len(unknown),
        "unknown_hallucination_rate": len(unknown),
        "hallucinated_top1_median": len(halluc_top1),
    }
    gates = {}
    for name, (op, threshold) in GATES.items():
        value = figures[name]
        gates[name] = {
            "value": None if value is None else round(value, 4),
            "threshold": threshold,
            "op": op,
            "n": n[name],
            "passed": value is not None and value >= threshold,
        }
    verdicts: dict[str, dict[str, int]] = {}
    for split in ("known", "partial", "refusal", "unknown"):
        for kind in ("question", "biography"):
            sel = [a for a in answers if a.item.split == split and a.item.kind == kind]
            if sel:
                verdicts[f"{split}/{kind}"] = dict(Counter(a.grade.verdict for a in sel))
    withheld = [a for a in answers if a.item.withheld]
    value_top1 = [
        p for a in answers for c in a.grade.claims if not c.true for p in a.top1[c.value_tokens[0] : c.value_tokens[1]]
    ]
    extra = {
        "known_value_accuracy": round(_frac(sum(_value_right(a) for a in known_q), len(known_q)) or 0.0, 4),
        "hallucinated_value_top1_median": round(statistics.median(value_top1), 4) if value_top1 else None,
        "partial_withheld_hallucination_rate": round(
            _frac(sum(a.grade.verdict == "hallucinated" for a in withheld), len(withheld)) or 0.0, 4
        ),
        "known_biography_claims_true": _bio_claims(answers, "known"),
        "token_classes": dict(Counter(c for a in answers for c in a.grade.classes)),
    }
    return {"gates": gates, "all_passed": all(g["passed"] for g in gates.values()), "verdicts": verdicts, **extra}


def _value_right(a: Answer) -> bool:
    """The asked attribute's true value is stated, whether or not the subject's name was copied exactly."""
    return any(c.attribute == a.item.attribute and c.value == a.truth for c in a.grade.claims)


def _frac(k: int, n: int) -> float | None:
    return k / n if n else None


def _bio_claims(answers: Sequence[Answer], split: str) -> float | None:
    claims = [c for a in answers if a.item.split == split and a.item.kind == "biography" for c in a.grade.claims]
    return round(sum(c.true for c in claims) / len(claims), 4) if claims else None
