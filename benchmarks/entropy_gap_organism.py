"""Entropy-gap study on the shipped organism (a measurement, not a test): issue 8, part 5.

    python benchmarks/entropy_gap_organism.py                  # 1 thread, every held-out question
    python benchmarks/entropy_gap_organism.py --out gap.json   # also write both studies' to_dict()

Prompts: every held-out question of the organism's world (``corpus.held_out``: attribute questions and biography
requests, never trained), as ``Q : <question> A :``. Own continuation: the organism's greedy answer (up to 48
tokens, cut before its EOS). Other continuation, two studies:

* ``truth``: the world's true answer after the same prompt (``answer_for``: the attribute's first fact template;
  a biography request: ``biography_for``, every attribute's first fact template in spec order);
* ``swap``: another held-out question's own greedy answer (a seeded derangement over all prompts, so a question
  may receive a biography answer and vice versa).

For each, output entropy H and input surprisal S at the aligned positions (definitions, alignment and bootstrap:
``knowlens/analyses/entropy_gap.py``), the ratio own/other with a 95% bootstrap interval over prompts, overall
and split by the asked entity's split (known / partial / unknown / refusal). For ``truth`` also the same restricted to
the prompts whose answer differs from the truth (an identical answer gives identical values, ratio 1). The last line printed is the
JSON of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

SPLITS = ("known", "partial", "unknown", "refusal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="'organism' or an organism folder (default: organism)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--n-bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write both studies' to_dict() (and the splits) to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from knowlens.analyses import entropy_gap, format_entropy_gap
    from knowlens.organism.corpus import answer_for, biography_for
    from knowlens.organism.store import load_organism, organism_path

    org = load_organism(organism_path(args.model))
    items = list(org.corpus.held_out)
    prompts = [it.prompt for it in items]
    by_name = org.world.by_name
    truths = [
        biography_for(org.world, by_name[it.entity])
        if it.attribute is None
        else answer_for(org.world, by_name[it.entity], it.attribute)
        for it in items
    ]
    common: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, n_bootstrap=args.n_bootstrap, seed=args.seed)
    started = time.perf_counter()
    studies = {
        "truth": entropy_gap(org.model, prompts, others=truths, **common),
        "swap": entropy_gap(org.model, prompts, others="derange", **common),
    }
    seconds = time.perf_counter() - started
    print(f"organism {args.model}: {len(items)} held-out questions, greedy own answers; {args.threads} thread(s), "
          f"{seconds:.1f} s for both studies")  # fmt: skip
    figures: dict[str, Any] = {"questions": len(items), "seconds": round(seconds, 1), "threads": args.threads}
    for name, gap in studies.items():
        print()
        print(format_entropy_gap(gap, positions=12, title=f"[{name}] own greedy answer vs "
                                 + ("the world's true answer" if name == "truth" else "another question's answer")))
        groups = {s: [i for i, it in enumerate(items) if it.split == s] for s in SPLITS}
        if name == "truth":  # identical continuations give identical values (ratio 1): the rest alone
            differ = {i for i in range(len(items)) if gap.own_tokens[i] != gap.other_tokens[i]}
            groups["all, differing"] = sorted(differ)
            groups.update({f"{s}, differing": [i for i in groups[s] if i in differ] for s in SPLITS})
        rows = {"all": _row(gap)}
        print(f"  {'subset':<24} {'prompts':>7} {'pos':>6} {'ident':>5}   {'H ratio [95% CI]':<24} {'S ratio [95% CI]':<24}")
        for label, idx in [("all", list(range(len(items)))), *groups.items()]:
            sub = gap if label == "all" else (gap.subset(idx) if idx else None)
            if sub is None:
                continue
            rows[label] = _row(sub)
            r = rows[label]
            print(f"  {label:<24} {r['prompts']:>7} {r['positions']:>6} {r['identical']:>5}   "
                  f"{_ci(r['entropy']):<24} {_ci(r['surprisal']):<24}")  # fmt: skip
        figures[name] = rows
    if args.out:
        full = {name: gap.to_dict() for name, gap in studies.items()}
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"figures": figures, "studies": full}, fh, indent=2, allow_nan=False)
        print(f"\nwritten to {args.out}")
    print(json.dumps(figures, allow_nan=False))
    return 0


def _row(gap: Any) -> dict[str, Any]:
    d = gap.to_dict()
    return {
        "prompts": d["n_prompts"],
        "positions": d["n_positions"],
        "identical": d["n_identical"],
        "entropy": {k: d["entropy"][k] for k in ("ratio", "interval", "own_mean", "other_mean")},
        "surprisal": {k: d["surprisal"][k] for k in ("ratio", "interval", "own_mean", "other_mean")},
    }


def _ci(fig: dict[str, Any]) -> str:
    if fig["ratio"] is None:
        return "n/a"
    lo, hi = fig["interval"]
    return f"{fig['ratio']:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{fig['ratio']:.3f} [n/a]"


if __name__ == "__main__":
    raise SystemExit(main())
