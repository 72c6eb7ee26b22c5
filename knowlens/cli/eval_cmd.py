"""`knowlens eval`: every reliability signal against an organism's ground truth, side by side (markdown, JSON, HTML)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

OWNED = ("eval.md", "eval.json", "eval.html")
EPILOG = """\
rows: the answer-value tokens (the grader's claims' value spans, correct or hallucinated) of the organism's greedy
answers to its held-out questions and biography requests (--items N: a seeded sample of N of them).
signals: knowlens labels (p_reliable of `knowlens label`; --probe FILE, repeatable, else exemplar-free
self-consistency probes fitted on the fly on the question prompts, prompts only: --fit cross (default) fits one per
half of the entities and labels each half with the other half's probe, --fit all one on every prompt); the
ground-truth probe (upper bound: out-of-fold logistic probe on the grader's classes, folds grouped by entity); the
best single SAE latent (--sae; picked on one entity half, scoring the other); top-1 probability; entropy;
self-consistency (--k sampled answers; a value token's agreement is the share of samples containing its value span).
metrics: AUROC, AUPRC and recall at 10% false-positive rate of hallucinated tokens; ECE and Brier of P(correct)
(probabilities only; n/a for entropy) and after Platt scaling cross-fitted on entity folds; a risk-coverage curve of
answers (reliability = the minimum over an answer's value tokens) and its area; 95% bootstrap intervals over
entities; AUROC per split; forward passes per generated token.
output: the markdown table on stdout; with --out DIR also eval.md, eval.json and eval.html (self-contained plotly:
ROC curves, reliability diagram, risk-coverage), each written atomically; with --results FILE a markdown page with the
table, the organism's provenance and the command that regenerates the page (docs/results/organism.md).
needs an organism (`organism` or an organism folder): its world is the ground truth; another model exits 2.
across cue strengths (0, default, 0.95): python benchmarks/cue_sweep.py --out DIR (a small organism per strength).
example: knowlens eval --model organism --out eval/ --threads 1"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="every reliability signal against an organism's ground truth: AUROC, AUPRC, ECE, risk-coverage",
        description="Evaluate knowlens's exemplar-free labels next to the ground-truth probe, an SAE latent, top-1 "
        "probability, entropy and self-consistency on the organism's held-out answers, token by token.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", default="organism", help="'organism' (default) or an organism folder")
    p.add_argument("--probe", action="append", type=Path, default=None, metavar="FILE",
                   help="probe file for the labels (.safetensors with its .json card); repeatable")  # fmt: skip
    p.add_argument("--sae", default=None, metavar="S", help="SAE for the best-single-latent signal (as load_sae reads)")
    p.add_argument("--k", type=int, default=8, help="sampled answers per prompt for self-consistency (default 8)")
    p.add_argument("--fit", choices=["cross", "all"], default="cross", help="how the on-the-fly probes are fitted")
    p.add_argument("--items", type=int, default=None, metavar="N", help="evaluate a seeded sample of N held-out items")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over entities (default 1000)")
    p.add_argument("--folds", type=int, default=5, help="entity folds (ground-truth probe, Platt) (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed: halves, samples, folds, resamples (default 0)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="folder for eval.md, eval.json, eval.html")
    p.add_argument("--results", type=Path, default=None, metavar="FILE",
                   help="a results page (.md): the table under a header naming the organism and the command that "
                   "regenerates the page (docs/results/organism.md is one)")
    p.add_argument("--overwrite", action="store_true", help="replace eval.* in --out, or the --results page")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(run=run, command="eval")


def run(args: argparse.Namespace) -> int:
    from knowlens.cli.label_cmd import _probe_file
    from knowlens.errors import KnowlensError
    from knowlens.models import check_device
    from knowlens.outputs import check_output_dir

    t0 = time.time()
    if args.model != "organism" and not Path(args.model).is_dir():
        raise KnowlensError(f"--model {args.model}: eval needs an organism, whose world is the ground truth "
                            "('organism' or an organism folder)")  # fmt: skip
    check_device(args.device)
    for flag, value, low in (("--k", args.k, 1), ("--items", args.items, 2), ("--n-boot", args.n_boot, 0),
                             ("--folds", args.folds, 2), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--threads", args.threads, 1)):  # fmt: skip
        if value is not None and value < low:
            raise KnowlensError(f"{flag} must be >= {low}, got {value}")
    probes = [_probe_file(p) for p in args.probe or []]
    if args.out is not None:
        check_output_dir(args.out, flag="--out", overwrite=args.overwrite, owned=OWNED)
    if args.results is not None:
        check_results_file(args.results, overwrite=args.overwrite)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from knowlens.analyses import evaluate_signals
    from knowlens.organism.store import load_organism, organism_path

    org = load_organism(organism_path(args.model), device=args.device)
    org.model.cfg.model_name = args.model
    sae = None
    if args.sae is not None:
        from knowlens.saes import load_sae

        sae = load_sae(args.sae, org.model)
    items = list(org.corpus.held_out)
    if args.items is not None and args.items < len(items):
        import random

        keep = sorted(random.Random(args.seed).sample(range(len(items)), args.items))
        items = [items[i] for i in keep]

    def log(line: str) -> None:
        print(f"[{time.time() - t0:5.0f}s] {line}", file=sys.stderr, flush=True)

    from knowlens.saes.contrast import organism_training_texts

    ev = evaluate_signals(org.model, org.world, items, probes=probes or None, sae=sae, k=args.k, fit=args.fit,
                          seed=args.seed, n_boot=args.n_boot, folds=args.folds, max_new_tokens=args.max_new_tokens,
                          training_texts=organism_training_texts(org), log=log)  # fmt: skip
    table = ev.to_markdown()
    print(table)
    if args.out is not None:
        from knowlens.outputs import atomic_write_text

        atomic_write_text(args.out / "eval.md", table)
        atomic_write_text(args.out / "eval.json", json.dumps(ev.to_dict(), indent=1) + "\n")
        ev.to_html(args.out / "eval.html", title=f"knowlens eval: {args.model}")
        print(f"wrote {args.out / 'eval.md'}, eval.json, eval.html", file=sys.stderr)
    if args.results is not None:
        from knowlens.outputs import atomic_write_text

        atomic_write_text(args.results, results_page(args, org, table, time.time() - t0))
        print(f"wrote {args.results}", file=sys.stderr)
    log("done")
    return 0


def check_results_file(path: Path, *, overwrite: bool) -> None:
    from knowlens.errors import KnowlensError

    if path.suffix != ".md":
        raise KnowlensError(f"--results {path}: a results page is markdown; name it *.md")
    if not path.parent.is_dir():
        raise KnowlensError(f"--results {path}: no such folder {path.parent}")
    if path.exists() and not overwrite:
        raise KnowlensError(f"--results {path} exists; pass --overwrite to replace it")


def regenerate_command(args: argparse.Namespace) -> str:
    """The `knowlens eval` command line that measures what ``args`` asked for and rewrites its results page."""
    import shlex

    parts = ["knowlens", "eval"] + (["--model", str(args.model)] if args.model != "organism" else [])
    for probe in args.probe or []:
        parts += ["--probe", str(probe)]
    for flag, value, default in (("--sae", args.sae, None), ("--k", args.k, 8), ("--fit", args.fit, "cross"),
                                 ("--items", args.items, None), ("--n-boot", args.n_boot, 1000),
                                 ("--folds", args.folds, 5), ("--max-new-tokens", args.max_new_tokens, 48),
                                 ("--seed", args.seed, 0), ("--device", args.device, "cpu"),
                                 ("--threads", args.threads, None)):  # fmt: skip
        if value != default:
            parts += [flag, str(value)]
    return shlex.join([*parts, "--results", str(args.results), "--overwrite"])


def results_page(args: argparse.Namespace, org: Any, table: str, seconds: float) -> str:
    import datetime
    import os

    record = org.info or {}
    train = (record.get("training") or {}).get("train_config") or {}
    made = (f"world `{org.world.spec.name}`, trained {train['epochs']} epochs on {train.get('threads')} thread(s)"
            if train.get("epochs") else f"world `{org.world.spec.name}`")  # fmt: skip
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"# knowlens evaluation: {args.model}\n\n"
            f"Organism `{args.model}` (weights fingerprint `{record.get('fingerprint')}`; {made}). "
            f"Measured {when} in {seconds:.0f} s on {os.cpu_count()} CPU cores"
            + (f", {args.threads} torch thread(s)" if args.threads else "") + f", device {args.device}.\n\n"
            f"Regenerate this page (from the repository root):\n\n    {regenerate_command(args)}\n\n{table}")
