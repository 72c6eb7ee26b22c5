"""Ground-truth probes: agreement with scikit-learn, grouped folds, AUROC with ties, no leak into the L2 choice."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import knowlens.probes.cv as cv
from knowlens.errors import KnowlensError
from knowlens.probes import (
    auroc,
    bootstrap_aurocs,
    bootstrap_ci,
    cross_validate,
    cross_validate_select,
    fit_logistic,
    fit_logistic_path,
    grouped_folds,
)
from knowlens.probes.metrics import _weighted_auroc


def _problem(seed: int, *, n: int = 600, d: int = 12, correlated: bool = False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    if correlated:  # a shared factor: pairwise correlations around 0.8, unequal scales and offsets
        X = 0.5 * X + torch.randn(n, 1, generator=g, dtype=torch.float64) * 1.0
        X = X * torch.linspace(0.1, 10, d, dtype=torch.float64) + 3.0
    w = torch.randn(d, generator=g, dtype=torch.float64)
    logit = (X - X.mean(0)) / X.std(0) @ w * 0.7
    y = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)
    return X, y


@pytest.mark.parametrize("correlated", [False, True], ids=["independent", "correlated"])
@pytest.mark.parametrize("l2", [0.3, 3.0, 30.0])
def test_agrees_with_sklearn(correlated, l2):
    X, y = _problem(1 + correlated, correlated=correlated)
    tr, te = slice(0, 400), slice(400, None)
    probe = fit_logistic(X[tr], y[tr], l2=l2)
    Z = ((X - probe.mean) / probe.std).numpy()
    sk = LogisticRegression(C=1.0 / l2, tol=1e-12, max_iter=10_000).fit(Z[tr], y[tr].numpy())
    ours = auroc(probe.decision(X[te]), y[te])
    theirs = roc_auc_score(y[te].numpy(), sk.decision_function(Z[te]))
    assert abs(ours - theirs) <= 0.005
    np.testing.assert_allclose(probe.weight.numpy(), sk.coef_[0], rtol=1e-4, atol=1e-5)
    assert probe.bias == pytest.approx(float(sk.intercept_[0]), abs=1e-5)
    # the same function of the raw features
    torch.testing.assert_close(X[te] @ probe.raw_weight + probe.raw_bias, probe.decision(X[te]))
    p = probe.predict_proba(X[te])
    assert bool(((p > 0) & (p < 1)).all())


def test_path_equals_single_fits_and_survives_separable_data():
    X, y = _problem(3, n=80, d=40)  # 40 features, 80 rows: separable
    path = fit_logistic_path(X, y, l2_grid=(1e-3, 1.0, 100.0))
    for probe in path:
        alone = fit_logistic(X, y, l2=probe.l2)
        torch.testing.assert_close(probe.weight, alone.weight, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(probe.weight).all()
    assert path[0].weight.norm() > path[1].weight.norm() > path[2].weight.norm()
    assert auroc(path[0].decision(X), y) == 1.0


def test_bad_probe_input_is_refused():
    X, y = _problem(0, n=20, d=3)
    with pytest.raises(KnowlensError, match="both classes"):
        fit_logistic(X, torch.zeros(20, dtype=torch.bool), l2=1.0)
    with pytest.raises(KnowlensError, match="> 0"):
        fit_logistic(X, y, l2=0.0)
    X[0, 0] = float("nan")
    with pytest.raises(KnowlensError, match="NaN"):
        fit_logistic(X, y, l2=1.0)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=5, max_size=40),
    k=st.integers(2, 5),
    seed=st.integers(0, 10_000),
)
def test_grouped_folds_never_share_a_group(sizes, k, seed):
    groups = [f"e{g}" for g, size in enumerate(sizes) for _ in range(size)]
    if len(sizes) < k:
        with pytest.raises(KnowlensError, match="at least k groups"):
            grouped_folds(groups, k, seed=seed)
        return
    fold = grouped_folds(groups, k, seed=seed)
    owner: dict[str, int] = {}
    for g, f in zip(groups, fold.tolist()):
        assert owner.setdefault(g, f) == f  # every row of a group sits in its group's fold
    per_fold = torch.bincount(fold, minlength=k)
    assert len(per_fold) == k and bool((per_fold > 0).all())
    assert int(per_fold.max() - per_fold.min()) <= max(sizes)  # dealt largest first: balanced to a group
    assert torch.equal(fold, grouped_folds(groups, k, seed=seed))  # deterministic for a seed


def test_stratified_folds_hold_both_classes_or_say_why():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 30, (300,), generator=g)
    labels = groups % 3 == 0  # entity-level labels: 10 positive groups
    fold = grouped_folds(groups, 5, seed=0, labels=labels)
    for f in range(5):
        assert 0 < int(labels[fold == f].sum()) < int((fold == f).sum())
    with pytest.raises(KnowlensError, match="no row of class 1"):
        grouped_folds(groups, 5, seed=0, labels=groups == 0)  # one positive group, five folds


def test_auroc_equals_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(5, 200, (1,), generator=g))
        scores = torch.randint(0, 1 + trial % 6, (n,), generator=g).double()  # heavy ties
        labels = torch.rand(n, generator=g) < 0.4
        labels[0], labels[1] = True, False
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    with pytest.raises(KnowlensError, match="both classes"):
        auroc(torch.rand(5), torch.ones(5, dtype=torch.bool))


def test_weighted_auroc_is_auroc_of_repeated_rows():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 8, (40,), generator=g).double()
    labels = torch.rand(40, generator=g) < 0.5
    weights = torch.randint(0, 4, (3, 40), generator=g).double()
    got = _weighted_auroc(scores, labels, weights)
    for b in range(3):
        rep = weights[b].long()
        want = auroc(scores.repeat_interleave(rep), labels.repeat_interleave(rep))
        assert float(got[b]) == pytest.approx(want, abs=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_resamples_groups():
    X, y = _problem(4, n=400, d=5)
    groups = [i // 5 for i in range(400)]
    scores = X[:, 0] + 0.5 * y.double()
    lo, hi = bootstrap_ci(scores, y, groups, n=500, seed=0)
    assert lo < auroc(scores, y) < hi and hi - lo < 0.3
    assert (lo, hi) == bootstrap_ci(scores, y, groups, n=500, seed=0)
    # groups that are single rows vs blocks of rows with the same score: blocks give a wider interval
    block = torch.arange(400) // 20
    block_scores, block_y = block.double() + torch.rand(400, dtype=torch.float64) * 0.1, block % 2 == 0
    narrow = bootstrap_aurocs(block_scores[None], block_y, torch.arange(400), n=300)[0]
    wide = bootstrap_aurocs(block_scores[None], block_y, block, n=300)[0]
    assert wide.std() > 2 * narrow.std()


def test_cross_validation_finds_a_planted_signal_and_not_noise():
    X, y = _problem(5, n=300, d=20)
    groups = [i // 3 for i in range(300)]
    real = cross_validate(X, y, groups, k=5, seed=0)
    assert real.auroc > 0.8 and len(real.l2) == 5
    assert real.scores.shape == (300,) and sorted(set(real.fold.tolist())) == [0, 1, 2, 3, 4]
    noise = cross_validate(torch.randn(300, 20, generator=torch.Generator().manual_seed(9)), y, groups, k=5)
    assert abs(noise.auroc - 0.5) < 0.12
    sel = cross_validate_select({"noise": torch.randn(300, 20, dtype=torch.float64), "real": X}, y, groups)
    assert set(sel.chosen) == {"real"} and sel.best == "real"
    torch.testing.assert_close(sel.nested.scores, sel.candidates["real"].scores)


def test_l2_is_chosen_on_training_fold_rows_only(monkeypatch):
    X, y = _problem(6, n=240, d=30)
    groups = torch.arange(240) // 4
    seen: list[set[int]] = []

    def spy(X_, y_, groups_, **kw):
        seen.append(set(groups_.tolist()))
        return real_select(X_, y_, groups_, **kw)

    real_select = cv.select_l2
    monkeypatch.setattr(cv, "select_l2", spy)
    res = cross_validate(X, y, groups, l2_grid=(0.1, 10.0, 1000.0), k=4, seed=2)
    assert len(seen) == 4
    for f in range(4):
        test_groups = set(groups[res.fold == f].tolist())
        assert seen[f] and not seen[f] & test_groups
    monkeypatch.undo()
    # by construction: fold 0's probe settings depend on the other folds' rows only; scrambling fold 0's
    # features (folds depend on groups and labels alone, so they stay) leaves its L2 choice as it was
    X2 = X.clone()
    zero = res.fold == 0
    X2[zero] = torch.randn(int(zero.sum()), 30, dtype=torch.float64) * 100
    again = cross_validate(X2, y, groups, l2_grid=(0.1, 10.0, 1000.0), k=4, seed=2)
    assert torch.equal(again.fold, res.fold)
    assert again.l2[0] == res.l2[0]
    assert not torch.equal(again.scores[zero], res.scores[zero])


def test_grouped_folds_give_every_fold_the_rare_class_when_it_is_concentrated():
    # three large groups hold most class-1 rows and two hold one each: a deal balanced by row counts alone
    # leaves a fold without class 1; the repair moves a small class-1 group there
    groups, labels = [], []
    for g, n1 in enumerate([40, 40, 40, 1, 1]):
        groups += [g] * (n1 + 5)
        labels += [1] * n1 + [0] * 5
    for g in range(5, 45):
        groups += [g] * 6
        labels += [0] * 6
    y = torch.tensor(labels)
    folds = grouped_folds(groups, 5, labels=y)
    for f in range(5):
        assert int(((folds == f) & (y == 1)).sum()) > 0 and int(((folds == f) & (y == 0)).sum()) > 0
    codes = torch.tensor(groups)
    for g in range(45):  # a group never straddles folds
        assert len(set(folds[codes == g].tolist())) == 1
