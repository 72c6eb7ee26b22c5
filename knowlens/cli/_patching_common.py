"""What `knowlens ablate`, `steer` and `patch` share: model/SAE options and loading, prompts (given or the
organism's held-out questions), refusal templates, and the side-by-side and table printouts. Imports torch only
inside functions, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import math
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERIC_REFUSALS = ("I don't know", "I do not know", "I'm not sure", "I have never heard of {name}")
SPLITS = ("known", "partial", "refusal", "unknown")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


@dataclass
class Loaded:
    model: Any
    org: Any  # the Organism, or None for another model
    sae: Any = None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism", help="'organism', an organism folder, or a TransformerLens name")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt (repeatable), e.g. 'Q : Who or what is Mor Ard ? A :'")  # fmt: skip
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="organism only: use held-out questions about entities of this split instead of --prompt")
    p.add_argument("--n", type=int, default=16, help="questions taken with --split")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per prompt (greedy)")
    p.add_argument("--refusal", action="append", default=None, metavar="TEMPLATE",
                   help="refusal template (repeatable; {name} matches any words). Default: the organism's own, "
                   f"else {', '.join(repr(r) for r in GENERIC_REFUSALS)}")  # fmt: skip
    p.add_argument("--show", type=int, default=4, help="prompts printed side by side (the rest only in the summary)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing --split questions (and random directions)")


def add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="append", type=Path, default=None, metavar="FILE",
                   help="probe for the token labels of every run (repeatable); default: the probes shipped with the "
                   "model (the organism's entity-slot probe), none for another model")  # fmt: skip
    p.add_argument("--no-labels", action="store_true", help="leave out the token labels")


LABEL_KEYS = ["p_reliable_min", "unreliable_share"]


def label_runner(args: argparse.Namespace, loaded: Loaded, prompts: list[str]) -> tuple[Any, str | None]:
    """(per_run, description): a `measure_generations` ``per_run`` that labels each run's generations with the
    probes (`label_generation` under that run's interventions, so the probes read the edited activations), or
    (None, None) without probes. Per prompt: ``p_reliable_min`` (the answer's least reliable token),
    ``unreliable_share`` (the share of its tokens labelled unreliable) and ``labelled`` (the text, unreliable
    tokens in [brackets])."""
    if args.no_labels:
        return None, None
    from knowlens.cli.label_cmd import _probe_file, render_tokens, shipped_probes

    files = [_probe_file(f) for f in args.probe] if args.probe else shipped_probes(args.model)
    if not files:
        return None, None
    from knowlens.labels import label_generation
    from knowlens.labels.generation import resolve_probes
    from knowlens.patching import intervene

    model = loaded.model
    probes = resolve_probes(model, files, sae=loaded.sae)

    def per_run(interventions: tuple[Any, ...]) -> list[dict[str, Any]]:
        with intervene(model, *interventions):
            labels = label_generation(model, prompts, probes, max_new_tokens=args.max_new_tokens)
        rows = []
        for g in labels.generations:
            tokens = [t for t in g.tokens if not t.text.startswith("<")]  # EOS and other specials not shown
            ps = [t.p_reliable for t in tokens]
            rows.append({"p_reliable_min": min(ps) if ps else math.nan,
                         "unreliable_share": sum(t.label == "unreliable" for t in tokens) / len(ps) if ps else math.nan,
                         "labelled": render_tokens(tokens, colour=False)})  # fmt: skip
        return rows

    p = probes[0]
    threshold = f"{p.threshold:.3f}" if p.threshold is not None else "0.5"
    return per_run, f"probe {p.name} ({p.hook} @ {p.position}), threshold {threshold}"


def labels_line(rows: list[dict[str, Any]], what: str | None) -> str | None:
    """How the labels moved from the first row (the baseline) to each other one, or None without labels."""
    if what is None or "p_reliable_min" not in rows[0]:
        return None
    name = lambda r: str(r.get("run") or f"{r.get('direction')} alpha={r.get('alpha', 0):g}")  # noqa: E731
    moves = [f"{name(r)} {num(rows[0]['p_reliable_min'])} -> {num(r['p_reliable_min'])} (unreliable share "
             f"{num(rows[0]['unreliable_share'])} -> {num(r['unreliable_share'])})" for r in rows[1:]]  # fmt: skip
    return f"labels by {what}: mean least-reliable p_reliable per answer, baseline -> " + "; ".join(moves)


def check_common(args: argparse.Namespace) -> None:
    """Option checks that need no model (one-line KnowlensError)."""
    from knowlens.errors import KnowlensError
    from knowlens.models import check_device

    if args.threads < 1:
        raise KnowlensError(f"--threads must be >= 1, got {args.threads}")
    check_device(args.device)


def check_prompt_args(args: argparse.Namespace) -> None:
    from knowlens.errors import KnowlensError

    if args.prompt is None and args.split is None:
        raise KnowlensError("give --prompt TEXT (repeatable) or, on an organism, --split")
    if args.prompt is not None and args.split is not None:
        raise KnowlensError("give --prompt or --split, not both")
    for i, text in enumerate(args.prompt or []):
        if not text.strip():
            raise KnowlensError(f"--prompt {i + 1} is empty")
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise KnowlensError(f"{flag} must be >= 1, got {value}")
    if args.show < 0:
        raise KnowlensError(f"--show must be >= 0, got {args.show}")
    for tpl in args.refusal or []:
        if not tpl.strip():
            raise KnowlensError("--refusal templates must not be empty")


def load(args: argparse.Namespace, *, sae: str | None = None) -> Loaded:
    """The model (and organism) named by ``--model``, and the SAE ``sae`` checked against it."""
    import torch

    torch.set_num_threads(args.threads)
    org = None
    if args.model == "organism" or Path(args.model).is_dir():
        from knowlens.organism.store import load_organism, organism_path

        org = load_organism(organism_path(args.model), device=args.device)
        org.model.cfg.model_name = args.model
        model = org.model
    else:
        import knowlens

        model, _card = knowlens.load_model(args.model, device=args.device)
    loaded = Loaded(model=model, org=org)
    if sae is not None:
        from knowlens.saes import load_sae

        loaded.sae = load_sae(sae, model)
    return loaded


def prompts_for(args: argparse.Namespace, loaded: Loaded) -> tuple[list[str], list[str]]:
    """(prompts, subjects): ``--prompt`` as given, or ``--n`` held-out questions of ``--split`` (seeded)."""
    import random

    from knowlens.errors import KnowlensError

    if args.split is None:
        prompts = [" ".join(p.split()) for p in args.prompt]
        return prompts, ["" for _ in prompts]
    if loaded.org is None:
        raise KnowlensError("--split needs an organism (--model organism or an organism folder)")
    pool = [h for h in loaded.org.corpus.held_out if h.split == args.split and h.kind == "question"]
    if not pool:
        raise KnowlensError(f"the organism has no held-out questions about {args.split} entities")
    chosen = random.Random(args.seed).sample(pool, min(args.n, len(pool)))
    return [h.prompt for h in chosen], [h.entity for h in chosen]


def refusal_templates(args: argparse.Namespace, loaded: Loaded) -> tuple[str, ...]:
    if args.refusal:
        return tuple(args.refusal)
    if loaded.org is not None:
        return tuple(loaded.org.spec.refusals)
    return GENERIC_REFUSALS


def slot_word(args: argparse.Namespace, loaded: Loaded) -> str | None:
    """The word an organism refuses with in the value slot ("X works as a unknown ."; its world's
    `refusal_value`), or None: for another model, a world without one, or when ``--refusal`` is given."""
    if getattr(args, "refusal", None) or loaded.org is None:
        return None
    return loaded.org.spec.refusal_value


def refusal_measures(args: argparse.Namespace, loaded: Loaded, prompt: str) -> dict[str, Any]:
    """`measure_generations`'s refusal options: the matcher, the refusal token ids (the templates' first tokens
    after ``prompt``, or the slot word) and whether they are read at the value slot."""
    from knowlens.patching.dose import refusal_matcher, refusal_token_ids

    templates = refusal_templates(args, loaded)
    word = slot_word(args, loaded)
    ids = refusal_token_ids(loaded.model, (word,)) if word else refusal_token_ids(loaded.model, templates, prompt=prompt)
    return {"is_refusal": refusal_matcher(templates, slot_word=word), "refusal_ids": ids,
            "refusal_in_slot": word is not None}  # fmt: skip


def check_prompts_fit(model: Any, prompts: list[str], max_new_tokens: int) -> None:
    """Refuse prompts that tokenize to nothing or do not fit the context with the new tokens."""
    from knowlens.capture.prompts import tokenize_prompts
    from knowlens.errors import KnowlensError

    rows = tokenize_prompts(model, prompts)
    longest = max(int(r.numel()) for r in rows)
    if longest + max_new_tokens > int(model.cfg.n_ctx):
        raise KnowlensError(f"the longest prompt ({longest} tokens) + --max-new-tokens ({max_new_tokens}) exceeds "
                            f"the model's context of {int(model.cfg.n_ctx)} tokens")  # fmt: skip


# ------------------------------------------------------------------------------------------------ printing


def side_by_side(prompt: str, columns: list[tuple[str, dict[str, Any]]]) -> str:
    """One prompt's generations in columns: refusal probability, entropy, refused, then the wrapped text."""
    label_w = 18
    total = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
    width = max(24, (total - label_w - 2) // max(1, len(columns)) - 2)
    lines = [f"prompt: {prompt}"]

    def row(label: str, cells: list[str]) -> None:
        lines.append(("  " + label.ljust(label_w) + "".join(c.ljust(width + 2) for c in cells)).rstrip())

    row("", [title[:width] for title, _ in columns])
    stats = [("refusal prob", "refusal_prob"), ("entropy (answer)", "entropy_answer"),
             ("top-1 (answer)", "top1_answer"), ("entropy (mean)", "entropy_mean")]  # fmt: skip
    for label, key in stats:
        if any(key in col for _, col in columns):
            row(label, [num(col.get(key)) for _, col in columns])
    if any("p_reliable_min" in col for _, col in columns):
        row("p_reliable (min)", [num(col.get("p_reliable_min")) for _, col in columns])
    row("refused", ["yes" if col.get("refused") else "no" for _, col in columns])
    texts = [col.get("labelled", col.get("text", "")) for _, col in columns]  # labelled: unreliable in [brackets]
    wrapped = [textwrap.wrap(t or "(nothing)", width) or [""] for t in texts]
    for i in range(max(len(w) for w in wrapped)):
        row("answer" if i == 0 else "", [w[i] if i < len(w) else "" for w in wrapped])
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [cols] + [[num(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join(
        ("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))).rstrip()
        for row in cells
    )


def num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if not math.isfinite(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.3g}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"
    return str(v)


def points(after: float, before: float) -> str:
    """A change of rate in percentage points, signed."""
    return f"{100 * (after - before):+.0f} points"
