"""Statistics the feature locators share, in torch on the data's device: Spearman's rho over sparse latent
activations (ranks from the nonzero entries only, ties averaged) and ridge regression with a held-out split and an
inner cross-validation, both grouped (a group, e.g. a sequence, never on both sides). Definitions: the docstring
of `knowlens.saes.surprise`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from knowlens.errors import KnowlensError
from knowlens.types import Bool, Float, Int, Tensor

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # features standardised: scale-free


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class RidgeFit:
    """A ridge direction predicting a target from raw features: ``ŷ = intercept + x · direction``."""

    direction: Float[Tensor, " d"]
    intercept: float
    l2: float
    r2: float  # held out
    pearson: float  # held out
    cv_mse: tuple[float, ...]  # inner cross-validation, per grid value
    test: Bool[Tensor, " n"]  # the held-out rows


def spearman(x: Float[Tensor, "n m"], y: Float[Tensor, " n"]) -> Float[Tensor, " m"]:
    """Spearman's rho of every column of ``x`` with ``y`` (ties averaged; NaN for a constant column), float64."""
    r, c = torch.nonzero(x, as_tuple=True)
    return spearman_sparse(r, c, x[r, c], y, x.shape[1])


def grouped_holdout(groups: Int[Tensor, " n"], holdout: float, *, seed: int = 0) -> Bool[Tensor, " n"]:
    """Rows of a random ``holdout`` fraction of the groups (at least 1, leaving at least 2 for training)."""
    if not (isinstance(holdout, (int, float)) and 0 < holdout < 1):
        raise KnowlensError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    unique, codes = torch.unique(groups.cpu(), return_inverse=True)
    k = len(unique)
    if k < 3:
        raise KnowlensError(f"a held-out split grouped by sequence needs 3 or more sequences; got {k}")
    n_test = min(max(1, round(holdout * k)), k - 2)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    is_test = torch.zeros(k, dtype=torch.bool)
    is_test[perm[:n_test]] = True
    return is_test[codes].to(groups.device)


def ridge_fit(
    x: Float[Tensor, "n d"],
    y: Float[Tensor, " n"],
    groups: Int[Tensor, " n"],
    *,
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    holdout: float = 0.3,
    folds: int = 5,
    seed: int = 0,
) -> RidgeFit:
    """Ridge regression of ``y`` on standardised ``x`` with a held-out split and inner CV both grouped by
    ``groups`` (module docstring); float64 on ``x``'s device (the CPU for MPS, which has no float64)."""
    grid = tuple(float(v) for v in l2_grid)
    if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
        raise KnowlensError(f"ridge_l2_grid must be positive numbers, got {l2_grid!r}")
    if not isinstance(folds, int) or folds < 2:
        raise KnowlensError(f"folds must be an integer >= 2, got {folds!r}")
    dev = torch.device("cpu") if x.device.type == "mps" else x.device
    x, y, groups = x.to(dev, torch.float64), y.to(dev, torch.float64), groups.to(dev)
    test = grouped_holdout(groups, holdout, seed=seed)
    train = ~test
    fold = _grouped_folds(groups[train], folds, seed=seed)
    xt, yt = x[train], y[train]
    sse = torch.zeros(len(grid), dtype=torch.float64, device=dev)
    for f in range(int(fold.max()) + 1):
        inner = fold != f
        mu, sd = _scale(xt[inner])
        w = _ridge_path((xt[inner] - mu) / sd, yt[inner] - yt[inner].mean(), grid)  # (G, d)
        pred = yt[inner].mean() + ((xt[~inner] - mu) / sd) @ w.T  # (n_val, G)
        sse += ((pred - yt[~inner, None]) ** 2).sum(0)
    cv_mse = sse / len(yt)
    best = min(range(len(grid)), key=lambda i: (float(cv_mse[i]), -grid[i]))  # ties: the stronger penalty
    mu, sd = _scale(xt)
    w = _ridge_path((xt - mu) / sd, yt - yt.mean(), (grid[best],))[0]
    direction = w / sd
    intercept = float(yt.mean() - direction @ mu)
    pred, target = intercept + x[test] @ direction, y[test]
    sst = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - float(((target - pred) ** 2).sum()) / sst if sst > 0 else math.nan
    return RidgeFit(direction=direction, intercept=intercept, l2=grid[best], r2=r2, pearson=_pearson(pred, target),
                    cv_mse=tuple(float(v) for v in cv_mse), test=test)  # fmt: skip


