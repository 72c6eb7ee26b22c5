"""`fit_probe`: one call from a feature matrix and labels to a probe ready to save, with honest figures.

* ``logistic`` (0/1 labels): out-of-fold logits from ``k`` folds grouped by ``groups`` (stratified), the L2 strength
  chosen inside each training fold (`cross_validate`); the final probe fitted on every row with the strength an
  inner grouped CV on every row chooses (`select_l2`); class weights as `fit_logistic`; the calibrator (temperature
  or Platt, default Platt) fitted on the out-of-fold logits, i.e. on scores of rows the scoring probe never saw.
  Metrics: out-of-fold AUROC with a grouped bootstrap interval; ECE, Brier and log-loss of the uncalibrated
  ``sigmoid(logit)`` and of *cross-fitted* calibrated probabilities (each fold calibrated by a calibrator fitted on
  the other folds' out-of-fold logits, `knowlens.probes.calibration.cross_fitted`), so neither figure saw its rows.
* ``ridge`` (continuous targets): the same with `cross_validate_ridge` / `select_ridge_l2`; metrics: out-of-fold
  R^2, Pearson r and MSE (and AUROC when the targets happen to be 0/1); no calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.probes.calibration import Calibration, cross_fitted, fit_calibration
from knowlens.probes.cv import L2_GRID, cross_validate, max_folds, select_l2
from knowlens.probes.logistic import ClassWeight, fit_logistic, resolve_class_weight
from knowlens.probes.metrics import GroupsArg, auroc, bootstrap_ci, brier, ece, group_codes, log_loss
from knowlens.probes.ridge import RIDGE_L2_GRID, cross_validate_ridge, fit_ridge, select_ridge_l2
from knowlens.types import Float, Int, Tensor

PROBE_KINDS = ("logistic", "ridge")


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class ProbeFit:
    """A fitted probe (``weight`` on standardised features), its calibrator, out-of-fold scores and figures."""

    kind: str  # "logistic" | "ridge"
    weight: Float[Tensor, " d"]
    bias: float
    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    l2: float
    calibration: Calibration
    oof: Float[Tensor, " n"]  # out-of-fold logits (logistic) or predictions (ridge)
    oof_prob: Float[Tensor, " n"] | None  # logistic: cross-fitted calibrated probabilities
    fold: Int[Tensor, " n"]
    metrics: dict[str, Any]
    training: dict[str, Any]

    def decision(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """``((x - mean) / std) . weight + bias``: the logit (logistic) or the prediction (ridge)."""
        Z = (X.to(self.mean.device, self.mean.dtype) - self.mean) / self.std
        return Z @ self.weight + self.bias

    def predict(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """The calibrated probability of class 1 (logistic) or the prediction (ridge)."""
        z = self.decision(X)
        return self.calibration.apply(z) if self.kind == "logistic" else z


def is_binary(y: Tensor) -> bool:
    return y.dtype == torch.bool or bool(((y == 0) | (y == 1)).all())


def fit_probe(
    X: Float[Tensor, "n d"],
    y: Shaped[Tensor, " n"],
    groups: GroupsArg,
    *,
    kind: str = "auto",
    class_weight: ClassWeight = None,
    calibration: str | None = None,
    l2_grid: Sequence[float] | None = None,
    k: int = 5,
    inner_k: int = 3,
    seed: int = 0,
    n_boot: int = 1000,
) -> ProbeFit:
    """Fit and cross-validate a probe (module docstring). ``kind``: ``"auto"`` (logistic for 0/1 or bool labels,
    else ridge), ``"logistic"`` or ``"ridge"``; ``calibration``: ``"platt"`` (the logistic default),
    ``"temperature"`` or ``"none"``; ``k`` is lowered to what the groups allow (at least 2 needed)."""
    if kind == "auto":
        kind = "logistic" if is_binary(y) else "ridge"
    if kind not in PROBE_KINDS:
        raise KnowlensError(f"probe kind must be auto, logistic or ridge; got {kind!r}")
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise KnowlensError(f"a probe needs (n, d) features and n labels; got {tuple(X.shape)} and {tuple(y.shape)}")
    codes = group_codes(groups)
    if len(codes) != len(y):
        raise KnowlensError(f"{len(codes)} groups for {len(y)} rows")
    base = {"n_examples": len(y), "n_groups": int(codes.max()) + 1 if len(codes) else 0, "inner_folds": inner_k,
            "seed": seed}  # fmt: skip
    if kind == "ridge":
        return _fit_ridge(X, y, codes, calibration, l2_grid, k, inner_k, seed, base)
    if not is_binary(y):
        raise KnowlensError("a logistic probe needs 0/1 or bool labels (use kind='ridge' for continuous targets)")
    ylab = y.bool().cpu()
    calibration = "platt" if calibration is None else calibration
    folds = min(k, max_folds(ylab, codes))
    if folds < 2:
        raise KnowlensError(f"grouped cross-validation needs at least 2 groups holding each class; got {folds}")
    grid = tuple(L2_GRID if l2_grid is None else l2_grid)
    cv = cross_validate(X, ylab, codes, l2_grid=grid, k=folds, inner_k=inner_k, seed=seed, class_weight=class_weight)
    l2, _ = select_l2(X, ylab.to(X.device), codes, l2_grid=grid, k=inner_k, seed=seed, class_weight=class_weight)
    probe = fit_logistic(X, ylab.to(X.device), l2=l2, class_weight=class_weight)
    cal = fit_calibration(calibration, cv.scores, ylab)
    prob = cross_fitted(calibration, cv.scores, ylab, cv.fold)
    raw = torch.sigmoid(cv.scores)
    lo, hi = bootstrap_ci(cv.scores, ylab, codes, n=n_boot, seed=seed) if n_boot > 0 else (None, None)
    metrics = {
        "oof_auroc": cv.auroc,
        "oof_auroc_ci95": None if lo is None else [lo, hi],
        "uncalibrated": {"ece": ece(raw, ylab), "brier": brier(raw, ylab), "log_loss": log_loss(raw, ylab)},
        "calibrated": {"ece": ece(prob, ylab), "brier": brier(prob, ylab), "log_loss": log_loss(prob, ylab)},
        "note": "out-of-fold scores; calibrated figures cross-fitted (each fold's calibrator fitted on the other "
        "folds); ECE with 10 equal-width bins; interval: grouped bootstrap of the AUROC",
    }
    n1 = int(ylab.sum())
    training = base | {
        "n_positive": n1,
        "n_negative": len(ylab) - n1,
        "folds": folds,
        "l2_grid": list(grid),
        "l2_per_fold": list(cv.l2),
        "class_weight": _class_weight_card(class_weight),
        "class_weight_resolved": list(w) if (w := resolve_class_weight(class_weight, ylab)) else None,
    }
    return ProbeFit("logistic", probe.weight, probe.bias, probe.mean, probe.std, l2, cal, cv.scores, prob, cv.fold,
                    metrics, training)  # fmt: skip


def _fit_ridge(
    X: Tensor, y: Tensor, codes: Tensor, calibration: str | None, l2_grid: Sequence[float] | None, k: int,
    inner_k: int, seed: int, base: dict[str, Any],
) -> ProbeFit:  # fmt: skip
    if calibration not in (None, "none"):
        raise KnowlensError(f"calibration {calibration!r} is for logistic probes; a ridge probe takes none")
    folds = min(k, base["n_groups"])
    if folds < 2:
        raise KnowlensError(f"grouped cross-validation needs at least 2 groups; got {folds}")
    grid = tuple(RIDGE_L2_GRID if l2_grid is None else l2_grid)
    cv = cross_validate_ridge(X, y, codes, l2_grid=grid, k=folds, inner_k=inner_k, seed=seed)
    l2, _ = select_ridge_l2(X, y, codes, l2_grid=grid, k=inner_k, seed=seed)
    probe = fit_ridge(X, y, l2=l2)
    yd = y.to(torch.float64).cpu()
    metrics: dict[str, Any] = {"oof_r2": cv.r2, "oof_pearson": cv.pearson, "oof_mse": cv.mse}
    if is_binary(yd) and 0 < int(yd.sum()) < len(yd):
        metrics["oof_auroc"] = auroc(cv.predictions, yd.bool())
    training = base | {"folds": folds, "l2_grid": list(grid), "l2_per_fold": list(cv.l2), "target_mean": float(yd.mean()),
                       "target_std": float(yd.std(correction=0))}  # fmt: skip
    return ProbeFit("ridge", probe.weight, probe.bias, probe.mean, probe.std, l2, Calibration(), cv.predictions, None,
                    cv.fold, metrics, training)  # fmt: skip


def _class_weight_card(class_weight: ClassWeight) -> Any:
    if class_weight is None or isinstance(class_weight, str):
        return class_weight
    if isinstance(class_weight, Mapping):
        return {str(int(c)): float(w) for c, w in class_weight.items()}
    return repr(class_weight)
