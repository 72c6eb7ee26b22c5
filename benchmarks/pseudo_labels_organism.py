"""Self-consistency pseudo-label probe on the shipped organism, judged by the grader (evaluation only).

Fit: `fit_pseudo_probes(..., sources=("self_consistency",))` on the organism's held-out *question prompts* (prompts
only; k=8 samples at temperature 1; groups = entity). Eval: `label_generation` with the fitted probe on held-out
questions + biography requests; the grader's answer-value tokens (claims' value spans, class correct or
hallucinated, as `knowlens.analyses.signals._token_gates` picks them); AUROC of p_reliable (score for "correct")
next to top-1 probability, -entropy and the self-consistency agreement itself (k=8 samples of the eval prompts).
Two ways: in-sample (fit on every held-out question prompt, evaluate on every held-out item) and cross-fitted (entities
split in two halves; each half's items scored by the probe fitted on the other half's prompts, pooled).
usage: python benchmarks/pseudo_labels_organism.py [temperature] [organism folder]
"""

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from knowlens.labels import label_generation
from knowlens.organism.grader import grade_answer
from knowlens.organism.store import load_organism
from knowlens.probes import auroc, bootstrap_ci, load_probe
from knowlens.probes.pseudo import default_hooks, fit_pseudo_probes, self_consistency_labels

torch.set_num_threads(1)
T = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
t0 = time.time()
org = load_organism(sys.argv[2]) if len(sys.argv) > 2 else load_organism()
model, world = org.model, org.world
held = list(org.corpus.held_out)
questions = [h for h in held if h.kind == "question"]
entities = sorted({h.entity for h in held})
random.Random(0).shuffle(entities)
half = {e: i % 2 for i, e in enumerate(entities)}
hooks = default_hooks(model)
tmp = Path(tempfile.mkdtemp())


def fit(items, tag):
    fits = fit_pseudo_probes(model, [h.prompt for h in items], hooks=hooks, out_dir=tmp / tag,
                             sources=("self_consistency",), k=8, seed=0, groups=[h.entity for h in items],
                             options={"self_consistency": {"max_new_tokens": 48, "temperature": T}},
                             model_name="organism")
    f = fits["self_consistency"]
    print(f"[{time.time() - t0:.0f}s] fit {tag}: {f.training['pseudo']['counts']} hook {f.training['pseudo']['hook']} "
          f"pseudo OOF AUROC {f.metrics['oof_auroc']:.3f} {f.training['pseudo']['hook_oof_auroc']}", flush=True)
    return load_probe(tmp / tag / "self_consistency.safetensors", model=model)


def value_rows(items, probe):
    labels = label_generation(model, [h.prompt for h in items], [probe], max_new_tokens=48, batch_size=64)
    rows = []  # (item index, token index, p_reliable, top1, entropy, correct)
    for i, (h, g) in enumerate(zip(items, labels)):
        grade = grade_answer(world, list(g.token_texts), entity=h.entity)
        for c in grade.claims:
            for j in range(*c.value_tokens):
                if grade.classes[j] in ("correct", "hallucinated"):
                    t = g.tokens[j]
                    rows.append((i, j, t.p_reliable, t.signals["top1_prob"], t.signals["entropy"],
                                 grade.classes[j] == "correct"))
    return rows


def figures(rows, items, name):
    y = torch.tensor([r[5] for r in rows])
    groups = [items[r[0]].entity for r in rows]
    out = {"n_correct": int(y.sum()), "n_hallucinated": int((~y).sum())}
    for key, col, sign in (("probe", 2, 1), ("top1_prob", 3, 1), ("neg_entropy", 4, -1)):
        s = sign * torch.tensor([r[col] for r in rows], dtype=torch.float64)
        out[key] = [round(auroc(s, y), 4), [round(v, 4) for v in bootstrap_ci(s, y, groups, n=1000, seed=0)]]
    print(name, json.dumps(out), flush=True)
    return out


probe_all = fit(questions, "all")
rows_all = value_rows(held, probe_all)
res = {"temperature": T, "in_sample": figures(rows_all, held, "in-sample (fit on all question prompts)")}
pooled = []
for part in (0, 1):
    fit_items = [h for h in questions if half[h.entity] != part]
    eval_items = [h for h in held if half[h.entity] == part]
    probe = fit(fit_items, f"half{part}")
    pooled += [(r, eval_items[r[0]]) for r in value_rows(eval_items, probe)]
items_p = [it for _, it in pooled]
rows_p = [(k, *r[1:]) for k, (r, _) in enumerate(pooled)]
res["cross_fitted"] = figures(rows_p, items_p, "cross-fitted by entity halves")

# the self-consistency agreement (k=8, span containment, every non-special token not copied from the prompt) as
# a score, on the same value tokens of the in-sample answers
agree = self_consistency_labels(model, [h.prompt for h in held], hooks=hooks[-1:], k=8, seed=1, temperature=T,
                                threshold=1.0, max_df=1.0, max_new_tokens=48, batch_size=128)
a = {(int(p), int(j)): float(v) for p, j, v in zip(agree.meta["prompt"], agree.meta["index"], agree.meta["agreement"])}
kept = [r for r in rows_all if (r[0], r[1]) in a]
y = torch.tensor([r[5] for r in kept])
s = torch.tensor([a[(r[0], r[1])] for r in kept], dtype=torch.float64)
res["self_consistency_k8_agreement"] = {"n": len(kept), "of": len(rows_all), "auroc": round(auroc(s, y), 4),
                                        "ci95": [round(v, 4) for v in bootstrap_ci(s, y, [held[r[0]].entity for r in kept], n=1000, seed=0)]}
print("self-consistency agreement", json.dumps(res["self_consistency_k8_agreement"]), flush=True)
print(json.dumps(res, indent=1))
print(f"total {time.time() - t0:.0f}s")

# ---- diagnostics: every hook's self-consistency probe (fitted on every question prompt) on the same value tokens, and
# the ground-truth probe (grader labels, 5 folds grouped by entity: the upper-bound reference, evaluation only)
from knowlens.analyses.answers import answer_items  # noqa: E402
from knowlens.probes import fit_probe  # noqa: E402

answers = answer_items(model, world, held, hooks=hooks, batch_size=128, max_new_tokens=48)
vrows = [(a, j) for a in answers for c in a.grade.claims for j in range(*c.value_tokens)
         if a.grade.classes[j] in ("correct", "hallucinated")]
yv = torch.tensor([a.grade.classes[j] == "correct" for a, j in vrows])
gv = [a.item.entity for a, _ in vrows]
sc_rows = self_consistency_labels(model, [h.prompt for h in questions], hooks=hooks, k=8, seed=0, temperature=T,
                                  max_new_tokens=48, groups=[h.entity for h in questions])
diag = {"n_value_tokens": len(vrows), "per_hook": {}}
for h in hooks:
    X = torch.stack([a.activations[h][len(a.prompt_tokens) + j - 1] for a, j in vrows]).double()
    Xs, ys, gs = sc_rows.rows(h)
    f = fit_probe(Xs.double(), ys, gs, class_weight="balanced", n_boot=0)
    truth = fit_probe(X, yv, gv, class_weight="balanced", n_boot=0)
    diag["per_hook"][h] = {"pseudo_probe_on_values": round(auroc(f.predict(X.to(f.mean.device)), yv), 4),
                           "pseudo_oof_on_pseudo": round(f.metrics["oof_auroc"], 4),
                           "ground_truth_probe_oof": round(truth.metrics["oof_auroc"], 4)}
print("diagnostics", json.dumps(diag, indent=1))
print(f"total {time.time() - t0:.0f}s")