def _segment_ranks(cols: Tensor, vals: Tensor) -> Tensor:
    """Rank (1-based, ties averaged) of each entry among the entries of its column."""
    k = len(vals)
    if k == 0:
        return torch.zeros(0, dtype=torch.float64, device=vals.device)
    o1 = torch.argsort(vals, stable=True)
    order = o1[torch.argsort(cols[o1], stable=True)]  # by column, then value
    c, v = cols[order], vals[order]
    new_seg = torch.ones(k, dtype=torch.bool, device=vals.device)
    new_seg[1:] = c[1:] != c[:-1]
    new_run = new_seg.clone()
    new_run[1:] |= v[1:] != v[:-1]
    pos = torch.arange(k, device=vals.device)
    seg_start = torch.cummax(torch.where(new_seg, pos, 0), 0).values
    run_start = torch.cummax(torch.where(new_run, pos, 0), 0).values
    run_id = torch.cumsum(new_run, 0) - 1
    run_len = torch.bincount(run_id).double()
    ranks = torch.empty(k, dtype=torch.float64, device=vals.device)
    ranks[order] = (run_start - seg_start).double() + (run_len[run_id] + 1) / 2
    return ranks


def spearman_sparse(rows: Tensor, cols: Tensor, vals: Tensor, y: Tensor, m: int) -> Tensor:
    """Spearman's rho of each of ``m`` columns of an (n, m) matrix given by its nonzero entries, with ``y`` (n).

    The zeros of column j (``n0`` of them) tie at rank ``n_neg + (n0 + 1) / 2``; a positive entry's rank is
    ``n0`` plus its rank among the column's nonzeros. Mean rank is ``(n + 1) / 2`` whatever the ties, so with
    ``q`` the centred ranks of ``y``: ``cov_j = Σ_nonzero (R - R_zero) q`` and the zeros add to the variance only.
    """
    n = len(y)
    dev = y.device
    rows, cols, vals = rows.to(dev), cols.to(dev), vals.to(dev)
    q = _segment_ranks(torch.zeros(n, dtype=torch.long, device=dev), y) - (n + 1) / 2
    var_q = float((q * q).sum())
    n0 = n - torch.bincount(cols, minlength=m).double()
    n_neg = torch.bincount(cols[vals < 0], minlength=m).double()
    zero_rank = n_neg + (n0 + 1) / 2
    full = _segment_ranks(cols, vals) + torch.where(vals > 0, n0[cols], 0.0)
    zeros = torch.zeros(m, dtype=torch.float64, device=dev)
    cov = zeros.index_add(0, cols, (full - zero_rank[cols]) * q[rows])
    mean = (n + 1) / 2
    var_r = n0 * (zero_rank - mean) ** 2 + zeros.index_add(0, cols, (full - mean) ** 2)
    if var_q <= 0:
        return torch.full((m,), math.nan, dtype=torch.float64, device=dev)
    return torch.where(var_r > 0, cov / torch.sqrt(var_r * var_q), math.nan)


def _grouped_folds(groups: Tensor, k: int, *, seed: int) -> Tensor:
    """Fold of each row (0..k'-1, k' = min(k, groups)); every group in one fold, folds balanced by row count."""
    unique, codes, counts = torch.unique(groups.cpu(), return_inverse=True, return_counts=True)
    k = min(k, len(unique))
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed + 1))
    perm = perm[torch.argsort(counts[perm], descending=True, stable=True)]
    load = [0] * k
    fold_of = torch.empty(len(unique), dtype=torch.long)
    for g in perm.tolist():
        f = min(range(k), key=lambda i: load[i])
        fold_of[g] = f
        load[f] += int(counts[g])
    return fold_of[codes].to(groups.device)


