"""AUROC (Mann-Whitney, ties counted half) and a grouped bootstrap of it; torch only, no scikit-learn.

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
