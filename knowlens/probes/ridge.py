"""Ridge probes for continuous targets, closed form, fitted in torch (float64) on the data's device.

Objective, on features standardised with the training rows' mean and standard deviation ``z = (x - mean) / std``:

    (1 / n) sum_i (y_i - b - w . z_i)^2 + l2 * ||w||^2        (the intercept b = mean(y) is not penalised)

solved as ``w = (Z'Z / n + l2 I)^-1 Z'(y - mean(y)) / n`` for every strength of a grid from one eigendecomposition
(`knowlens.saes.stats`, shared with the surprise locator): scikit-learn's ``Ridge(alpha=n * l2)`` on the same
standardised features. The strength is chosen by an inner cross-validation grouped like the outer one (lowest
mean squared error, ties to the stronger penalty); `cross_validate_ridge` gives every row a prediction from a
probe that never saw its group. The devices without float64 (MPS) compute on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from knowlens.errors import KnowlensError
from knowlens.probes.cv import grouped_folds
from knowlens.probes.metrics import GroupsArg, group_codes
from knowlens.saes.stats import DEFAULT_L2_GRID, _ridge_path, _scale
from knowlens.types import Float, Int, Tensor

RIDGE_L2_GRID = DEFAULT_L2_GRID  # features standardised: scale-free


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class RidgeProbe:
    """A fitted ridge probe. ``weight`` acts on standardised features ``(x - mean) / std``; ``bias`` is mean(y)."""

    weight: Float[Tensor, " d"]
    bias: float
    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    l2: float

    def predict(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """``w . (x - mean) / std + b`` of every row."""
        Z = (X.to(self.mean.device, self.mean.dtype) - self.mean) / self.std
        return Z @ self.weight + self.bias

    decision = predict

    @property
    def raw_weight(self) -> Float[Tensor, " d"]:
        """The weight on unstandardised features (``predict = X @ raw_weight + raw_bias``)."""
        return self.weight / self.std

    @property
    def raw_bias(self) -> float:
        return self.bias - float((self.mean / self.std) @ self.weight)


@dataclass(frozen=True, eq=False)
class RidgeCVResult:
    """Out-of-fold predictions of every row, the fold each row was tested in, the L2 chosen per fold, and the
    pooled out-of-fold R^2 (``1 - SSE / SST``, SST about the mean of all rows), Pearson r and mean squared error."""

    predictions: Float[Tensor, " n"]
    fold: Int[Tensor, " n"]
    l2: tuple[float, ...]
    r2: float
    pearson: float
    mse: float


def fit_ridge(X: Float[Tensor, "n d"], y: Float[Tensor, " n"], *, l2: float) -> RidgeProbe:
    """Fit one ridge probe of strength ``l2`` (> 0)."""
    return fit_ridge_path(X, y, l2_grid=(l2,))[0]


def fit_ridge_path(X: Float[Tensor, "n d"], y: Float[Tensor, " n"], *, l2_grid: Sequence[float]) -> list[RidgeProbe]:
    """One probe per strength in ``l2_grid`` (same standardisation). KnowlensError for a non-positive strength,
    fewer than 2 rows, or non-finite features or targets."""
    Xd, yd = _checked(X, y)
    lams = _grid(l2_grid)
    mean, std = _scale(Xd)
    W = _ridge_path((Xd - mean) / std, yd - yd.mean(), lams)
    return [RidgeProbe(weight=W[j].clone(), bias=float(yd.mean()), mean=mean, std=std, l2=lams[j]) for j in range(len(lams))]


def select_ridge_l2(
    X: Float[Tensor, "n d"],
    y: Float[Tensor, " n"],
    groups: GroupsArg,
    *,
    l2_grid: Sequence[float] = RIDGE_L2_GRID,
    k: int = 3,
    seed: int = 0,
) -> tuple[float, Float[Tensor, " n_l2"]]:
    """The strength with the lowest grouped ``k``-fold mean squared error on these rows, and every strength's MSE
    (``k`` lowered to the number of groups when that is smaller; ties go to the stronger penalty)."""
    Xd, yd = _checked(X, y)
    grid = _grid(l2_grid)
    codes = group_codes(groups)
    k = min(k, int(codes.max()) + 1)
    folds = grouped_folds(codes, k, seed=seed).to(Xd.device)
    sse = torch.zeros(len(grid), dtype=torch.float64, device=Xd.device)
    for f in range(k):
        tr, te = folds != f, folds == f
        pred = torch.stack([p.predict(Xd[te]) for p in fit_ridge_path(Xd[tr], yd[tr], l2_grid=grid)])
        sse += ((pred - yd[te]) ** 2).sum(1)
    mse = sse / len(yd)
    best = min(range(len(grid)), key=lambda i: (float(mse[i]), -grid[i]))
    return grid[best], mse


def cross_validate_ridge(
    X: Float[Tensor, "n d"],
    y: Float[Tensor, " n"],
    groups: GroupsArg,
    *,
    l2_grid: Sequence[float] = RIDGE_L2_GRID,
    k: int = 5,
    inner_k: int = 3,
    seed: int = 0,
) -> RidgeCVResult:
    """Out-of-fold predictions from ``k`` folds grouped by ``groups``, the strength chosen inside each training fold."""
    Xd, yd = _checked(X, y)
    codes = group_codes(groups)
    folds = grouped_folds(codes, k, seed=seed)
    dev_folds = folds.to(Xd.device)
    pred = torch.zeros_like(yd)
    l2s: list[float] = []
    for f in range(k):
        tr, te = dev_folds != f, dev_folds == f
        l2, _ = select_ridge_l2(Xd[tr], yd[tr], codes[folds != f], l2_grid=l2_grid, k=inner_k, seed=seed + 1 + f)
        pred[te] = fit_ridge(Xd[tr], yd[tr], l2=l2).predict(Xd[te])
        l2s.append(l2)
    return RidgeCVResult(pred.cpu(), folds, tuple(l2s), *regression_metrics(pred, yd))


def regression_metrics(pred: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> tuple[float, float, float]:
    """(R^2, Pearson r, MSE) of predictions ``pred`` of ``y``; NaN where undefined (a constant side)."""
    pred, y = pred.to(torch.float64), y.to(pred.device, torch.float64)
    sse = float(((y - pred) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    a, b = pred - pred.mean(), y - y.mean()
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return (1 - sse / sst if sst > 0 else math.nan, float((a * b).sum()) / den if den > 0 else math.nan, sse / len(y))


def _grid(l2_grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(v) for v in l2_grid)
    if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
        raise KnowlensError(f"l2 strengths must be finite and > 0, got {list(l2_grid)}")
    return grid


def _checked(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    dev = torch.device("cpu") if X.device.type == "mps" else X.device
    Xd, yd = X.to(dev, torch.float64), y.to(dev, torch.float64)
    if Xd.ndim != 2 or yd.shape != (Xd.shape[0],) or Xd.shape[0] < 2:
        raise KnowlensError(f"a ridge probe needs (n, d) features and n targets, n >= 2; got {tuple(X.shape)} and "
                            f"{tuple(y.shape)}")  # fmt: skip
    if not bool(torch.isfinite(Xd).all()):
        raise KnowlensError("probe features contain NaN or infinite values")
    if not bool(torch.isfinite(yd).all()):
        raise KnowlensError("ridge targets contain NaN or infinite values")
    return Xd, yd
