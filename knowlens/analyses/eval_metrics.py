"""Detection and calibration metrics of `knowlens.analyses.evaluation`, each also under row weights (a grouped
bootstrap is a weight per row: how often its group was drawn), so every interval comes from one set of resamples.

Conventions (``scores``: higher = more likely class 1, the class to detect; ``labels``: 0/1):

* **AUROC**: P(score of a random class-1 row > that of a random class-0 row), ties counted 1/2 (as
  `knowlens.probes.auroc`).
* **AUPRC** (average precision, as scikit-learn's ``average_precision_score``): thresholds at every distinct score,
  flagging the rows with ``score >= t``; ``AP = sum_t (R_t - R_t') P_t`` (recall gained times the precision at that
  threshold), with no interpolation.
* **Recall at ``max_fpr`` false-positive rate**: the largest true-positive rate over the same thresholds whose
  false-positive rate is ``<= max_fpr`` (0 if none); no interpolation between thresholds.
* **ECE** (10 equal-width bins, as `knowlens.probes.ece`) and **Brier** of probabilities ``probs`` of class 1.
* **Risk-coverage** (`risk_coverage`): items (answers) ranked by a reliability score, the least reliable abstained
  from first; at coverage ``k / n`` the accuracy of the ``k`` kept. Items of equal reliability are kept in a random
  order, and the curve is its expectation: at ``k`` within a tie group the kept part of the group contributes its
  mean accuracy times the number kept. The **area** is the mean accuracy over ``k = 1 .. n`` (1 - the area is the
  AURC of the selective-prediction literature); with weights, each item counts as many times as its weight
  (integer weights: exact, through harmonic numbers).

Resamples whose metric is undefined (a class missing) give NaN; `interval` drops them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.probes import group_codes
from knowlens.types import Float, Tensor

N_BINS = 10
MAX_FPR = 0.10


def bootstrap_weights(groups: Sequence[Hashable], *, n: int, seed: int) -> Float[Tensor, "n_boot rows"]:
    """Row weights of ``n`` grouped bootstrap resamples: each resample draws the groups with replacement and a row
    weighs how often its group was drawn (a `torch.Generator` seeded with ``seed``)."""
    codes = group_codes(groups)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n < 1 or n_groups == 0:
        return torch.zeros(0, len(codes), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_groups, (n, n_groups), generator=gen)
    counts = torch.zeros(n, n_groups, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return counts[:, codes]


def interval(replicates: Float[Tensor, " n_boot"], *, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the finite replicates (None when none is)."""
    r = replicates[torch.isfinite(replicates)].to(torch.float64)
    if r.numel() == 0:
        return None
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(r, q).tolist()
    return lo, hi


def _ones(n: int) -> Tensor:
    return torch.ones(1, n, dtype=torch.float64)


