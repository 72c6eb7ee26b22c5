"""The evaluation harness: its metrics against naive recomputations (scikit-learn's average precision, a loop over
thresholds, hand-computed and permutation-averaged risk-coverage curves, replicated rows for weights), and one small
evaluation of the shipped organism whose table is well formed and whose figures agree with direct recomputation."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from sklearn.metrics import average_precision_score

from knowlens.analyses import average_precision, evaluate_signals, recall_at_fpr, risk_coverage
from knowlens.analyses.eval_metrics import (
    bootstrap_weights,
    weighted_auroc,
    weighted_average_precision,
    weighted_brier,
    weighted_ece,
    weighted_rc_area,
    weighted_recall_at_fpr,
)
from knowlens.errors import KnowlensError
from knowlens.probes import auroc, brier, ece


def scored(seed: int, n: int = 60, levels: int = 7):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.4
    s = torch.randint(0, levels, (n,), generator=g).double() + 0.8 * y.double()  # ties, some signal
    return s, y


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_is_scikit_learns(seed):
    s, y = scored(seed)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.numpy(), s.numpy()), abs=1e-12)


def naive_recall_at_fpr(s, y, max_fpr):
    best = 0.0
    for t in [*s.tolist(), float("inf")]:
        flagged = s >= t
        fpr = float((flagged & ~y).sum()) / float((~y).sum())
        tpr = float((flagged & y).sum()) / float(y.sum())
        if fpr <= max_fpr:
            best = max(best, tpr)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_recall_at_fpr_is_the_naive_loop(seed):
    s, y = scored(seed, levels=12)
    for max_fpr in (0.0, 0.05, 0.1, 0.3):
        assert recall_at_fpr(s, y, max_fpr=max_fpr) == pytest.approx(naive_recall_at_fpr(s, y, max_fpr), abs=1e-12)


def test_recall_at_fpr_boundary_counts_an_fpr_of_exactly_the_limit():
    s = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)  # 3 positives, 9 negatives
    n_neg = int((~y).sum())
    # flagging down to 7 gives 1 false positive: FPR 1/9 > 0.1, so only the top row counts at 10%
    assert n_neg == 9 and recall_at_fpr(s, y) == pytest.approx(1 / 3)
    assert recall_at_fpr(s, y, max_fpr=1 / 9) == pytest.approx(2 / 3)


def test_risk_coverage_on_a_constructed_case():
    rel = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    correct = torch.tensor([True, True, False, True])
    coverage, accuracy, area = risk_coverage(rel, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert accuracy.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 3 / 4])
    assert area == pytest.approx((1 + 1 + 2 / 3 + 3 / 4) / 4)
    # abstaining from the wrong answer first is the oracle; reversing the order is the worst case
    assert risk_coverage(correct.double(), correct)[2] == pytest.approx((1 + 1 + 1 + 3 / 4) / 4)
    assert risk_coverage(-correct.double(), correct)[2] == pytest.approx((0 + 1 / 2 + 2 / 3 + 3 / 4) / 4)


def test_risk_coverage_ties_are_the_average_over_their_orders():
    rel = torch.tensor([2.0, 1, 1, 1, 0, 0], dtype=torch.float64)
    correct = torch.tensor([True, False, True, False, True, True])
    curves = []
    groups = [[0], [1, 2, 3], [4, 5]]
    for a in itertools.permutations(groups[1]):
        for b in itertools.permutations(groups[2]):
            order = [*groups[0], *a, *b]
            hits = correct[order].double().cumsum(0)
            curves.append(hits / torch.arange(1, 7))
    expected = torch.stack(curves).mean(0)
    _, accuracy, area = risk_coverage(rel, correct)
    assert torch.allclose(accuracy, expected, atol=1e-12)
    assert area == pytest.approx(float(expected.mean()), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_metrics_are_the_metrics_of_replicated_rows(seed):
    s, y = scored(seed, n=40)
    p = torch.sigmoid(s - 3)
    w = torch.randint(0, 4, (1, 40), generator=torch.Generator().manual_seed(seed + 10)).double()
    w[0, :2] = 1  # both classes present
    w[0, y.nonzero()[0]] = 2
    w[0, (~y).nonzero()[0]] = 2
    rep = torch.repeat_interleave(torch.arange(40), w[0].long())
    assert float(weighted_auroc(s, y, w)[0]) == pytest.approx(auroc(s[rep], y[rep]), abs=1e-12)
    assert float(weighted_average_precision(s, y, w)[0]) == pytest.approx(average_precision(s[rep], y[rep]), abs=1e-12)
    assert float(weighted_recall_at_fpr(s, y, w)[0]) == pytest.approx(recall_at_fpr(s[rep], y[rep]), abs=1e-12)
    assert float(weighted_ece(p, y, w)[0]) == pytest.approx(ece(p[rep], y[rep]), abs=1e-12)
    assert float(weighted_brier(p, y, w)[0]) == pytest.approx(brier(p[rep], y[rep]), abs=1e-12)
    assert float(weighted_rc_area(s, y, w)[0]) == pytest.approx(risk_coverage(s[rep], y[rep])[2], abs=1e-10)


def test_bootstrap_weights_draw_whole_groups():
    groups = ["a", "a", "b", "c", "c", "c"]
    w = bootstrap_weights(groups, n=50, seed=1)
    assert w.shape == (50, 6)
    assert torch.equal(w[:, 0], w[:, 1]) and torch.equal(w[:, 3], w[:, 5])
    assert torch.equal(w[:, [0, 2, 3]].sum(1), torch.full((50,), 3.0, dtype=torch.float64))  # 3 groups drawn each time
    assert torch.equal(w, bootstrap_weights(groups, n=50, seed=1))


def test_undefined_metrics_raise_or_give_nan():
    s = torch.tensor([0.1, 0.2], dtype=torch.float64)
    y = torch.tensor([True, True])
    with pytest.raises(KnowlensError):
        recall_at_fpr(s, y)
    with pytest.raises(KnowlensError):
        average_precision(s, ~y)
    assert torch.isnan(weighted_auroc(s, y, torch.ones(1, 2, dtype=torch.float64))).all()


# ------------------------------------------------------------------------------------ the shipped organism


@pytest.fixture(scope="module")
def organism():
    from knowlens.organism.store import load_organism

    return load_organism()


def random_sae(hook: str, d_in: int, d_sae: int = 48):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook))).eval()


@pytest.fixture(scope="module")
def small_eval(organism):
    held = list(organism.corpus.held_out)
    # enough questions that the few disagreements of a confident model fall in several entity groups
    items = [held[i] for i in sorted(random.Random(1).sample(range(len(held)), 150))]
    sae = random_sae("blocks.2.hook_resid_post", organism.model.cfg.d_model)
    lines: list[str] = []
    ev = evaluate_signals(organism.model, organism.world, items, sae=sae, k=2, n_boot=60, log=lines.append)
    return ev, items, lines


def test_small_evaluation_table_is_well_formed(small_eval, tmp_path):
    ev, items, lines = small_eval
    names = [s.name for s in ev.signals]
    assert names == ["labels", "probe:entity_slot", "ground_truth_probe", "sae_latent", "top1_prob", "entropy",
                     "self_consistency"]
    assert ev.params["labels"]["entity_slot"]["frames"]  # the exemplar-free entity probe at the answer slot
    assert ev.skipped == {} and lines  # every signal measured, progress reported
    md = ev.to_markdown()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| signal | AUROC | AUPRC | recall@10%FPR | ECE | Brier | ECE (Platt)")
    assert len(table) == 2 * (2 + len(ev.signals))  # header, rule and a row per signal, in both tables
    for s in ev.signals:
        row = next(line for line in table if line.startswith(f"| {s.title} |"))
        assert row.count("|") == 11 and row.rstrip(" |").endswith(s.cost)
        for key, m in s.metrics.items():
            if m["value"] is None:
                assert key in ("ece", "brier") and not s.probability  # n/a only for a raw score
                continue
            assert 0 <= m["value"] <= 1 and m["ci95"] is not None and m["ci95"][0] <= m["ci95"][1]
        assert len(s.risk_coverage["coverage"]) == len(s.risk_coverage["accuracy"]) == s.risk_coverage["answers"]
        assert s.by_split.keys() == ev.counts["by_split"].keys()
    assert {s.name: s.passes for s in ev.signals}["self_consistency"] == 3
    assert ev["entropy"].metrics["ece"]["value"] is None and "n/a" in md
    assert ev.counts["value_tokens"] == ev.counts["hallucinated"] + ev.counts["correct"]
    assert ev.counts["answers_left_out"] == 0  # the labelled tokens are the graded ones
    assert "cue-strength sweep" in md
    assert {p["scored_half"] for p in ev["sae_latent"].details["picks"]} == {0, 1}
    json.dumps(ev.to_dict())  # JSON-ready
    page = ev.to_html(tmp_path / "eval.html").read_text()
    assert "Plotly" in page and "<script src=" not in page and 'id="roc"' in page and 'id="risk-coverage"' in page


def test_small_evaluation_matches_direct_recomputation(small_eval, organism):
    from knowlens.analyses.answers import answer_items

    ev, items, _ = small_eval
    answers = answer_items(organism.model, organism.world, items)
    rows = [(a, j) for a in answers for c in a.grade.claims for j in range(*c.value_tokens)
            if a.grade.classes[j] in ("correct", "hallucinated")]  # fmt: skip
    hal = torch.tensor([a.grade.classes[j] == "hallucinated" for a, j in rows])
    top1 = torch.tensor([a.top1[j] for a, j in rows], dtype=torch.float64)
    entropy = torch.tensor([a.entropy[j] for a, j in rows], dtype=torch.float64)
    assert ev.counts["value_tokens"] == len(rows) and ev.counts["hallucinated"] == int(hal.sum())
    assert ev["top1_prob"].metrics["auroc"]["value"] == pytest.approx(auroc(-top1, hal), abs=1e-4)
    assert ev["entropy"].metrics["auroc"]["value"] == pytest.approx(auroc(entropy, hal), abs=1e-4)
    assert ev["top1_prob"].metrics["ece"]["value"] == pytest.approx(ece(top1, ~hal), abs=1e-4)
    by_answer: dict[int, list[int]] = {}
    for i, (a, _) in enumerate(rows):
        by_answer.setdefault(id(a), []).append(i)
    rel = torch.stack([top1[ix].min() for ix in by_answer.values()])
    ok = torch.tensor([not bool(hal[ix].any()) for ix in by_answer.values()])
    assert ev["top1_prob"].risk_coverage["area"] == pytest.approx(risk_coverage(rel, ok)[2], abs=1e-4)
    assert ev.references["random"] == pytest.approx(float(ok.double().mean()), abs=1e-4)


def test_evaluation_needs_both_classes(organism):
    known = [h for h in organism.corpus.held_out if h.split == "known" and h.kind == "question"][:2]
    with pytest.raises(KnowlensError, match="both classes"):
        evaluate_signals(organism.model, organism.world, known, k=1, n_boot=0)
    with pytest.raises(KnowlensError, match="fit must be"):
        evaluate_signals(organism.model, organism.world, known, fit="sometimes")
