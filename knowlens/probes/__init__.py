"""Probes: linear probes on captured activations, cross-validated by group, calibrated, saved with a card.

Public API (re-exports only):

* `fit_logistic(X, y, *, l2, class_weight=None) -> LogisticProbe` (``.decision(X)``, ``.predict_proba(X)``),
  `fit_logistic_path(X, y, *, l2_grid, class_weight=None)`: L2-regularised logistic regression on standardised
  features, ``l2 = 1 / C`` of scikit-learn's ``LogisticRegression``; ``class_weight`` None, ``"balanced"`` or
  ``{0: w0, 1: w1}`` as scikit-learn's
* `fit_ridge(X, y, *, l2) -> RidgeProbe` (``.predict(X)``), `fit_ridge_path`, `select_ridge_l2`,
  `cross_validate_ridge(X, y, groups, ...) -> RidgeCVResult`: closed-form ridge on standardised features for
  continuous targets, L2 chosen by grouped inner CV, out-of-fold predictions
* `grouped_folds(groups, k, *, seed, labels)`, `cross_validate(X, y, groups, *, l2_grid, k, inner_k, seed,
  class_weight) -> CVResult`, `cross_validate_select(candidates, y, groups, ...) -> SelectionResult`, `select_l2`,
  `L2_GRID`, `RIDGE_L2_GRID`
* `Calibration` (``.apply(logits)``, ``.to_dict()``), `fit_calibration(kind, logits, labels)` (``"temperature"``,
  ``"platt"``, ``"none"``), `fit_temperature`, `fit_platt`, `cross_fitted(kind, logits, labels, fold)`: fitted on
  held-out (out-of-fold) scores
* `auroc(scores, labels)`, `bootstrap_ci(scores, labels, groups, *, n, seed)`, `bootstrap_aurocs`,
  `percentile_interval`, `ece(probs, labels, *, n_bins=10)`, `brier(probs, labels)`, `log_loss(probs, labels)`
* `probe_features(activations, *, sae=None, feature_set=None) -> (X, InputRule)`: residual, SAE latents or a
  FeatureSet's latents, and the rule recorded in the probe card
* `fit_probe(X, y, groups, *, kind="auto", class_weight=None, calibration=None, ...) -> ProbeFit`: cross-validated
  probe, calibrator fitted on out-of-fold logits, out-of-fold metrics and training provenance
* `save_probe(path, fit, *, model, hook, position, input_rule, label_source, ...)`, `load_probe(path, *, model=None,
  sae=None, device=None) -> LoadedProbe` (``.score(activations) -> p``): safetensors + JSON card, checked on load
  (`knowlens.probes.files`: the format and the arithmetic)
"""

from knowlens.probes.calibration import (
    CALIBRATIONS,
    Calibration,
    cross_fitted,
    fit_calibration,
    fit_platt,
    fit_temperature,
)
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
from knowlens.probes.features import InputRule, probe_features
from knowlens.probes.files import LoadedProbe, load_probe, save_probe
from knowlens.probes.fit import ProbeFit, fit_probe
from knowlens.probes.logistic import LogisticProbe, fit_logistic, fit_logistic_path
from knowlens.probes.metrics import (
    auroc,
    bootstrap_aurocs,
    bootstrap_ci,
    brier,
    ece,
    group_codes,
    log_loss,
    percentile_interval,
)
from knowlens.probes.ridge import (
    RIDGE_L2_GRID,
    RidgeCVResult,
    RidgeProbe,
    cross_validate_ridge,
    fit_ridge,
    fit_ridge_path,
    select_ridge_l2,
)

__all__ = [
    "LogisticProbe",
    "fit_logistic",
    "fit_logistic_path",
    "RidgeProbe",
    "RidgeCVResult",
    "fit_ridge",
    "fit_ridge_path",
    "select_ridge_l2",
    "cross_validate_ridge",
    "RIDGE_L2_GRID",
    "L2_GRID",
    "CVResult",
    "SelectionResult",
    "grouped_folds",
    "max_folds",
    "most_chosen",
    "select_l2",
    "cross_validate",
    "cross_validate_select",
    "CALIBRATIONS",
    "Calibration",
    "fit_calibration",
    "fit_temperature",
    "fit_platt",
    "cross_fitted",
    "auroc",
    "bootstrap_aurocs",
    "bootstrap_ci",
    "percentile_interval",
    "group_codes",
    "ece",
    "brier",
    "log_loss",
    "InputRule",
    "probe_features",
    "ProbeFit",
    "fit_probe",
    "LoadedProbe",
    "load_probe",
    "save_probe",
]
