"""`knowlens label`: generate from prompts and label every generated token reliable / unreliable with probes."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

EPILOG = """\
probes: --probe FILE (repeatable; files written by `knowlens probe export` or by --fit-pseudo --save-probes). The
first probe read at a token (position rule token or before_token) is the primary: p_reliable is its calibrated
probability (--combine mean: the mean over every such probe); the others are reported as signals. An entity probe
(position entity_last_token) gives the entity_known signal, carried from the last entity name's last token.
Without --probe the probes shipped with the model are used (files probe-*.safetensors in the organism's folder:
the shipped organism's exemplar-free entity-slot probe, made by `knowlens organism fit-probes`);
with none shipped, --fit-pseudo N fits an exemplar-free self-consistency probe first: N prompts (--fit-prompts
FILE; else an organism's held-out questions, prompts only, never their answers; else prompts the model samples
from BOS), k = --fit-k sampled answers each; a greedy answer span contained in >= 75% of the samples is
pseudo-reliable, the others pseudo-unreliable (knowlens/probes/pseudo_labels.py); the hook is chosen by the
probe's out-of-fold AUROC on those pseudo-labels. --save-probes DIR keeps the fitted probe files.
label: reliable when p_reliable >= --threshold, else the primary probe card's threshold (a --fit-pseudo probe's: the
cut that best separates its pseudo-labels out of fold), else 0.5.
prompts: --prompt TEXT (repeatable) or --prompts FILE (.txt one per line, or .jsonl {"prompt": ...} or
{"tokens": [ids]} per line).
output: each generation on stdout, tokens coloured green (reliable) or red (unreliable); without colour (not a
terminal, or --no-color) unreliable tokens are shown [in brackets]. --out: JSONL, one object per generation
(tokens with p_reliable, label and every signal; on an organism the grader's class too); --html: a
self-contained report (tokens coloured by p_reliable, signals on hover).
explain: --explain attaches to every unreliable token the residual positions (at blocks.0.hook_resid_pre: input x
gradient) and, with --sae, the SAE latents that most drive the primary probe's decision (activation x
gradient, one backward per token; knowlens/labels/explain.py): "explanation" in the JSONL, "why" on hover in the
HTML; the summary line gives the seconds per explained token.
example: knowlens label --prompt "Q : Where was Mor Tav born ? A :" --fit-pseudo 128 --out labels.jsonl
           --html labels.html"""

GREEN, RED, RESET = "\x1b[32m", "\x1b[31m", "\x1b[0m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label", help="generate and label every token reliable / unreliable with exemplar-free probes",
        description="Generate from prompts (KV-cached, batched) and apply linear probes to the captured activations "
        "at every step, on the model's device: per generated token p_reliable, a label and the signals behind it "
        "(each probe's score, entity_known, input surprise, top-1 probability, entropy).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", default="organism", help="'organism' (default), an organism folder, or a TransformerLens name")
    p.add_argument("--probe", action="append", type=Path, default=None, metavar="FILE",
                   help="probe file (.safetensors with its .json card); repeatable")  # fmt: skip
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="prompts file (.txt or .jsonl)")
    p.add_argument("--out", type=Path, default=None, help="labels to write (.jsonl)")
    p.add_argument("--html", type=Path, default=None, help="report to write (.html)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--threshold", type=float, default=None,
                   help="p_reliable at or above which a token is reliable (default: the primary probe's, else 0.5)")
    p.add_argument("--combine", choices=["first", "mean"], default="first", help="how p_reliable combines probes")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--fit-pseudo", type=int, default=None, metavar="N",
                   help="fit a self-consistency probe on N prompts first (see below)")
    p.add_argument("--fit-prompts", type=Path, default=None, metavar="FILE", help="prompts for --fit-pseudo")
    p.add_argument("--fit-k", type=int, default=8, help="sampled answers per prompt for --fit-pseudo (default 8)")
    p.add_argument("--save-probes", type=Path, default=None, metavar="DIR", help="keep the --fit-pseudo probe files")
    p.add_argument("--explain", action="store_true",
                   help="attach to each unreliable token the positions (and --sae latents) driving its probe score")
    p.add_argument("--sae", default=None, metavar="S",
                   help="SAE for --explain's latents (and for probes over SAE latents): 'release:sae_id', an SAE "
                   "folder or organism:<hook>; its hook must be at or before the primary probe's")  # fmt: skip
    p.add_argument("--explain-top", type=int, default=5, metavar="K", help="entries per explanation (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for --fit-pseudo sampling (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours in the terminal")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --html if they exist")
    p.set_defaults(run=run, command="label")


def run(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError
    from knowlens.models import check_device
    from knowlens.outputs import check_output_file

    # every argument is checked before the model loads
    check_device(args.device)
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--fit-k", args.fit_k, 1), ("--threads", args.threads, 1),
                             ("--explain-top", args.explain_top, 1)):  # fmt: skip
        if value is not None and value < low:
            raise KnowlensError(f"{flag} must be >= {low}, got {value}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise KnowlensError(f"--threshold must be in (0, 1), got {args.threshold}")
    if (args.prompt is None) == (args.prompts is None):
        raise KnowlensError("give the prompts: --prompt TEXT (repeatable) or --prompts FILE, not both")
    if args.fit_pseudo is not None and args.fit_pseudo < 2:
        raise KnowlensError(f"--fit-pseudo needs at least 2 prompts, got {args.fit_pseudo}")
    if args.fit_pseudo is None and (args.fit_prompts is not None or args.save_probes is not None):
        raise KnowlensError("--fit-prompts and --save-probes go with --fit-pseudo N")
    for flag, path, suffix in (("--out", args.out, ".jsonl"), ("--html", args.html, ".html")):
        if path is not None:
            if path.suffix != suffix:
                raise KnowlensError(f"{flag} {path}: must end in {suffix}")
            check_output_file(path, flag=flag, overwrite=args.overwrite)
    if args.save_probes is not None and args.save_probes.exists() and not args.save_probes.is_dir():
        raise KnowlensError(f"--save-probes {args.save_probes}: exists and is not a folder")
    probes = [_probe_file(p) for p in args.probe or []]
    if not probes and args.fit_pseudo is None:
        probes = shipped_probes(args.model)
        if not probes:
            raise KnowlensError(f"no --probe given and no probes ship with model {args.model!r}: make one with "
                                "`knowlens probe export` (an organism: `knowlens organism fit-probes`), or pass "
                                "--fit-pseudo N to fit an exemplar-free self-consistency probe on N prompts first")  # fmt: skip
    prompts = _prompts(args)
    fit_prompts = None
    if args.fit_prompts is not None and args.fit_pseudo is not None:
        fit_prompts = _fit_prompts(args.fit_prompts, args.fit_pseudo)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, org = _load_model(args.model, args.device)
    sae = None
    if args.sae is not None:
        from knowlens.saes import load_sae

        sae = load_sae(args.sae, model)
    from knowlens.labels import label_generation

    with tempfile.TemporaryDirectory(prefix="knowlens-pseudo-") as tmp:
        if args.fit_pseudo is not None:
            probes = [*probes, _fit(model, org, args, fit_prompts, args.save_probes or Path(tmp))]
        labels = label_generation(model, prompts, probes, max_new_tokens=args.max_new_tokens, threshold=args.threshold,
                                  combine=args.combine, batch_size=args.batch_size, sae=sae, explain=args.explain,
                                  explain_top_k=args.explain_top, progress=not args.no_progress)  # fmt: skip
    if org is not None:
        labels = _graded(labels, org)
    colour = not args.no_color and sys.stdout.isatty()
    for g in labels:
        print(f"[{g.row}] {g.prompt if isinstance(g.prompt, str) else ' '.join(g.prompt_tokens)}")
        print("    " + render_tokens(g.tokens, colour=colour))
    n_bad = sum(t.label == "unreliable" for g in labels for t in g.tokens)
    primary = next(p for p in labels.probes if p["role"] == "primary")
    print(f"{labels.n_tokens} tokens, {n_bad} unreliable (p_reliable < {labels.threshold:g}; primary probe "
          f"{primary['name']} on {primary['hook']} @ {primary['position']})" + _explain_note(labels.params),
          file=sys.stderr)  # fmt: skip
    title = f"knowlens labels: {args.model}"
    for path, write in ((args.out, labels.to_jsonl), (args.html, lambda p: labels.to_html(p, title=title))):
        if path is not None:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _explain_note(params: dict[str, Any]) -> str:
    ex = params.get("explain")
    if ex is None:
        return ""
    per = ex["seconds_per_token"]
    what = "positions and SAE latents" if ex["sae_hook"] else "positions"
    return f"; {ex['tokens']} explained by {what}" + (f", {per:.3f} s per explained token" if per is not None else "")


def render_tokens(tokens: Any, *, colour: bool) -> str:
    """Tokens joined by spaces: green / red with ``colour``, else unreliable ones [in brackets]."""
    parts = []
    for t in tokens:
        if colour:
            parts.append(f"{GREEN if t.label == 'reliable' else RED}{t.text}{RESET}")
        else:
            parts.append(t.text if t.label == "reliable" else f"[{t.text}]")
    return " ".join(parts)


def shipped_probes(model: str) -> list[Path]:
    """The probe files shipped with a model: ``probe-*.safetensors`` in the organism's folder (the shipped organism's
    is ``knowlens/organism/data/``), the self-consistency probe first; none for other models."""
    if model == "organism":
        from knowlens.organism.store import SHIPPED

        folder = SHIPPED
    elif Path(model).is_dir():
        folder = Path(model)
    else:
        return []
    files = sorted(folder.glob("probe-*.safetensors"))
    return sorted(files, key=lambda f: (f.stem != "probe-self_consistency", f.name))


def _probe_file(path: Path) -> Path:
    from knowlens.errors import KnowlensError

    path = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    if path.is_dir():
        raise KnowlensError(f"--probe {path}: is a folder; give a probe file")
    if not path.is_file():
        raise KnowlensError(f"--probe {path}: no such file")
    if not path.with_suffix(".json").is_file():
        raise KnowlensError(f"--probe {path}: its card {path.with_suffix('.json').name} is missing")
    return path


def _prompts(args: argparse.Namespace) -> list[Any]:
    from knowlens.errors import KnowlensError

    if args.prompt is not None:
        for i, p in enumerate(args.prompt):
            if not p.strip():
                raise KnowlensError(f"--prompt {i + 1} is empty")
        return list(args.prompt)
    from knowlens.cli.capture_cmd import read_prompts

    return read_prompts(args.prompts)


def _fit_prompts(path: Path, n: int) -> list[Any]:
    from knowlens.cli.capture_cmd import read_prompts
    from knowlens.errors import KnowlensError

    prompts = read_prompts(path)
    if len(prompts) < 2:
        raise KnowlensError(f"--fit-prompts {path}: holds {len(prompts)} prompt(s); 2 or more are needed")
    return prompts[:n]


def _load_model(name: str, device: str) -> tuple[Any, Any]:
    """(model, organism or None)."""
    if name == "organism" or Path(name).is_dir():
        from knowlens.organism.store import load_organism, organism_path

        org = load_organism(organism_path(name), device=device)
        org.model.cfg.model_name = name
        return org.model, org
    import knowlens

    model, _card = knowlens.load_model(name, device=device)
    return model, None


def _fit(model: Any, org: Any, args: argparse.Namespace, prompts: list[Any] | None, folder: Path) -> Path:
    """Fit the self-consistency probe (--fit-pseudo) into ``folder`` and return its file."""
    import random

    from knowlens.probes.pseudo import default_hooks, fit_pseudo_probes, sampled_prompts

    groups = None
    if prompts is None and org is not None:
        items = [h for h in org.corpus.held_out if h.kind == "question"]
        items = random.Random(args.seed).sample(items, min(args.fit_pseudo, len(items)))
        prompts, groups = [h.prompt for h in items], [h.entity for h in items]  # prompts only, never answers
    elif prompts is None:
        prompts = sampled_prompts(model, args.fit_pseudo, seed=args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fitting a self-consistency probe on {len(prompts)} prompts (k={args.fit_k}) ...", file=sys.stderr)
    fits = fit_pseudo_probes(model, prompts, hooks=default_hooks(model), out_dir=folder, sources=("self_consistency",),
                             k=args.fit_k, seed=args.seed, groups=groups, model_name=args.model,
                             options={"self_consistency": {"max_new_tokens": args.max_new_tokens}})  # fmt: skip
    fit = fits["self_consistency"]
    pseudo = fit.training["pseudo"]
    c = pseudo["counts"]
    print(f"  {c['label_1']} pseudo-reliable / {c['label_0']} pseudo-unreliable tokens; {pseudo['hook']}, "
          f"out-of-fold AUROC on the pseudo-labels {fit.metrics['oof_auroc']:.3f}"
          + (f"; saved in {folder}" if args.save_probes is not None else ""), file=sys.stderr)  # fmt: skip
    return folder / "self_consistency.safetensors"


def _graded(labels: Any, org: Any) -> Any:
    """On an organism: the grader's class of every generated token (ground truth, for the report only)."""
    from knowlens.organism.grader import grade_answer

    entity = {h.prompt: h.entity for h in org.corpus.held_out}
    classes = []
    for g in labels:
        name = entity.get(g.prompt) if isinstance(g.prompt, str) else None
        classes.append(grade_answer(org.world, list(g.token_texts), entity=name).classes)
    return labels.with_classes(classes)
