"""The familiarity task of a world that trains one (`familiarity.recognition`): does the model say it knows a
name it was trained on, and that it does not know one it has never seen?

Every entity of each split is asked every recognition question; the score is the logit of the known answer's
first word minus that of the unknown answer's, at the last prompt token. Unknown entities are never asked in
training, so their answers show whether the model computes familiarity from a name or only memorised its
list. This reads the model's *output*, not its residual stream: a positive control for the signal gates
(a model that answers it well can tell familiar from unfamiliar names; the gates ask whether it does so
while answering other questions).
"""

from __future__ import annotations

from typing import Any

import torch

from knowlens.organism.corpus import qa_prompt
from knowlens.organism.world import World
from knowlens.probes import auroc, bootstrap_ci

SPLITS = ("known", "partial", "refusal", "unknown")


@torch.no_grad()
def recognition_figures(model: Any, world: World, *, batch_size: int = 64) -> dict[str, Any] | None:
    """Per split: the share of (entity, question) pairs answered with the known answer, and the median score;
    AUROC known vs unknown entities with a 95% bootstrap interval over entities. None when the world trains
    no recognition task."""
    rec = world.spec.familiarity.recognition
    if not rec.questions:
        return None
    ids = [int(model.to_tokens(a.split()[0], prepend_bos=False)[0, 0]) for a in (rec.known_answer, rec.unknown_answer)]
    rows = [(e.name, e.split, qa_prompt(q.format(name=e.name))) for e in world.entities for q in rec.questions]
    scores = torch.empty(len(rows), dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        chunk = [p for _, _, p in rows[i : i + batch_size]]
        tokens = [model.to_tokens(p, prepend_bos=True)[0] for p in chunk]
        last = torch.tensor([len(t) - 1 for t in tokens])
        pad = model.tokenizer.pad_token_id
        batch = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=pad)
        logits = model(batch.to(model.cfg.device))[torch.arange(len(chunk)), last.to(model.cfg.device)]
        scores[i : i + len(chunk)] = (logits[:, ids[0]] - logits[:, ids[1]]).double().cpu()
    out: dict[str, Any] = {"questions": list(rec.questions), "splits": {}}
    for split in SPLITS:
        sel = torch.tensor([s == split for _, s, _ in rows])
        if sel.any():
            out["splits"][split] = {
                "says_known": round(float((scores[sel] > 0).double().mean()), 4),
                "median_score": round(float(scores[sel].median()), 3),
                "n": int(sel.sum()),
            }
    pair = torch.tensor([s in ("known", "unknown") for _, s, _ in rows])
    labels = torch.tensor([s == "known" for _, s, _ in rows])[pair]
    if labels.any() and not labels.all():
        groups = [n for (n, s, _), k in zip(rows, pair.tolist()) if k]
        value = auroc(scores[pair], labels)
        lo, hi = bootstrap_ci(scores[pair], labels, groups)
        out["auroc_known_vs_unknown"] = {"value": round(value, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return out
