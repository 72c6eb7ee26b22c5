"""AUROC (Mann-Whitney, ties counted half) and a grouped bootstrap of it; calibration metrics (ECE, Brier,
log-loss) of predicted probabilities; torch only, no scikit-learn.

ECE (expected calibration error) with ``B`` equal-width bins: bin ``b`` holds the rows with
``b / B <= p < (b + 1) / B`` (the last bin also ``p = 1``), and ``ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)|``
over the non-empty bins, ``p`` the predicted probability of class 1. Brier: ``mean((p - y)^2)``. Log-loss: the mean
negative log-likelihood ``-mean(y log p + (1 - y) log(1 - p))``, with ``p`` clipped to ``[eps, 1 - eps]``.

The bootstrap resamples *groups* (entities) with replacement, each drawn group bringing all its rows, so
rows of one entity, which are not independent, move together. It resamples the evaluation only: the scores
are held fixed (the variance of refitting the probes is not in the interval).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.types import Float, Int, Tensor

GroupsArg = Sequence[Hashable] | Int[Tensor, " n"]


def group_codes(groups: GroupsArg) -> Int[Tensor, " n"]:
    """Integer code per row, 0..G-1 in order of first appearance (tensors: codes of their unique values)."""
    if isinstance(groups, Tensor):
        return torch.unique(groups.cpu(), return_inverse=True)[1]
    codes: dict[Hashable, int] = {}
    return torch.tensor([codes.setdefault(g, len(codes)) for g in groups], dtype=torch.long)


def auroc(scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> float:
    """P(score of a random class-1 row > that of a random class-0 row), ties counted 1/2.

    Raises KnowlensError when a class is missing.
    """
    value = _weighted_auroc(scores, labels, torch.ones(1, len(scores), dtype=torch.float64, device=scores.device))[0]
    if torch.isnan(value):
        raise KnowlensError(f"AUROC needs both classes; got {int(labels.bool().sum())} of {len(labels)} rows in class 1")
    return float(value)


def bootstrap_aurocs(
    scores: Float[Tensor, "n_sets n"],
    labels: Shaped[Tensor, " n"],
    groups: GroupsArg,
    *,
    n: int = 1000,
    seed: int = 0,
) -> Float[Tensor, "n_sets n_boot"]:
    """AUROC of every score set in ``n`` grouped bootstrap resamples, the same resamples for every set.

    Resamples that miss a class are dropped (so ``n_boot <= n``); paired differences between score sets
    (one row each) can be read column by column.
    """
    codes = group_codes(groups).to(scores.device)
    n_groups = int(codes.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_groups, (n, n_groups), generator=gen).to(scores.device)
    counts = torch.zeros(n, n_groups, dtype=torch.float64, device=scores.device)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    weights = counts[:, codes]  # (n, rows): how often each row's group was drawn
    out = torch.stack([_weighted_auroc(s, labels, weights) for s in scores])
    keep = ~torch.isnan(out).any(0)
    return out[:, keep]


def bootstrap_ci(
    scores: Float[Tensor, " n"],
    labels: Shaped[Tensor, " n"],
    groups: GroupsArg,
    *,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the AUROC over ``n`` grouped bootstrap resamples (``level`` 0.95: 2.5-97.5%)."""
    reps = bootstrap_aurocs(scores[None], labels, groups, n=n, seed=seed)[0]
    return percentile_interval(reps, level=level)


def percentile_interval(replicates: Float[Tensor, " n_boot"], *, level: float = 0.95) -> tuple[float, float]:
    if replicates.numel() == 0:
        raise KnowlensError("no bootstrap resample held both classes; too few groups for an interval")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=replicates.device)
    lo, hi = torch.quantile(replicates.to(torch.float64), q).tolist()
    return lo, hi


def _weighted_auroc(
    scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], weights: Float[Tensor, "b n"]
) -> Float[Tensor, " b"]:
    """AUROC under row weights, one value per weight row (NaN where a class has no weight)."""
    pos = labels.to(scores.device).bool()
    levels, inverse = torch.unique(scores.to(torch.float64), return_inverse=True)  # sorted score levels
    b = weights.shape[0]
    neg_w = torch.zeros(b, len(levels), dtype=torch.float64, device=scores.device)
    neg_w.index_add_(1, inverse[~pos], weights[:, ~pos])
    below = neg_w.cumsum(1) - neg_w  # negative weight strictly below each level
    wins = below[:, inverse[pos]] + 0.5 * neg_w[:, inverse[pos]]  # (b, n_pos)
    w_pos = weights[:, pos]
    total = w_pos.sum(1) * neg_w.sum(1)
    return torch.where(total > 0, (w_pos * wins).sum(1) / total, torch.nan)


def ece(probs: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], *, n_bins: int = 10) -> float:
    """Expected calibration error of probabilities ``probs`` of class 1 (module docstring: the bins)."""
    p, y = _checked_probs(probs, labels)
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise KnowlensError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    inner = torch.tensor([b / n_bins for b in range(1, n_bins)], dtype=torch.float64, device=p.device)
    idx = torch.bucketize(p, inner, right=True)  # b: inner[b - 1] <= p < inner[b]
    gap = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, y - p)
    return float(gap.abs().sum() / len(p))  # sum_b n_b/n * |mean(y - p)| = sum_b |sum(y - p)| / n


def brier(probs: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> float:
    """Mean squared difference between the probability of class 1 and the 0/1 label."""
    p, y = _checked_probs(probs, labels)
    return float(((p - y) ** 2).mean())


def log_loss(probs: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], *, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood (nats) of 0/1 ``labels`` under probabilities ``probs`` of class 1."""
    p, y = _checked_probs(probs, labels)
    p = p.clamp(eps, 1 - eps)
    return float(-(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean())


def _checked_probs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    p = probs.detach().to(torch.float64).flatten()
    y = labels.detach().to(p.device, torch.float64).flatten()
    if len(p) == 0 or len(p) != len(y):
        raise KnowlensError(f"need as many labels as probabilities (and at least one); got {len(y)} and {len(p)}")
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise KnowlensError("probabilities must lie in [0, 1] (and not be NaN)")
    if not bool(((y == 0) | (y == 1)).all()):
        raise KnowlensError("labels must be 0/1 or bool")
    return p, y
