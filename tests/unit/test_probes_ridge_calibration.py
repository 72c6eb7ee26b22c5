"""Ridge probes, class weights, calibration and its metrics, probe inputs and `fit_probe`: against scikit-learn and
naive loops, on toys whose answer is known."""

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from knowlens.errors import KnowlensError
from knowlens.probes import (
    Calibration,
    InputRule,
    auroc,
    brier,
    cross_fitted,
    cross_validate_ridge,
    ece,
    fit_calibration,
    fit_logistic,
    fit_probe,
    fit_ridge,
    fit_ridge_path,
    log_loss,
    probe_features,
)
from knowlens.saes.features import FeatureSet


def _regression(seed: int, *, n: int = 240, d: int = 10, noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 5, d, dtype=torch.float64) + 2.0
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = (X - 2.0) / torch.linspace(0.5, 5, d, dtype=torch.float64) @ w + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def _classes(seed: int, *, n: int = 400, d: int = 8, shift: float = -1.5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w * 0.8 + shift)  # imbalanced
    return X, y


# ------------------------------------------------------------------------------------------------ ridge


@pytest.mark.parametrize("l2", [1e-3, 0.1, 10.0])
def test_ridge_equals_sklearn_on_standardised_features(l2):
    X, y = _regression(0)
    probe = fit_ridge(X, y, l2=l2)
    Z = ((X - probe.mean) / probe.std).numpy()
    sk = Ridge(alpha=len(y) * l2, tol=1e-12, solver="cholesky").fit(Z, y.numpy())
    np.testing.assert_allclose(probe.weight.numpy(), sk.coef_, rtol=1e-8, atol=1e-10)
    assert probe.bias == pytest.approx(float(sk.intercept_), abs=1e-10)
    torch.testing.assert_close(probe.predict(X), torch.from_numpy(sk.predict(Z)))
    torch.testing.assert_close(X @ probe.raw_weight + probe.raw_bias, probe.predict(X))
    path = fit_ridge_path(X, y, l2_grid=(1e-3, l2, 1e3))
    torch.testing.assert_close(path[1].weight, probe.weight)
    assert path[0].weight.norm() >= path[1].weight.norm() >= path[2].weight.norm()


