"""`knowlens demo`: the organism answers held-out questions; every token is labelled and graded."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in organism on held-out questions; write labels.jsonl and report.html",
        description="Loads the built-in model organism, answers held-out questions and biography requests about "
        "known, partial, refusal-trained and unknown entities (greedy, KV-cached, batched), grades every "
        "generated token against the world (correct / hallucinated / refusal / other), labels it with the "
        "organism's shipped exemplar-free probe (p_reliable, reliable / unreliable) and writes labels.jsonl "
        "(per token: text, class, log-probability, entropy, top-1 probability, p_reliable, label) and a "
        "self-contained report.html.",
        epilog="example: knowlens demo --out knowlens-demo/",
    )
    p.add_argument("--out", default="knowlens-demo", help="output folder (default: knowlens-demo/)")
    p.add_argument("--per-split", type=int, default=16, help="questions per split (default 16)")
    p.add_argument("--bios-per-split", type=int, default=4, help="biography requests per split (default 4)")
    p.add_argument("--model", default="organism", help="'organism' (shipped) or a folder from `organism train`")
    p.add_argument("--overwrite", action="store_true", help="replace labels.jsonl and report.html already in --out")
    p.set_defaults(run=run, command="demo")


def run(args: argparse.Namespace) -> int:
    import random
    import time

    from knowlens.analyses.answers import answer_items
    from knowlens.analyses.report import (
        labels_text,
        summary_text,
        token_reliability,
        write_labels,
        write_report,
    )
    from knowlens.errors import KnowlensError
    from knowlens.fingerprint import model_identity
    from knowlens.organism.store import load_organism, organism_path
    from knowlens.outputs import check_output_dir, removed_on_failure

    if args.per_split < 0 or args.bios_per_split < 0 or args.per_split + args.bios_per_split == 0:
        raise KnowlensError("--per-split and --bios-per-split must be >= 0 and not both 0")
    out = check_output_dir(args.out, overwrite=args.overwrite, owned=("labels.jsonl", "report.html"))
    path = organism_path(args.model)
    start = time.perf_counter()
    org = load_organism(path)
    identity = model_identity(org.model, args.model)
    rng = random.Random(0)
    items = []
    for split in ("known", "partial", "refusal", "unknown"):
        for kind, k in (("question", args.per_split), ("biography", args.bios_per_split)):
            pool = [h for h in org.corpus.held_out if h.split == split and h.kind == kind]
            items += rng.sample(pool, min(k, len(pool)))
    probe = _shipped_probe(args.model, org.model)
    answers = answer_items(org.model, org.world, items, hooks=(probe.hook,) if probe else (), progress=True)
    reliability = token_reliability(answers, probe) if probe else None
    threshold = probe.threshold if probe is not None and probe.threshold is not None else 0.5
    with removed_on_failure(out):
        labels = write_labels(answers, out / "labels.jsonl", model=identity, reliability=reliability,
                              threshold=threshold)  # fmt: skip
        report = write_report(answers, out / "report.html", title=f"knowlens demo: {args.model}", model=identity,
                              reliability=reliability, probe_name=probe.name if probe else "")  # fmt: skip
    print(summary_text(answers))
    if probe is not None and reliability is not None:
        print(labels_text(answers, reliability, threshold, probe.name))
    else:
        print("no shipped before_token probe in the organism's folder: tokens are not labelled "
              "(`knowlens organism fit-probes` makes one)")  # fmt: skip
    print(f"wrote {labels} and {report} in {time.perf_counter() - start:.1f} s")
    return 0


def _shipped_probe(model_arg: str, model: Any) -> Any:
    """The organism folder's primary shipped probe when it reads before_token, else None."""
    from knowlens.cli.label_cmd import shipped_probes
    from knowlens.probes import load_probe

    for f in shipped_probes(model_arg):
        probe = load_probe(f, model=model)
        if probe.position == "before_token":
            return probe
    return None
