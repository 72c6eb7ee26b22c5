"""The evaluation across cue strengths: one small organism per strength, every signal on its held-out answers.

A surface cue is a name piece that predicts an attribute value (``cues`` in a world file; ``cue_strength`` is the
probability that an entity whose name holds the piece gets the cue's value). The stronger the cues, the more
confidently the organism answers about an entity it has never seen, so the more its hallucinations look, to
output confidence, like what it knows. This sweep shows where output confidence fails and internal signals hold.

How the organisms are made small: the default world (or ``--world``) with only ``cue_strength`` changed, trained
with the shipped recipe but ``--epochs`` epochs (default 150, a third of the shipped organism's 450), on one CPU
thread each. Each is then evaluated as ``knowlens eval`` does (`knowlens.analyses.evaluate_signals`: the
exemplar-free entity-slot probe, self-consistency probes, the ground-truth probe, top-1 probability, entropy,
self-consistency with k samples) on its held-out answer-value tokens, with its behaviour gates beside.

    python benchmarks/cue_sweep.py --out cue_sweep/                       # strengths 0, the world's, 0.95
    python benchmarks/cue_sweep.py --strengths 0,0.95 --epochs 2 --items 40 --k 2 --out /tmp/smoke   # a smoke run

Writes ``<out>/cue<strength>/`` (each organism), ``summary.json`` and ``table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("probe:entity_slot", "labels", "ground_truth_probe", "top1_prob", "entropy", "self_consistency")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=ROOT / "knowlens" / "organism" / "worlds" / "default.yaml")
    p.add_argument("--strengths", default=None, help="comma-separated cue strengths (default: 0, the world's, 0.95)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--k", type=int, default=8, help="samples per prompt for self-consistency (default 8)")
    p.add_argument("--items", type=int, default=None, help="a seeded sample of N held-out items (default: all)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--results", type=Path, default=None, help="also write the table as a results page (.md)")
    return p.parse_args(argv)


def run_strength(world: Path, strength: float, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import random

    import torch
    import yaml

    from knowlens.analyses import evaluate_signals
    from knowlens.analyses.answers import answer_items
    from knowlens.analyses.gates import gate_figures
    from knowlens.errors import KnowlensError
    from knowlens.organism.spec import parse_spec
    from knowlens.organism.store import load_organism
    from knowlens.organism.train import TrainConfig, train_organism
    from knowlens.saes.contrast import organism_training_texts

    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(world.read_text())
    raw["cue_strength"] = strength
    for cue in raw.get("cues", []):  # a cue's own strength would override the sweep's
        cue.pop("strength", None)
    folder = out / f"cue{strength:g}"
    config = replace(TrainConfig(), epochs=args.epochs, threads=args.threads)
    started = time.time()
    if not (folder / "model.safetensors").exists():
        train_organism(parse_spec(raw), folder, config=config, progress=False)
    trained = time.time() - started
    org = load_organism(folder)
    items = list(org.corpus.held_out)
    if args.items is not None and args.items < len(items):
        items = [items[i] for i in sorted(random.Random(0).sample(range(len(items)), args.items))]
    gates = gate_figures(answer_items(org.model, org.world, items))
    row: dict[str, Any] = {"cue_strength": strength, "epochs": args.epochs, "train_seconds": round(trained, 1),
                           "behaviour": {k: g["value"] for k, g in gates["gates"].items()}}  # fmt: skip
    try:
        ev = evaluate_signals(org.model, org.world, items, k=args.k, n_boot=args.n_boot,
                              training_texts=organism_training_texts(org))  # fmt: skip
    except KnowlensError as err:  # e.g. an organism too small to hallucinate: record why, go on
        return {**row, "error": str(err), "counts": None, "auroc": {}}
    (folder / "eval.md").write_text(ev.to_markdown())
    auroc = {}
    for name in SIGNALS:
        try:
            auroc[name] = ev[name].metrics["auroc"]
        except KeyError:
            auroc[name] = None
    return {**row, "world": raw.get("name"), "eval_seconds": round(time.time() - started - trained, 1), "counts": ev.counts, "auroc": auroc,
            "skipped": ev.skipped}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| cue strength | hallucinated / correct tokens | entity-slot probe (exemplar-free) | self-consistency "
            "probes (exemplar-free) | ground-truth probe | top-1 probability | entropy | self-consistency (k) |")
    lines = [head, "|" + " --- |" * 8]

    def cell(r: dict[str, Any], name: str) -> str:
        m = r["auroc"].get(name)
        if not m or m.get("value") is None:
            return "n/a"
        lo, hi = m.get("ci95") or (None, None)
        return f"{m['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")

    for r in rows:
        c = r["counts"]
        if c is None:
            lines.append(f"| {r['cue_strength']:g} | not evaluated: {r['error']} |" + " |" * 6)
            continue
        lines.append(f"| {r['cue_strength']:g} | {c['hallucinated']} / {c['correct']} | "
                     + " | ".join(cell(r, n) for n in ("probe:entity_slot", "labels", "ground_truth_probe", "top1_prob",
                                                      "entropy", "self_consistency")) + " |")  # fmt: skip
    return "\n".join(lines)


def page(rows: list[dict[str, Any]], text: str, argv: list[str]) -> str:
    import shlex

    behaviour = ["| cue strength | known accuracy | refusal-trained refused | unknown refused | unknown hallucinated "
                 "| hallucinated top-1 median | training s |", "|" + " --- |" * 7]
    for r in rows:
        b = r["behaviour"]
        behaviour.append(f"| {r['cue_strength']:g} | {b['known_accuracy']:.3f} | {b['refusal_refused']:.3f} | "
                         f"{b['unknown_refusal_rate']:.3f} | {b['unknown_hallucination_rate']:.3f} | "
                         f"{b['hallucinated_top1_median']:.3f} | {r['train_seconds']:.0f} |")  # fmt: skip
    return (f"# knowlens evaluation across cue strengths\n\nOne small organism per cue strength: the world "
            f"`{rows[0].get('world', 'default')}` with only `cue_strength` changed, {rows[0]['epochs']} epochs of the "
            "shipped recipe on one CPU thread (the shipped organism: 450). Token AUROC of hallucinated vs correct "
            "answer-value tokens on each organism's held-out answers (95% bootstrap over entities), as `knowlens "
            "eval` measures it; the entity-slot probe and the self-consistency probes are exemplar-free, fitted on "
            "the fly.\n\nRegenerate (from the repository root; an organism already in --out is not retrained):\n\n"
            f"    python benchmarks/cue_sweep.py {shlex.join(argv)}\n\n{text}\n\nBehaviour of each organism "
            "(greedy answers to its held-out questions):\n\n" + "\n".join(behaviour) + "\n")


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    default = float(yaml.safe_load(args.world.read_text()).get("cue_strength", 0.8))
    strengths = [float(s) for s in args.strengths.split(",")] if args.strengths else [0.0, default, 0.95]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in strengths:
        t0 = time.time()
        rows.append(run_strength(args.world, s, args.out, args))
        print(f"# cue {s:g}: {time.time() - t0:.0f} s; " + json.dumps(rows[-1]["behaviour"]), file=sys.stderr, flush=True)
        (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    if args.results is not None:
        args.results.write_text(page(rows, text, argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