def test_ridge_cross_validation_finds_signal_not_noise_and_refuses_bad_input():
    X, y = _regression(1, n=240)
    groups = [i // 4 for i in range(240)]
    res = cross_validate_ridge(X, y, groups, k=4, seed=0)
    assert res.r2 > 0.7 and res.pearson > 0.85 and len(res.l2) == 4
    assert res.predictions.shape == (240,) and sorted(set(res.fold.tolist())) == [0, 1, 2, 3]
    owner: dict[int, int] = {}
    assert all(owner.setdefault(g, f) == f for g, f in zip(groups, res.fold.tolist()))  # a group in one fold
    # out-of-fold: each row's prediction is from a probe that never saw it
    f0 = res.fold == 0
    alone = fit_ridge(X[~f0], y[~f0], l2=res.l2[0]).predict(X[f0])
    torch.testing.assert_close(res.predictions[f0], alone)
    noise = torch.randn(240, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert cross_validate_ridge(X, noise, groups, k=4).r2 < 0.05
    with pytest.raises(KnowlensError, match="> 0"):
        fit_ridge(X, y, l2=0.0)
    y_bad = y.clone()
    y_bad[3] = float("nan")
    with pytest.raises(KnowlensError, match="targets contain NaN"):
        fit_ridge(X, y_bad, l2=1.0)


# ----------------------------------------------------------------------------------------- class weights


@pytest.mark.parametrize("class_weight", ["balanced", {0: 1.0, 1: 4.0}, {0: 0.5, 1: 2.0}])
def test_class_weights_agree_with_sklearn(class_weight):
    X, y = _classes(2)
    assert 0.1 < float(y.double().mean()) < 0.35
    tr, te = slice(0, 300), slice(300, None)
    probe = fit_logistic(X[tr], y[tr], l2=2.0, class_weight=class_weight)
    Z = ((X - probe.mean) / probe.std).numpy()
    sk = LogisticRegression(C=0.5, class_weight=class_weight, tol=1e-12, max_iter=10_000).fit(Z[tr], y[tr].numpy())
    np.testing.assert_allclose(probe.weight.numpy(), sk.coef_[0], rtol=1e-4, atol=1e-5)
    assert probe.bias == pytest.approx(float(sk.intercept_[0]), abs=1e-5)
    ours = auroc(probe.decision(X[te]), y[te])
    assert abs(ours - roc_auc_score(y[te].numpy(), sk.decision_function(Z[te]))) <= 0.005
    if class_weight == "balanced":
        n1 = int(y[tr].sum())
        assert probe.class_weight == pytest.approx((300 / (2 * (300 - n1)), 300 / (2 * n1)))
        # balanced weights move the intercept up: the mean predicted probability is near 1/2, not the base rate
        unweighted = fit_logistic(X[tr], y[tr], l2=2.0)
        assert probe.predict_proba(X[tr]).mean() > unweighted.predict_proba(X[tr]).mean() + 0.1
    with pytest.raises(TypeError, match="class_weight"):  # KnowlensError without the runtime type checks of the tests
        fit_logistic(X, y, l2=1.0, class_weight="heavy")  # type: ignore[arg-type]
    with pytest.raises(KnowlensError, match="finite and > 0"):
        fit_logistic(X, y, l2=1.0, class_weight={0: 1.0, 1: -2.0})


# ------------------------------------------------------------------------------------- calibration metrics


def test_ece_brier_log_loss_against_naive_loops_and_sklearn():
    g = torch.Generator().manual_seed(3)
    for n_bins in (1, 5, 10, 15):
        p = torch.rand(500, generator=g, dtype=torch.float64) ** 2
        p[:4] = torch.tensor([0.0, 1.0, 0.2, 0.5], dtype=torch.float64)  # the edges of bins
        y = torch.rand(500, generator=g, dtype=torch.float64) < p
        total = 0.0
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            inside = [i for i in range(500) if lo <= p[i] < hi or (b == n_bins - 1 and p[i] == 1.0)]
            if inside:
                conf = sum(float(p[i]) for i in inside) / len(inside)
                acc = sum(float(y[i]) for i in inside) / len(inside)
                total += len(inside) / 500 * abs(acc - conf)
        assert ece(p, y, n_bins=n_bins) == pytest.approx(total, abs=1e-12)
    assert brier(p, y) == pytest.approx(brier_score_loss(y.numpy(), p.numpy()), abs=1e-12)
    q = p.clamp(0.01, 0.99)
    assert log_loss(q, y) == pytest.approx(sk_log_loss(y.numpy(), q.numpy()), abs=1e-12)
    assert ece(y.double(), y) == 0.0 and brier(y.double(), y) == 0.0
    with pytest.raises(KnowlensError, match=r"\[0, 1\]"):
        ece(p + 1, y)


# ---------------------------------------------------------------------------------------------- calibration


def _miscalibrated(seed: int, n: int = 2000):
    """True logits t, labels drawn from sigmoid(t); the scores are 4 t + 1: overconfident and shifted."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    y = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(t)
    return 4 * t + 1, y, t


def test_temperature_and_platt_reduce_nll_and_recover_the_map():
    z, y, t = _miscalibrated(4)
    before = log_loss(torch.sigmoid(z), y)
    temp = fit_calibration("temperature", z, y)
    platt = fit_calibration("platt", z, y)
    assert temp.kind == "temperature" and temp.temperature > 2
    assert log_loss(temp.apply(z), y) < before - 0.1
    assert platt.scale == pytest.approx(0.25, abs=0.03) and platt.shift == pytest.approx(-0.25, abs=0.12)
    try:  # scikit-learn's Platt fit (same smoothed targets), p = 1 / (1 + exp(a z + b)): a private function
        from sklearn.calibration import _sigmoid_calibration
    except ImportError:
        pass
    else:
        a, b = _sigmoid_calibration(z.numpy(), y.numpy())
        assert (platt.scale, platt.shift) == pytest.approx((-a, -b), abs=1e-5)
    assert log_loss(platt.apply(z), y) < log_loss(temp.apply(z), y) < before
    assert ece(platt.apply(z), y) < 0.03 < ece(torch.sigmoid(z), y)
    # temperature is the NLL minimiser over T: nudging it either way does worse
    for factor in (0.95, 1.05):
        other = Calibration("temperature", temp.scale * factor, 0.0)
        assert log_loss(other.apply(z), y) > log_loss(temp.apply(z), y)
    # a calibrator keeps the ranking
    assert auroc(platt.apply(z), y) == pytest.approx(auroc(z, y), abs=1e-12)
    none = fit_calibration("none", z, y)
    torch.testing.assert_close(none.apply(z), torch.sigmoid(z))
    for cal in (temp, platt, none):
        assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(KnowlensError, match="rank class 1 above"):
        fit_calibration("temperature", -z, y)
    with pytest.raises(KnowlensError, match="must be one of"):
        fit_calibration("isotonic", z, y)
    with pytest.raises(KnowlensError, match="temperature must be > 0"):
        Calibration.from_dict({"kind": "temperature", "temperature": -1.0})


def test_cross_fitted_calibration_never_sees_its_fold():
    z, y, _ = _miscalibrated(5, n=600)
    fold = torch.arange(600) % 3
    p = cross_fitted("platt", z, y, fold)
    for f in range(3):
        te = fold == f
        want = fit_calibration("platt", z[~te], y[~te]).apply(z[te])
        torch.testing.assert_close(p[te], want)
    z2 = z.clone()
    z2[fold == 0] = -z2[fold == 0]  # scrambling fold 0 changes only how fold 0 is scored by the others' calibrators
    p2 = cross_fitted("platt", z2, y, fold)
    assert not torch.equal(p2[fold == 0], p[fold == 0])


# ------------------------------------------------------------------------------------------ probe inputs


def _sae(d_in: int = 8, d_sae: int = 16, hook: str = "blocks.0.hook_resid_post"):
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae.eval()


def _feature_set(latents, hook: str = "blocks.0.hook_resid_post", d_sae: int = 16) -> FeatureSet:
    top = len(latents)
    return FeatureSet(model={"name": "m", "fingerprint": "f"}, hook=hook, sae_label="my-sae", name="entity-known",
                      position="name", latents=torch.tensor(latents), scores=torch.zeros(top),
                      decoder=torch.zeros(top, 8), heldout_auroc=torch.zeros(top),
                      per_latent={"separation": torch.zeros(d_sae)})  # fmt: skip


def test_probe_features_residual_sae_and_feature_set():
    acts = torch.randn(20, 8)
    X, rule = probe_features(acts)
    assert rule == InputRule("residual", 8, 8) and X.dtype == torch.float64
    torch.testing.assert_close(X, acts.double())
    sae = _sae()
    X, rule = probe_features(acts, sae=sae)
    torch.testing.assert_close(X, sae.encode(acts).detach().double())
    assert rule.kind == "sae_latents" and rule.n_features == 16 and rule.d_sae == 16
    X, rule = probe_features(acts, sae=sae, feature_set=_feature_set([5, 2, 11]))
    torch.testing.assert_close(X, sae.encode(acts).detach().double()[:, [5, 2, 11]])
    assert rule.latents == (5, 2, 11) and rule.sae == "my-sae" and rule.feature_set == "entity-known"
    assert InputRule.from_dict(rule.to_dict()) == rule
    torch.testing.assert_close(rule.apply(acts.reshape(4, 5, 8), sae), X.reshape(4, 5, 3))  # any leading shape
    with pytest.raises(KnowlensError, match="pass the SAE"):
        rule.apply(acts)
    with pytest.raises(KnowlensError, match="located at blocks.1"):
        probe_features(acts, sae=sae, feature_set=_feature_set([1], hook="blocks.1.hook_resid_post"))
    with pytest.raises(KnowlensError, match="SAE of 32 latents"):
        probe_features(acts, sae=sae, feature_set=_feature_set([1], d_sae=32))
    with pytest.raises(KnowlensError, match="need the SAE"):
        probe_features(acts, feature_set=_feature_set([1]))
    with pytest.raises(KnowlensError, match="latents must be indices"):
        InputRule.from_dict(rule.to_dict() | {"latents": [99]})


# -------------------------------------------------------------------------------------------- fit_probe


def test_fit_probe_logistic_calibrates_a_class_weighted_probe_on_held_out_scores():
    X, y = _classes(6, n=360)
    groups = [i // 3 for i in range(360)]
    fit = fit_probe(X, y, groups, class_weight="balanced", k=4, inner_k=3, l2_grid=(1.0, 100.0), n_boot=100)
    m = fit.metrics
    assert fit.kind == "logistic" and fit.calibration.kind == "platt"
    assert m["oof_auroc"] > 0.75 and m["oof_auroc_ci95"][0] < m["oof_auroc"] < m["oof_auroc_ci95"][1]
    assert m["oof_auroc"] == pytest.approx(auroc(fit.oof, y))
    # balanced weights overstate class 1; calibration on held-out scores brings the probabilities back
    assert m["calibrated"]["ece"] < m["uncalibrated"]["ece"] - 0.05
    assert m["calibrated"]["log_loss"] < m["uncalibrated"]["log_loss"]
    assert fit.oof_prob is not None and m["calibrated"]["ece"] == pytest.approx(ece(fit.oof_prob, y))
    t = fit.training
    assert (t["n_examples"], t["n_positive"] + t["n_negative"], t["n_groups"], t["folds"]) == (360, 360, 120, 4)
    assert t["class_weight"] == "balanced" and len(t["l2_per_fold"]) == 4
    # the calibrator is the one fitted on the out-of-fold logits
    assert fit.calibration == fit_calibration("platt", fit.oof, y)
    z = (X - fit.mean) / fit.std @ fit.weight + fit.bias
    torch.testing.assert_close(fit.predict(X), torch.sigmoid(fit.calibration.scale * z + fit.calibration.shift))


def test_fit_probe_ridge_and_refusals():
    X, y = _regression(7, n=160)
    groups = [i // 4 for i in range(160)]
    fit = fit_probe(X, y, groups, k=4)
    assert fit.kind == "ridge" and fit.calibration == Calibration() and fit.metrics["oof_r2"] > 0.7
    torch.testing.assert_close(fit.predict(X), fit_ridge(X, y, l2=fit.l2).predict(X))
    with pytest.raises(KnowlensError, match="for logistic probes"):
        fit_probe(X, y, groups, calibration="platt")
    with pytest.raises(KnowlensError, match="0/1 or bool"):
        fit_probe(X, y, groups, kind="logistic")
    Xc, yc = _classes(8, n=40)
    with pytest.raises(KnowlensError, match="at least 2 groups holding each class"):
        fit_probe(Xc, yc, ["one"] * 40)
