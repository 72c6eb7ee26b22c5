"""Probes: linear probes on captured activations (ground-truth probes so far; calibration, export and
pseudo-labels come with a later issue).

Public API (re-exports only):

* `fit_logistic(X, y, *, l2) -> LogisticProbe` (``.decision(X)``, ``.predict_proba(X)``),
  `fit_logistic_path(X, y, *, l2_grid)`: L2-regularised logistic regression on standardised features,
  ``l2 = 1 / C`` of scikit-learn's ``LogisticRegression``
* `grouped_folds(groups, k, *, seed, labels)`, `cross_validate(X, y, groups, *, l2_grid, k, inner_k, seed)
  -> CVResult`, `cross_validate_select(candidates, y, groups, ...) -> SelectionResult`, `select_l2`, `L2_GRID`
* `auroc(scores, labels)`, `bootstrap_ci(scores, labels, groups, *, n, seed)`, `bootstrap_aurocs`,
  `percentile_interval`
"""

from knowlens.probes.cv import (
    L2_GRID,
    CVResult,
    SelectionResult,
    cross_validate,
    cross_validate_select,
    grouped_folds,
    max_folds,
    most_chosen,
    select_l2,
)
from knowlens.probes.logistic import LogisticProbe, fit_logistic, fit_logistic_path
from knowlens.probes.metrics import auroc, bootstrap_aurocs, bootstrap_ci, group_codes, percentile_interval

__all__ = [
    "LogisticProbe",
    "fit_logistic",
    "fit_logistic_path",
    "L2_GRID",
    "CVResult",
    "SelectionResult",
    "grouped_folds",
    "max_folds",
    "most_chosen",
    "select_l2",
    "cross_validate",
    "cross_validate_select",
    "auroc",
    "bootstrap_aurocs",
    "bootstrap_ci",
    "percentile_interval",
    "group_codes",
]
