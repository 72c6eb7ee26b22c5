"""Where an organism's hallucinated answer-value tokens come from, and how well the signal-gate probe and top-1
probability separate each source from the correct tokens.

usage: python benchmarks/signal_breakdown.py ORGANISM_FOLDER   (about 3 minutes on one thread)

Prints the hallucinated / correct value-token counts per entity split; the nested out-of-fold probe AUROC (the
`token_hallucination` signal gate's probe: hook chosen inside each training fold, 5 folds grouped by entity)
and top-1 AUROC, overall and per hook; per split, that split's hallucinated tokens against every correct token
(the probe's out-of-fold scores and top-1); and the answer verdicts per split.

Then two ceilings, scored on the same tokens with the world's truth (no model involved): an *entity oracle* that
knows which claim subjects were in training (known or partial entities) and a *fact oracle* that knows which
(subject, attribute) facts were (`Entity.trained_attributes`); tokens that state an untrained fact correctly
("lucky-correct": a guess that happens to be right) cap both. And whether familiarity is readable where the
tokens are produced: the same nested probe trained on unknown- vs known-entity value tokens, whatever their class.
Last, the same figures for values' first tokens and for their later tokens (the rest of a multi-token value).
"""

from __future__ import annotations

import collections
import os
import sys


def main(folder: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from knowlens.analyses.answers import answer_items
    from knowlens.analyses.signals import _stack, signal_hooks
    from knowlens.organism.corpus import every_phrasing
    from knowlens.organism.store import load_organism
    from knowlens.probes import L2_GRID, auroc, cross_validate_select

    org = load_organism(folder)
    hooks = signal_hooks(org.model.cfg.n_layers)
    answers = answer_items(org.model, org.world, every_phrasing(org.world, org.corpus.held_out), hooks=hooks)
    rows = [(a, j) for a in answers for c in a.grade.claims for j in range(*c.value_tokens)
            if a.grade.classes[j] in ("correct", "hallucinated")]  # fmt: skip
    halluc = torch.tensor([a.grade.classes[j] == "hallucinated" for a, j in rows])
    split = [a.item.split for a, _ in rows]
    counts = {s: (sum(1 for r, h in zip(split, halluc) if r == s and h), sum(1 for r, h in zip(split, halluc)
              if r == s and not h)) for s in sorted(set(split))}  # fmt: skip
    print("value tokens by split (hallucinated, correct):", counts)
    groups = [a.item.entity for a, _ in rows]
    at = [len(a.prompt_tokens) + j - 1 for a, j in rows]  # the position that predicted the token
    feats = {f"{h}@before_token": _stack([a for a, _ in rows], h, at) for h in hooks}
    sel = cross_validate_select(feats, halluc, groups, l2_grid=L2_GRID, k=5, inner_k=3, seed=0)
    scores = sel.nested.scores
    top1 = -torch.tensor([a.top1[j] for a, j in rows], dtype=torch.float64)  # low top-1: "hallucinated"
    print(f"probe {sel.nested.auroc:.3f}, top-1 {auroc(top1, halluc):.3f}; per hook:",
          {c: round(r.auroc, 3) for c, r in sel.candidates.items()})  # fmt: skip
    correct = [i for i, h in enumerate(halluc) if not h]
    for s in sorted(set(split)):
        mine = [i for i, (r, h) in enumerate(zip(split, halluc)) if r == s and h]
        if not mine:
            continue
        idx = torch.tensor(mine + correct)
        print(f"  hallucinated[{s}] (n={len(mine)}) vs all correct: probe {auroc(scores[idx], halluc[idx]):.3f}, "
              f"top-1 {auroc(top1[idx], halluc[idx]):.3f}")  # fmt: skip
    verdicts = collections.Counter((a.item.split, a.grade.verdict) for a in answers if a.item.kind == "question")
    print("question verdicts:", dict(sorted(verdicts.items())))

    entities = org.world.by_name
    subject = [entities.get(c.subject) for a in answers for c in a.grade.claims for j in range(*c.value_tokens)
               if a.grade.classes[j] in ("correct", "hallucinated")]  # fmt: skip
    attribute = [c.attribute for a in answers for c in a.grade.claims for j in range(*c.value_tokens)
                 if a.grade.classes[j] in ("correct", "hallucinated")]  # fmt: skip
    unfamiliar = torch.tensor([e is None or e.split not in ("known", "partial") for e in subject], dtype=torch.float64)
    untrained = torch.tensor([e is None or att not in e.trained_attributes() for e, att in zip(subject, attribute)],
                             dtype=torch.float64)  # fmt: skip
    lucky = int(((untrained > 0) & ~halluc).sum())
    wrong_known = int(((untrained == 0) & halluc).sum())
    print(f"ceilings on the same tokens: entity oracle {auroc(unfamiliar, halluc):.3f}, fact oracle "
          f"{auroc(untrained, halluc):.3f} ({lucky} lucky-correct tokens on untrained facts, {wrong_known} "
          f"hallucinated tokens on trained facts)")  # fmt: skip
    keep = [i for i, e in enumerate(subject) if e is not None and e.split in ("known", "unknown")]
    if keep:
        idx = torch.tensor(keep)
        is_unknown = torch.tensor([subject[i].split == "unknown" for i in keep])
        fam = cross_validate_select({k: v[idx] for k, v in feats.items()}, is_unknown, [groups[i] for i in keep],
                                    l2_grid=L2_GRID, k=5, inner_k=3, seed=0)  # fmt: skip
        print(f"familiarity where the tokens are produced: unknown- vs known-entity value tokens "
              f"({int(is_unknown.sum())} / {int((~is_unknown).sum())}), nested probe {fam.nested.auroc:.3f}")

    # A value's first token against its later ones (the later pieces of a multi-token value such as a birth
    # city): the gate probe's scores on each, a probe fitted on each alone, and familiarity readable on each.
    first = [j == c.value_tokens[0] for a in answers for c in a.grade.claims for j in range(*c.value_tokens)
             if a.grade.classes[j] in ("correct", "hallucinated")]  # fmt: skip
    for what, part in (("first", True), ("later", False)):
        idx = [i for i, f in enumerate(first) if f == part]
        h = halluc[idx]
        if not idx or int(h.sum()) in (0, len(idx)):
            continue
        t = torch.tensor(idx)
        own = cross_validate_select({k: v[t] for k, v in feats.items()}, h, [groups[i] for i in idx],
                                    l2_grid=L2_GRID, k=5, inner_k=3, seed=0)  # fmt: skip
        line = (f"{what} value tokens ({int(h.sum())} hallucinated / {int((~h).sum())} correct): gate probe "
                f"{auroc(scores[t], h):.3f}, top-1 {auroc(top1[t], h):.3f}, a probe fitted on them alone "
                f"{own.nested.auroc:.3f}")  # fmt: skip
        kept = [i for i in idx if subject[i] is not None and subject[i].split in ("known", "unknown")]
        is_unknown = torch.tensor([subject[i].split == "unknown" for i in kept])
        if kept and 0 < int(is_unknown.sum()) < len(kept):
            tk = torch.tensor(kept)
            fam = cross_validate_select({k: v[tk] for k, v in feats.items()}, is_unknown, [groups[i] for i in kept],
                                        l2_grid=L2_GRID, k=5, inner_k=3, seed=0)  # fmt: skip
            line += f", familiarity (unknown vs known subject) {fam.nested.auroc:.3f}"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