def _levels(scores: Tensor, labels: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per distinct score level, highest first: class-1 and class-0 weight, ``(b, L)`` each."""
    s = scores.detach().to(torch.float64).cpu()
    y = labels.detach().cpu().bool()
    levels, inverse = torch.unique(s, return_inverse=True)  # ascending
    order = len(levels) - 1 - inverse  # descending level index
    w = weights.to(torch.float64)
    pos = torch.zeros(w.shape[0], len(levels), dtype=torch.float64).index_add_(1, order[y], w[:, y])
    neg = torch.zeros(w.shape[0], len(levels), dtype=torch.float64).index_add_(1, order[~y], w[:, ~y])
    return pos, neg


def weighted_auroc(
    scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], weights: Float[Tensor, "b n"]
) -> Float[Tensor, " b"]:
    """AUROC under each row of weights (NaN where a class has no weight)."""
    pos, neg = _levels(scores, labels, weights)
    below = neg.sum(1, keepdim=True) - neg.cumsum(1)  # class-0 weight strictly below each level
    wins = (pos * (below + 0.5 * neg)).sum(1)
    total = pos.sum(1) * neg.sum(1)
    return torch.where(total > 0, wins / total.clamp(min=1e-300), torch.nan)


def weighted_average_precision(
    scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], weights: Float[Tensor, "b n"]
) -> Float[Tensor, " b"]:
    """Average precision (AUPRC) under each row of weights (NaN without class-1 weight)."""
    pos, neg = _levels(scores, labels, weights)
    tp, fp = pos.cumsum(1), neg.cumsum(1)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1e-300), 0.0)
    total = pos.sum(1)
    return torch.where(total > 0, (pos * precision).sum(1) / total.clamp(min=1e-300), torch.nan)


def weighted_recall_at_fpr(
    scores: Float[Tensor, " n"],
    labels: Shaped[Tensor, " n"],
    weights: Float[Tensor, "b n"],
    *,
    max_fpr: float = MAX_FPR,
) -> Float[Tensor, " b"]:
    """The best recall (true-positive rate) at a false-positive rate ``<= max_fpr``, under each row of weights."""
    pos, neg = _levels(scores, labels, weights)
    tp, fp = pos.cumsum(1), neg.cumsum(1)
    p_tot, n_tot = pos.sum(1, keepdim=True), neg.sum(1, keepdim=True)
    ok = fp <= max_fpr * n_tot * (1 + 1e-12)
    best = torch.where(ok, tp, 0.0).max(1).values
    defined = (p_tot[:, 0] > 0) & (n_tot[:, 0] > 0)
    return torch.where(defined, best / p_tot[:, 0].clamp(min=1e-300), torch.nan)


def weighted_ece(
    probs: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], weights: Float[Tensor, "b n"], *, n_bins: int = N_BINS
) -> Float[Tensor, " b"]:
    """ECE (equal-width bins) of probabilities of class 1 under each row of weights."""
    p, y = _probs(probs, labels)
    inner = torch.tensor([b / n_bins for b in range(1, n_bins)], dtype=torch.float64)
    idx = torch.bucketize(p, inner, right=True)
    w = weights.to(torch.float64)
    gap = torch.zeros(w.shape[0], n_bins, dtype=torch.float64).index_add_(1, idx, w * (y - p))
    total = w.sum(1)
    return torch.where(total > 0, gap.abs().sum(1) / total.clamp(min=1e-300), torch.nan)


def weighted_brier(
    probs: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], weights: Float[Tensor, "b n"]
) -> Float[Tensor, " b"]:
    """Brier score of probabilities of class 1 under each row of weights."""
    p, y = _probs(probs, labels)
    w = weights.to(torch.float64)
    total = w.sum(1)
    return torch.where(total > 0, (w * (p - y) ** 2).sum(1) / total.clamp(min=1e-300), torch.nan)


def _probs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    p = probs.detach().to(torch.float64).cpu()
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise KnowlensError("probabilities must lie in [0, 1] (and not be NaN)")
    return p, labels.detach().cpu().to(torch.float64)


def weighted_rc_area(
    reliability: Float[Tensor, " n"], correct: Shaped[Tensor, " n"], weights: Float[Tensor, "b n"]
) -> Float[Tensor, " b"]:
    """Area under the risk-coverage (accuracy-coverage) curve, per row of integer weights (module docstring)."""
    pos, neg = _levels(reliability, correct, weights)  # most reliable level first
    w_g, c_g = pos + neg, pos
    w_before = w_g.cumsum(1) - w_g
    c_before = c_g.cumsum(1) - c_g
    beta = torch.where(w_g > 0, c_g / w_g.clamp(min=1e-300), 0.0)
    alpha = c_before - w_before * beta
    # sum_{t=1..w_g} (C + t beta) / (W + t) = alpha (H(W + w_g) - H(W)) + c_g, H the harmonic numbers
    harmonic = torch.digamma(w_before + w_g + 1) - torch.digamma(w_before + 1)
    total = w_g.sum(1)
    area = (alpha * harmonic + c_g).sum(1)
    return torch.where(total > 0, area / total.clamp(min=1e-300), torch.nan)


# ------------------------------------------------------------------------------------------ unweighted forms


def average_precision(scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> float:
    """Average precision (AUPRC) of ``scores`` for class 1 (module docstring); KnowlensError without class 1."""
    value = float(weighted_average_precision(scores, labels, _ones(len(scores)))[0])
    if value != value:
        raise KnowlensError("average precision needs at least one row of class 1")
    return value


def recall_at_fpr(scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], *, max_fpr: float = MAX_FPR) -> float:
    """The best recall at a false-positive rate ``<= max_fpr``; KnowlensError when a class is missing."""
    value = float(weighted_recall_at_fpr(scores, labels, _ones(len(scores)), max_fpr=max_fpr)[0])
    if value != value:
        raise KnowlensError("recall at a false-positive rate needs both classes")
    return value


def risk_coverage(
    reliability: Float[Tensor, " n"], correct: Shaped[Tensor, " n"]
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], float]:
    """``(coverage, accuracy, area)``: coverage ``k / n`` for ``k = 1 .. n`` (items kept most reliable first), the
    expected accuracy of the ``k`` kept (ties in a random order), and the area (their mean)."""
    n = len(reliability)
    if n == 0:
        raise KnowlensError("a risk-coverage curve needs at least one item")
    pos, neg = _levels(reliability, correct, _ones(n))
    sizes, hits = (pos + neg)[0], pos[0]
    acc = torch.empty(n, dtype=torch.float64)
    start, c_before = 0, 0.0
    for size, hit in zip(sizes.long().tolist(), hits.tolist()):
        t = torch.arange(1, size + 1, dtype=torch.float64)
        acc[start : start + size] = (c_before + t * hit / size) / (start + t)
        start, c_before = start + size, c_before + hit
    coverage = torch.arange(1, n + 1, dtype=torch.float64) / n
    return coverage, acc, float(acc.mean())


def roc_points(scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> tuple[list[float], list[float]]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    pos, neg = _levels(scores, labels, _ones(len(scores)))
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), pos[0].cumsum(0) / pos[0].sum().clamp(min=1)])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), neg[0].cumsum(0) / neg[0].sum().clamp(min=1)])
    return fpr.tolist(), tpr.tolist()


def reliability_bins(
    probs: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], *, n_bins: int = N_BINS
) -> list[dict[str, float | int]]:
    """Per non-empty equal-width bin: its mean probability, the observed frequency of class 1 and its row count."""
    p, y = _probs(probs, labels)
    inner = torch.tensor([b / n_bins for b in range(1, n_bins)], dtype=torch.float64)
    idx = torch.bucketize(p, inner, right=True)
    out: list[dict[str, float | int]] = []
    for b in range(n_bins):
        m = idx == b
        if bool(m.any()):
            out.append({"bin": b, "mean_p": float(p[m].mean()), "observed": float(y[m].mean()), "n": int(m.sum())})
    return out

