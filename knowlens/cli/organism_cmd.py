"""`knowlens organism train|info|train-saes|fit-probes`: train an organism on a world spec; measure its behaviour
gates; train its SAEs; fit the exemplar-free probes `knowlens label` uses by default."""

from __future__ import annotations

import argparse
import json
import sys

TRAIN_DEFAULTS = {"epochs": 450, "n_layers": 4, "d_model": 128, "n_heads": 4, "d_mlp": 512, "weight_decay": 0.1}  # TrainConfig's; kept in step by a test (the CLI imports no torch for --help)
SAE_DEFAULTS = {"steps": 3000, "k": 16, "expansion": 8, "batch_tokens": 1024, "seed": 0}  # SaeTrainConfig's; kept in step by a test


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "organism",
        help="train a model organism on a world spec, or report its behaviour gates",
        description="The model organism: a small TransformerLens model trained on a synthetic world whose every "
        "fact is known (world spec format: knowlens/organism/WORLD_SPEC.md).",
    )
    verbs = p.add_subparsers(dest="organism_verb", metavar="{train,info,train-saes,fit-probes}", required=True)
    p.set_defaults(command="organism")
    t = verbs.add_parser(
        "train",
        help="build a world's corpus and tokenizer and train a model on it (CPU)",
        description="Build the world, its corpus (facts in several phrasings, Q/A turns, refusals, biographies) "
        "and a word-level tokenizer, then train a HookedTransformer on the CPU. Deterministic for a given "
        "spec, seed and thread count. The defaults are the recipe that trained the shipped organism: on the "
        "default world, 450 epochs (22,050 steps) on one thread took 61 minutes on a 2-core machine that was "
        "running another training and the test suite beside it.",
        epilog="example: knowlens organism train --world knowlens/organism/worlds/default.yaml --out my_organism/ "
        "--threads 1",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--world", required=True, help="world spec YAML (see WORLD_SPEC.md)")
    t.add_argument("--out", required=True, help="folder to write the organism to (its parent must exist)")
    t.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS["epochs"], help="training epochs")
    for flag, what in (("n_layers", "transformer blocks"), ("d_model", "residual width (a multiple of --n-heads)"),
                       ("n_heads", "attention heads per block"), ("d_mlp", "MLP hidden width")):  # fmt: skip
        t.add_argument(f"--{flag.replace('_', '-')}", type=int, default=TRAIN_DEFAULTS[flag], help=f"{what}; "
                       "the default is the shipped organism's")
    t.add_argument("--weight-decay", type=float, default=TRAIN_DEFAULTS["weight_decay"], help="AdamW weight decay "
                   "on weight matrices and embeddings (not biases or LayerNorm); the default is the shipped organism's")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); the weights "
                   "depend on it: the shipped organism used 1")
    t.add_argument("--overwrite", action="store_true", help="replace an organism already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train, command="organism train")
    i = verbs.add_parser(
        "info",
        help="the organism's card, its behaviour gates and signal gates on held-out questions",
        description="Answers every held-out question of the organism's world greedily, grades each token "
        "against the world's facts and prints the behaviour gates, then the signal gates: out-of-fold AUROC "
        "of logistic probes on the residual stream (5 folds grouped by entity, hook, position and L2 chosen "
        "inside each training fold, 95% bootstrap intervals over entities) for known vs unknown entity, "
        "known vs hallucinated-about unknown entity, and hallucinated vs correct answer-value tokens (beside "
        "top-1 probability and entropy). Exit code: 0 when every behaviour and signal gate passes, 1 when "
        "one fails, 2 on bad input.",
        epilog="example: knowlens organism info --json",
    )
    _model_arg(i)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the organism's operations "
                   "are small, and on a busy machine a second thread made info 10x slower, not faster)")
    i.set_defaults(run=run_info, command="organism info")
    s = verbs.add_parser(
        "train-saes",
        help="train the organism's SAEs with sae-lens (one per hook) and report L0, explained variance, "
        "dead latents and CE loss recovered",
        description="Train one sparse autoencoder per hook of an organism (default: blocks.L.hook_resid_post of "
        "every layer) with sae-lens's own training runner, on the organism's training corpus tokenized in memory "
        "(one document per row, padding and <eos> positions left out): TopK, k latents active per token, "
        f"{SAE_DEFAULTS['expansion']} x the hook's width latents, {SAE_DEFAULTS['batch_tokens']} tokens a step. "
        "Each SAE is written in sae-lens's folder format (cfg.json + sae_weights.safetensors, loadable with "
        "load_sae or SAE.load_from_disk) to OUT/<hook>/ with a metrics.json, then measured on the world's held-out "
        "questions with their true answers (never trained): L0 (mean active latents per token), explained "
        "variance, dead-latent fraction (never active there) and CE loss recovered when its reconstruction is "
        "spliced in, (CE zero-ablated - CE spliced) / (CE zero-ablated - CE clean). Target (issue 8): loss "
        "recovered >= 0.90 at L0 <= 32. Deterministic for a given organism, settings and thread count.",
        epilog="example: knowlens organism train-saes --hooks blocks.2.hook_resid_post --steps 1000 --out my_saes/",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_arg(s)
    s.add_argument("--hooks", nargs="+", metavar="H", default=None,
                   help="hook points to train on (default: blocks.L.hook_resid_post of every layer)")
    s.add_argument("--out", default=None, help="folder for the SAEs, one sub-folder per hook (default with --model "
                   "organism: the shipped organism's knowlens/organism/data/saes; required otherwise)")
    s.add_argument("--steps", type=int, default=SAE_DEFAULTS["steps"], help="training steps per SAE")
    s.add_argument("--k", type=int, default=SAE_DEFAULTS["k"], help="latents active per token (TopK)")
    s.add_argument("--d-sae", type=int, default=None,
                   help=f"latents per SAE (default: {SAE_DEFAULTS['expansion']} x the hook's width)")
    s.add_argument("--seed", type=int, default=SAE_DEFAULTS["seed"], help="seed for initialisation and data order")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    s.add_argument("--overwrite", action="store_true", help="replace SAEs already in --out for these hooks")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(run=run_train_saes, command="organism train-saes")
    f = verbs.add_parser(
        "fit-probes",
        help="fit the exemplar-free entity-slot probe `knowlens label` uses by default and write it into the "
        "organism's folder",
        description="Fit, without exemplars, the probe `knowlens label` reads by default: the entity contrast at the "
        "answer slot. Known names: those the organism writes facts about when sampled freely and whose sampled "
        "answers to the world's first biography question repeat a fact that is not generic (a refusal is); "
        "unknown names: as many fabricated from the same pieces, never in its training texts. Each name fills the "
        "biography questions continued by the frames of the organism's own answers about the known names, up to "
        "where they first depend on the entity (' {name} was born in'); the residual there, the position that "
        "predicts the answer's first value, is a row. A logistic probe per resid_post hook (folds grouped by name, "
        "L2 chosen inside them), the hook with the best out-of-fold AUROC on these pseudo-labels kept; applied "
        "before every generated token. Nothing from the world's splits or the grader is read. Writes "
        "probe-entity_slot.safetensors + .json (card) into the organism's folder, or --out.",
        epilog="example: knowlens organism fit-probes --model my_organism/",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_arg(f)
    f.add_argument("--out", default=None, help="folder to write the probe to (default: the organism's folder)")
    f.add_argument("--samples", type=int, default=1024, help="free samples to find names in")
    f.add_argument("--k", type=int, default=16, help="sampled answers per candidate name (consistency)")
    f.add_argument("--seed", type=int, default=0, help="seed for sampling, fabrication and folds")
    f.add_argument("--threads", type=int, default=1, help="torch threads")
    f.add_argument("--overwrite", action="store_true", help="replace a probe already written there")
    f.set_defaults(run=run_fit_probes, command="organism fit-probes")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism", help="'organism' (shipped) or a folder from `organism train`")


def run_train(args: argparse.Namespace) -> int:
    import tempfile
    from dataclasses import replace

    from knowlens.errors import KnowlensError
    from knowlens.organism.spec import load_spec
    from knowlens.organism.store import FILES, save_organism
    from knowlens.organism.train import TrainConfig, train_organism
    from knowlens.outputs import check_output_dir

    for flag in ("epochs", "n_layers", "d_model", "n_heads", "d_mlp"):
        if getattr(args, flag) < 1:
            raise KnowlensError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.d_model % args.n_heads:
        raise KnowlensError(f"--d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")
    if not 0 <= args.weight_decay < 1:  # also refuses nan
        raise KnowlensError(f"--weight-decay must be in [0, 1), got {args.weight_decay}")
    if args.threads is not None and args.threads < 1:
        raise KnowlensError(f"--threads must be >= 1, got {args.threads}")
    spec = load_spec(args.world)
    out = check_output_dir(args.out, overwrite=args.overwrite, owned=FILES)
    config = replace(TrainConfig(), threads=args.threads, **{field: getattr(args, field) for field in TRAIN_DEFAULTS})
    org = train_organism(spec, None, config=config, progress=not args.no_progress)
    try:
        save_organism(org, out)
    except OSError as err:  # the folder went away or filled up while training: keep the model somewhere
        rescue = save_organism(org, tempfile.mkdtemp(prefix="knowlens-organism-"))
        raise KnowlensError(f"--out {out}: could not write the organism ({err}); it was saved to {rescue}") from None
    info = org.info
    print(
        f"trained {spec.name!r}: {info['steps']} steps in {info['train_seconds']:.1f} s "
        f"({info['threads']} threads), final loss {info['final_loss']:.4f}; written to {out}/"
    )
    return 0


def run_train_saes(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError

    for flag, value in (("--steps", args.steps), ("--k", args.k), ("--d-sae", args.d_sae), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise KnowlensError(f"{flag} must be >= 1, got {value}")
    if args.out is None and args.model != "organism":
        raise KnowlensError("--out is required unless --model is the shipped organism ('organism')")

    import torch

    from knowlens.capture.hooks import validate_hook_names
    from knowlens.organism.store import load_organism, organism_path
    from knowlens.outputs import check_output_dir
    from knowlens.saes.load import ORGANISM_SAES
    from knowlens.saes.train import (
        TARGET_LOSS_RECOVERED,
        TARGET_MAX_L0,
        SaeTrainConfig,
        resid_post_hooks,
        train_organism_saes,
    )

    config = SaeTrainConfig(steps=args.steps, k=args.k, d_sae=args.d_sae, seed=args.seed)
    path = organism_path(args.model)
    torch.set_num_threads(args.threads)
    org = load_organism(path)
    hooks = validate_hook_names(org.model, args.hooks or resid_post_hooks(org.model.cfg.n_layers))
    out = check_output_dir(args.out if args.out is not None else ORGANISM_SAES, overwrite=args.overwrite, owned=hooks)
    results = train_organism_saes(org, hooks, out_dir=out, config=config, progress=not args.no_progress)
    rows: list[list[str]] = [["hook", "L0", "expl. var.", "dead", "loss recovered", "(vs mean abl.)", "seconds", "target"]]
    for hook, r in results.items():
        e = r["eval"]
        figures = [e[k] for k in ("l0", "explained_variance", "dead_fraction", "loss_recovered")]
        figures.append(e["mean_ablation"]["loss_recovered"])
        rows.append([hook, *("n/a" if v is None else f"{v:.{1 if i == 0 else 3}f}" for i, v in enumerate(figures)),
                     f"{r['training']['seconds']:.1f}", "met" if r["target"]["met"] else "NOT met"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    first = next(iter(results.values()))
    missed = [h for h, r in results.items() if not r["target"]["met"]]
    print(f"evaluated on {first['eval']['rows']} held-out questions with their true answers "
          f"({first['eval']['n_positions']} positions); loss recovered against zero ablation (and, for "
          "comparison, against mean ablation)")
    print(f"target loss recovered >= {TARGET_LOSS_RECOVERED:.2f} at L0 <= {TARGET_MAX_L0}: "
          + ("met by every SAE" if not missed else f"NOT met by {', '.join(missed)}"))
    print(f"written to {out}/ (one sae-lens folder with metrics.json per hook)")
    return 0


def run_fit_probes(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from knowlens.errors import KnowlensError

    for flag, value in (("--samples", args.samples), ("--k", args.k), ("--threads", args.threads)):
        if value < 1:
            raise KnowlensError(f"{flag} must be >= 1, got {value}")

    import torch

    from knowlens.organism.store import load_organism, organism_path
    from knowlens.probes.pseudo import fit_entity_slot_probe
    from knowlens.saes.contrast import organism_training_texts
    from knowlens.saes.entity import organism_templates

    path = organism_path(args.model)
    out = Path(args.out) if args.out is not None else Path(path)
    names = ("probe-entity_slot.safetensors", "probe-entity_slot.json")
    if out.is_file():
        raise KnowlensError(f"--out {out}: is a file, not a folder")
    if not args.overwrite and any((out / n).exists() for n in names):
        raise KnowlensError(f"{out}/ already holds probe-entity_slot.*; pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    org = load_organism(path)
    org.model.cfg.model_name = args.model
    with tempfile.TemporaryDirectory(prefix="knowlens-probes-") as tmp:
        fit = fit_entity_slot_probe(org.model, tmp, templates=organism_templates(org.world),
                                    exclude_texts=organism_training_texts(org), seed=args.seed, model_name=args.model,
                                    n_samples=args.samples, k=args.k)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):  # each file lands whole (a temporary name, then a rename)
            tmp_target = out / f".probe-entity_slot{suffix}.tmp"
            shutil.copyfile(Path(tmp) / f"entity_slot{suffix}", tmp_target)
            tmp_target.replace(out / f"probe-entity_slot{suffix}")
    pseudo = fit.training["pseudo"]
    frames = (pseudo["params"].get("answer_frames") or {}).get("frames") or {}
    print(f"entity-slot probe: {pseudo['counts']['label_1']} rows of known names, {pseudo['counts']['label_0']} of "
          f"fabricated ones ({pseudo['counts']['groups']} names); frames {sorted({f for fs in frames.values() for f in fs})}")
    print("out-of-fold AUROC on the pseudo-labels per hook: "
          + ", ".join(f"{h} {v:.3f}" for h, v in pseudo["hook_oof_auroc"].items()) + f"; kept {pseudo['hook']}")  # fmt: skip
    print(f"written to {out}/probe-entity_slot.safetensors (+ .json); `knowlens label` uses it by default")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from knowlens.analyses.answers import answer_items
    from knowlens.analyses.gates import gate_figures
    from knowlens.analyses.recognition import recognition_figures
    from knowlens.analyses.signals import signal_figures, signal_hooks
    from knowlens.errors import KnowlensError
    from knowlens.models import model_card
    from knowlens.organism.corpus import every_phrasing
    from knowlens.organism.store import load_organism, organism_path

    if args.threads < 1:
        raise KnowlensError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    path = organism_path(args.model)
    org = load_organism(path)
    card = model_card(org.model, args.model)
    hooks = signal_hooks(org.model.cfg.n_layers)
    answers = answer_items(org.model, org.world, org.corpus.held_out, progress=not args.json)
    figures = gate_figures(answers)
    # the signal probes see every phrasing of every held-out question: more rows per entity, still grouped
    probed = answer_items(org.model, org.world, every_phrasing(org.world, org.corpus.held_out), hooks=hooks)
    signals = signal_figures(probed)
    signals["questions"] = len(probed)
    splits = {s: len(org.world.of(split=s)) for s in ("known", "partial", "refusal", "unknown")}
    training = org.info.get("training", {})
    out = {
        "model": {k: v for k, v in card.to_dict().items() if k != "hook_names"},
        "world": {"name": org.spec.name, "seed": org.spec.seed, "cue_strength": org.spec.cue_strength, "entities": splits},
        "training": {k: training.get(k) for k in ("steps", "train_seconds", "final_loss", "threads")},
        "held_out_questions": len(answers),
        **figures,
        "signals": signals,
    }
    recognition = recognition_figures(org.model, org.world)
    if recognition is not None:
        out["recognition"] = recognition
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return _gate_status(figures, signals)
    m = out["model"]
    print(f"organism {args.model}: {m['n_layers']} layers, d_model {m['d_model']}, d_vocab {m['d_vocab']}, "
          f"n_ctx {m['n_ctx']}, fingerprint {m['fingerprint']} (shape {m['shape_fingerprint']})")
    print(f"world {org.spec.name!r} (seed {org.spec.seed}, cue strength {org.spec.cue_strength}): "
          + ", ".join(f"{k} {v}" for k, v in splits.items()))
    print(f"behaviour gates on {len(answers)} held-out questions:")
    for name, g in figures["gates"].items():
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        print(f"  {'PASS' if g['passed'] else 'FAIL'}  {name:<28} {value:>6}  (target {g['op']} {g['threshold']}, n={g['n']})")
    for key, v in figures["verdicts"].items():
        print(f"  {key:<20} " + ", ".join(f"{k} {n}" for k, n in sorted(v.items())))
    print(f"signal gates on {signals['questions']} held-out questions, every phrasing ({signals['method']}):")
    for line in _signal_table(signals):
        print("  " + line)
    if recognition is not None:
        auc = recognition.get("auroc_known_vs_unknown")
        print("recognition task (output, not a gate): says it knows the name: "
              + ", ".join(f"{k} {v['says_known']:.3f} (n={v['n']})" for k, v in recognition["splits"].items())
              + ("" if auc is None else f"; AUROC known vs unknown {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]"))
    return _gate_status(figures, signals)


def _signal_table(signals: dict) -> list[str]:
    """One row per signal gate: gate, value [lo, hi], where, n, target, PASS/FAIL; then the baselines."""
    rows = [("gate", "value [95% interval]", "where", "n", "target", "")]
    for name, g in signals["gates"].items():
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        if g["ci95"] is not None:
            value += f" [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]"
        where = g.get("reason", "") if g["where"] is None else f"{g['where']['hook']} @ {g['where']['position']}"
        if name == "token_hallucination_margin" and "against" in g:
            where = f"probe - {g['against']}"
        n = " / ".join(f"{k} {v}" for k, v in g["n"].items())
        rows.append((name, value, where, n, f"{g['op']} {g['threshold']}", "PASS" if g["passed"] else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5]).rstrip() for r in rows]
    base = signals["gates"]["token_hallucination"].get("baselines", {})
    if "top1" in base:
        extra = "; ".join(f"{k} {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                          for k, v in base.items() if k in ("top1", "entropy"))
        lines.append(f"output confidence on the same tokens: {extra}")
    return lines


def _gate_status(figures: dict, signals: dict) -> int:
    """0 when every behaviour and signal gate passed; else 1, with the failed gates named on stderr."""
    failed = [name for name, g in figures["gates"].items() if not g["passed"]]
    failed += [name for name, g in signals["gates"].items() if not g["passed"]]
    if failed:
        print(f"knowlens organism info: {len(failed)} gate(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