def _scale(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(0)
    sd = x.std(0, correction=0)
    return mu, torch.where(sd > 0, sd, torch.ones_like(sd))


def _ridge_path(xs: Tensor, yc: Tensor, grid: tuple[float, ...]) -> Tensor:
    """(G, d): ``(xs'xs/n + l2 I)^-1 xs'yc/n`` for each l2 of ``grid``, from one eigendecomposition."""
    n = xs.shape[0]
    evals, evecs = torch.linalg.eigh(xs.T @ xs / n)
    proj = evecs.T @ (xs.T @ yc / n)
    lam = torch.tensor(grid, dtype=torch.float64, device=xs.device)
    return (proj / (evals.clamp(min=0) + lam[:, None])) @ evecs.T


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def auroc(scores: Float[Tensor, " n"], labels: Tensor) -> float:
    """Mann-Whitney AUROC: P(score of a random positive > that of a random negative), ties counted 1/2, from
    the average ranks of ``scores``; NaN when a class is missing."""
    s, y = scores.double().flatten(), labels.bool().flatten().to(scores.device)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = _segment_ranks(torch.zeros(len(s), dtype=torch.long, device=s.device), s)
    return (float(ranks[y].sum()) - n1 * (n1 + 1) / 2) / (n1 * n0)


def column_aurocs(scores: Float[Tensor, "n m"], labels: Tensor) -> Float[Tensor, " m"]:
    """`auroc` of every column of ``scores`` against the same ``labels``, from within-column average ranks; NaNs
    when a class is missing."""
    s, y = scores.double(), labels.bool().flatten().to(scores.device)
    n, m = s.shape
    n1 = int(y.sum())
    n0 = n - n1
    if n1 == 0 or n0 == 0:
        return torch.full((m,), math.nan, dtype=torch.float64)
    cols = torch.arange(m, device=s.device).repeat(n)
    ranks = _segment_ranks(cols, s.flatten()).view(n, m)
    return ((ranks[y].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)).cpu()


def auroc_interval(
    scores: Float[Tensor, " n"], labels: Tensor, *, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of `auroc` over ``n`` bootstrap resamples of the rows, drawn within each class (one
    row per entity: every resample keeps both classes at their sizes); NaNs when a class is missing."""
    s, y = scores.double().flatten().cpu(), labels.bool().flatten().cpu()
    pos, neg = torch.nonzero(y).flatten(), torch.nonzero(~y).flatten()
    if len(pos) == 0 or len(neg) == 0:
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    target = torch.cat([torch.ones(len(pos), dtype=torch.bool), torch.zeros(len(neg), dtype=torch.bool)])
    reps = torch.tensor([
        auroc(torch.cat([s[pos[torch.randint(len(pos), (len(pos),), generator=gen)]],
                         s[neg[torch.randint(len(neg), (len(neg),), generator=gen)]]]), target)
        for _ in range(n)
    ], dtype=torch.float64)  # fmt: skip
    lo, hi = torch.quantile(reps, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def welch_t(a: Float[Tensor, "n1 m"], b: Float[Tensor, "n0 m"]) -> Float[Tensor, " m"]:
    """Welch's t of every column, ``(mean_a - mean_b) / sqrt(var_a / n1 + var_b / n0)`` (sample variances),
    float64: 0 where both means and variances are equal and zero-spread, ±inf for different constant columns,
    NaN when a side has fewer than 2 rows."""
    a, b = a.double(), b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        return torch.full((a.shape[1],), math.nan, dtype=torch.float64, device=a.device)
    diff = a.mean(0) - b.mean(0)
    se = torch.sqrt(a.var(0, correction=1) / a.shape[0] + b.var(0, correction=1) / b.shape[0])
    inf = torch.sign(diff) * math.inf
    return torch.where(se > 0, diff / se.clamp(min=torch.finfo(torch.float64).tiny), torch.where(diff == 0, 0.0, inf))
