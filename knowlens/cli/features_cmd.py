"""`knowlens features entity-known|surprise`: locate SAE latents, write them with a self-contained HTML report."""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any

ENTITY_EPILOG = """\
Contrast sets: without --known/--unknown (the default) nothing labelled is used: the known set is the names the
model writes facts about when sampled freely and repeats consistently (--samples, --k, --threshold), the unknown
set as many names fabricated from the same name pieces and never found in the model's training texts (the
organism's corpus; for another model --training-texts, else unchecked). --known/--unknown take .jsonl lines
{"name": ..., "type": ... (optional)} or .txt (one name per line); --contrast one .jsonl with "label" known|unknown.
Either side given alone is completed exemplar-free. Writes DIR/entity_known.<position>.<direction>.safetensors
(+ .json card; load with knowlens.saes.FeatureSet.load), DIR/report.html and, on an organism, DIR/truth.json:
the same search on the world's true known/unknown entities, the overlap of the two top lists and each top
latent's AUROC on true held-out entities the exemplar-free sets did not use; each exemplar-free top latent's AUROC
on every true entity they did not use (bootstrap 95% interval), and a ground-truth logistic probe on the same
activation, position and entities (5 folds, out of fold), with the gap between the two.
example: knowlens features entity-known --model organism --sae organism:blocks.3.hook_resid_post --out feats/"""

SURPRISE_EPILOG = """\
Tokens: on an organism its held-out questions with their true answers (never trained); for another model
--text FILE (.txt one text per line, or .jsonl {"text": ...}); each text is <bos> text <eos>, cut at n_ctx.
Writes DIR/surprise.safetensors (+ .json card; knowlens.saes.SurpriseResult.load) and DIR/report.html.
example: knowlens features surprise --model organism --sae organism:blocks.1.hook_resid_post --out surprise/"""

ENTITY_OWNED = ("entity_known.*", "truth.json", "report.html")
SURPRISE_OWNED = ("surprise.safetensors", "surprise.json", "report.html", "entropy_gap.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="locate SAE latents: entity-known (without exemplars) or input surprise",
                       description="Locate the SAE latents that carry a model's internal confidence signals.")  # fmt: skip
    verbs = p.add_subparsers(dest="features_verb", metavar="{entity-known,surprise}", required=True)
    p.set_defaults(command="features")
    e = verbs.add_parser(
        "entity-known", help="latents that fire for entities the model knows (or does not), without exemplars",
        description="Encode the SAE at each entity's last name token, at the answer position (the prompt's "
        "last token) and at the slot (the prompt continued by a frame of the model's own answers about the known "
        "entities, up to where they first depend on the entity and the fabricated names' answers leave theirs, "
        "e.g. '... A : {name} was born in') for a known and an unknown set of entities; per latent the activation "
        "frequencies on each side and their difference (the separation score), the mean difference, Welch's t "
        "and the AUROC of the mean activation (each the minimum over entity types); rank latents by that AUROC "
        "(--rank-by), after dropping latents active on more than --max-frequency of generic tokens; score each "
        "top latent's AUROC on held-out entities. Definitions: "
        "knowlens/saes/entity.py and contrast.py.",
        epilog=ENTITY_EPILOG, formatter_class=_Formatter,
    )  # fmt: skip
    _common(e)
    e.add_argument("--known", type=Path, default=None, help="known entities (.jsonl or .txt)")
    e.add_argument("--unknown", type=Path, default=None, help="unknown entities (.jsonl or .txt)")
    e.add_argument("--contrast", type=Path, default=None, help="one labelled .jsonl instead of --known/--unknown")
    e.add_argument("--training-texts", type=Path, default=None,
                   help="texts the model was trained on (.txt/.jsonl), to check fabricated names against "
                   "(default: the organism's corpus; none for other models)")
    e.add_argument("--hook-position", choices=["name", "answer", "slot", "all"], default="all",
                   help="where to read the SAE: the entity's last name token, the prompt's last token, the slot "
                   "of the model's own answer frames, or all three (all: the slot is left out, with a note, when "
                   "the answers share no frame)")
    e.add_argument("--fact-template", default=None, metavar="T",
                   help="prompt with {name} whose sampled continuations must repeat a fact for a name to count as "
                   "known (exemplar-free; default: the first --template, else '{name}')")
    e.add_argument("--template", action="append", default=None, metavar="T",
                   help="prompt template with {name} (repeatable; default: the organism's biography questions, "
                   "else '{name}' and 'Q: Who is {name}? A:')")
    e.add_argument("--holdout", type=float, default=0.5, help="share of entities held out to score AUROC on")
    e.add_argument("--rank-by", choices=["auroc", "separation", "welch_t", "mean_diff"], default="auroc",
                   help="ranking score, each on the picking entities: the AUROC of the mean activation (default), the "
                   "activation frequencies' difference (Ferrando et al.'s separation score), Welch's t or the mean "
                   "difference")
    e.add_argument("--samples", type=int, default=1024, help="free samples to find names in (exemplar-free)")
    e.add_argument("--k", type=int, default=16, help="continuations per candidate name (consistency)")
    e.add_argument("--threshold", type=float, default=0.8, help="consistency a known name needs: the share of --k "
                   "sampled continuations whose first sentence is its most frequent one")
    e.set_defaults(run=run_entity_known, command="features entity-known")
    s = verbs.add_parser(
        "surprise", help="latents (and a residual direction) that track the model's input surprisal",
        description="Per-token input surprisal s_t = -log p(x_t | x_<t); latents whose activation at t "
        "correlates with it (Spearman, after the frequency filter) and a ridge direction on the SAE's hook "
        "predicting it (held-out R^2, split by sequence). Definitions: knowlens/saes/surprise.py.",
        epilog=SURPRISE_EPILOG, formatter_class=_Formatter,
    )  # fmt: skip
    _common(s)
    s.add_argument("--text", type=Path, default=None, help="texts to analyse (required unless --model is an organism)")
    s.set_defaults(run=run_surprise, command="features surprise")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism", help="'organism', an organism folder, or a TransformerLens name")
    p.add_argument("--sae", required=True, help="'release:sae_id', an SAE folder (sae-lens format) or organism:<hook>")
    p.add_argument("--out", required=True, type=Path, help="folder to write to (created if absent)")
    p.add_argument("--top", type=int, default=10, help="latents to keep and print")
    p.add_argument("--max-frequency", type=float, default=0.02, help="drop latents active on more of generic tokens")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and splits")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")


def _check_common(args: argparse.Namespace) -> None:
    from knowlens.errors import KnowlensError
    from knowlens.models import check_device

    for flag, value in (("--top", args.top), ("--threads", args.threads)):
        if value < 1:
            raise KnowlensError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.max_frequency <= 1:
        raise KnowlensError(f"--max-frequency must be in [0, 1], got {args.max_frequency}")
    check_device(args.device)


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, organism or None, SAE) with the SAE checked against the model."""
    from knowlens.cli._patching_common import load

    loaded = load(args, sae=args.sae)
    return loaded.model, loaded.org, loaded.sae


# ------------------------------------------------------------------------------------------- entity-known


def run_entity_known(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError
    from knowlens.outputs import check_output_dir
    from knowlens.saes.contrast import load_contrast_jsonl, load_entity_list

    _check_common(args)
    if not 0 <= args.holdout < 1:
        raise KnowlensError(f"--holdout must be in [0, 1), got {args.holdout}")
    if not 0 <= args.threshold <= 1:
        raise KnowlensError(f"--threshold must be in [0, 1], got {args.threshold}")
    for flag, value in (("--samples", args.samples), ("--k", args.k)):
        if value < 1:
            raise KnowlensError(f"{flag} must be >= 1, got {value}")
    if args.contrast is not None and (args.known is not None or args.unknown is not None):
        raise KnowlensError("give --contrast or --known/--unknown, not both")
    if args.contrast is not None:
        given = load_contrast_jsonl(args.contrast)
        known, unknown = given.known, given.unknown
    else:
        known = load_entity_list(args.known, "known") if args.known is not None else None
        unknown = load_entity_list(args.unknown, "unknown") if args.unknown is not None else None
    texts = None
    if args.training_texts is not None:
        from knowlens.cli.capture_cmd import read_texts

        texts = read_texts(args.training_texts)
    out = check_output_dir(args.out, overwrite=args.overwrite, owned=ENTITY_OWNED)

    from knowlens.saes import parse_sae_spec
    from knowlens.saes.contrast import (
        exemplar_free_contrast,
        fabricated_names,
        name_pieces,
        organism_training_texts,
        self_generated_entities,
    )
    from knowlens.saes.entity import (
        DEFAULT_TEMPLATES,
        compare_with_truth,
        locate_entity_known,
        organism_templates,
    )

    model, org, sae = _load(args)
    if texts is None and org is not None:
        texts = organism_training_texts(org)
    templates = args.template or (organism_templates(org.world) if org is not None else DEFAULT_TEMPLATES)
    gen = {"n_samples": args.samples, "k": args.k, "threshold": args.threshold,
           "template": args.fact_template or (templates[0] if args.template or org is not None else "{name}")}
    if known is None and unknown is None:
        contrast = exemplar_free_contrast(model, seed=args.seed, exclude_texts=texts, **gen)
        known, unknown = contrast.known, contrast.unknown
    elif known is None:
        known = self_generated_entities(model, seed=args.seed, **gen)
    elif unknown is None:
        unknown = fabricated_names(model, n=len(known.names), pieces=name_pieces(known.names), seed=args.seed,
                                   lengths=[len(n.split()) for n in known.names], exclude_texts=texts,
                                   exclude_names=known.names)  # fmt: skip
    assert known is not None and unknown is not None
    positions: tuple[str, ...] = ("name", "answer", "slot") if args.hook_position == "all" else (args.hook_position,)
    slots, frames = None, None
    if "slot" in positions:
        from knowlens.saes.frames import answer_frames

        frames = answer_frames(model, known.names, templates, unknown_names=unknown.names)
        slots = frames.slot_templates
        if not slots and args.hook_position == "all":
            print(f"note: the model's answers about the {len(known.names)} known entities share no frame that then "
                  "depends on the entity; the slot position is left out")  # fmt: skip
            positions = ("name", "answer")
    label = parse_sae_spec(args.sae).label
    found = locate_entity_known(model, sae, known, unknown, templates=templates, positions=positions,
                                max_frequency=args.max_frequency, top=args.top, holdout=args.holdout,
                                rank_by=args.rank_by, seed=args.seed, sae_label=label,
                                slot_templates=frames if slots else None)  # fmt: skip
    truth = compare_with_truth(model, sae, org.world, found) if org is not None else None
    if not any(len(fs) for fs in found.values()):
        raise KnowlensError(f"no latent is active on at most --max-frequency {args.max_frequency} of generic tokens")
    if truth is not None:
        truth.figures["probe"] = _truth_probe(model, truth.figures["eval_all"], found, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for (pos, direction), fs in found.items():
        fs.save(out / f"entity_known.{pos}.{direction}.safetensors")
    if truth is not None:
        from knowlens.outputs import atomic_write_text

        atomic_write_text(out / "truth.json", json.dumps(truth.figures, indent=2, allow_nan=False) + "\n")
    _entity_report(model, sae, found, truth, out / "report.html")
    first = next(iter(found.values()))
    c = first.contrast
    print(f"contrast: {c['known']['n']} known ({c['known']['method']}, {c['known']['n_rejected']} candidates "
          f"rejected), {c['unknown']['n']} unknown ({c['unknown']['method']}, {c['unknown']['n_rejected']} rejected"
          f"{_checked_against(c['unknown'])}); "
          f"{first.params['n_kept_latents']} of {first.params['d_sae']} latents active on <= {args.max_frequency} "
          f"of {first.params['n_generic_tokens']} generic tokens")  # fmt: skip
    for (pos, _direction), fs in found.items():
        print(f"\n{fs.name} at {pos} ({fs.params['position_rule']}), {fs.hook}, ranked by {fs.params['rank_by']}:")
        _table(fs.summary_rows(), ["rank", "latent", "score", "f_known", "f_unknown", "welch_t", "generic_frequency",
                                   "heldout_auroc"])  # fmt: skip
    if truth is not None:
        f = truth.figures
        print(f"\nground truth (the world's splits; AUROC on {f['n_eval']['known']} known / {f['n_eval']['unknown']} "
              "unknown held-out true entities the exemplar-free sets did not use):")  # fmt: skip
        rows = [{"where": k, "overlap": f"{v['overlap']}/{len(v['free_top'])}",
                 "top free latent AUROC": _num(v["free_auroc"][0] if v["free_auroc"] else None),
                 "best free AUROC": _num(max((x for x in v["free_auroc"] if x is not None), default=None)),
                 "top truth latent AUROC": _num(v["truth_auroc"][0] if v["truth_auroc"] else None),
                 "top free latent, all unused": _ci(v["free_top_auroc_all"], v["free_top_auroc_all_ci"])}
                for k, v in f["by"].items()]  # fmt: skip
        _table(rows, list(rows[0]))
        print(f"(all unused: every true entity the exemplar-free sets did not use, {f['n_eval_all']['known']} known / "
              f"{f['n_eval_all']['unknown']} unknown, with a bootstrap 95% interval)")  # fmt: skip
        probe = f["probe"]
        print(f"ground-truth linear probe on the same entities ({probe['what']}): "
              + ", ".join(f"{pos} {_ci(v['auroc'], v['ci'])}" for pos, v in probe["by"].items()))
        for k, v in f["by"].items():
            pos = k.split("/")[0]
            if v["free_top_auroc_all"] is not None and pos in probe["by"]:
                gap = probe["by"][pos]["auroc"] - v["free_top_auroc_all"]
                print(f"  {k}: top free latent {v['free_top_auroc_all']:.3f}, probe {probe['by'][pos]['auroc']:.3f}, "
                      f"gap {gap:+.3f} (issue 8 asks >= 0.90 and a gap <= 0.05)")  # fmt: skip
    print(f"\nwritten to {out}/ (FeatureSets, report.html{', truth.json' if truth is not None else ''})")
    return 0


def _truth_probe(model: Any, names: dict[str, list[str]], found: dict, *, seed: int) -> dict[str, Any]:
    """The ground-truth linear probe the top latents are compared with: per position, a logistic probe on the
    SAE's input activation (averaged over the templates, as the latents' scores are), true known vs unknown, out of
    5 folds (L2 chosen inside each), on the entities `free_top_auroc_all` is scored on, with a bootstrap interval."""
    import torch

    from knowlens.probes import bootstrap_ci, cross_validate
    from knowlens.saes.entity import entity_residuals, slot_templates_of

    first = next(iter(found.values()))
    every = names["known"] + names["unknown"]
    y = torch.tensor([True] * len(names["known"]) + [False] * len(names["unknown"]))
    res = entity_residuals(model, first.hook, every, templates=first.params["templates"],
                           slot_templates=slot_templates_of(found))  # fmt: skip
    by = {}
    for pos in dict.fromkeys(k[0] for k in found):
        cv = cross_validate(res[pos].double().mean(1), y, every, k=5, seed=seed)
        lo, hi = bootstrap_ci(cv.scores, y, every, seed=seed)
        by[pos] = {"auroc": cv.auroc, "ci": [lo, hi], "l2": list(cv.l2)}
    return {"what": f"{first.hook}, logistic, 5 folds, out of fold", "by": by}


def _ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def _entity_report(model: Any, sae: Any, found: dict, truth: Any, path: Path) -> None:
    import torch

    from knowlens.saes.entity import entity_activations, slot_templates_of

    first = next(iter(found.values()))
    c = first.contrast
    names = [*c["known"]["names"], *c["unknown"]["names"]]
    side = ["known"] * c["known"]["n"] + ["unknown"] * c["unknown"]["n"]
    slots = slot_templates_of(found)
    every = sorted({j for fs in found.values() for j in fs.latents.tolist()})
    acts = entity_activations(model, sae, names, templates=first.params["templates"], latents=every, slot_templates=slots)
    col = {j: i for i, j in enumerate(every)}
    parts = [_contrast_html(c)]
    for (pos, direction), fs in found.items():
        stat = {"separation": f"s_{direction}", "auroc": f"auroc_{direction}"}.get(fs.params["rank_by"])
        score = fs.per_latent.get(stat) if stat else None
        parts.append(f"<h2>{html.escape(fs.name)} at {pos} ({html.escape(fs.params['position_rule'])})</h2>")
        if score is not None:
            kept = (fs.per_latent["generic_frequency"] <= fs.params["max_frequency"]) & torch.isfinite(score)
            parts.append(_histogram(score[kept].tolist(), f"{stat} of the kept latents", f"hist-{pos}-{direction}"))
        a = acts[pos]  # (entity, template, n)
        templates = slots if pos == "slot" and slots else first.params["templates"]
        contexts = {}
        for j in fs.latents.tolist():
            flat = a[..., col[j]].flatten()
            order = torch.argsort(flat, descending=True)[:5].tolist()
            contexts[j] = [(templates[i % len(templates)].format(name=names[i // len(templates)]),
                            side[i // len(templates)], float(flat[i])) for i in order if float(flat[i]) > 0]  # fmt: skip
        parts.append(_latent_table(fs.summary_rows(), contexts,
                                   ["score", "f_known", "f_unknown", "welch_t", "generic_frequency", "heldout_auroc"]))
    if truth is not None:
        parts.append("<h2>Against the world's true splits</h2><pre>" + html.escape(json.dumps(truth.figures, indent=1))
                     + "</pre>")  # fmt: skip
    _write_page(path, "knowlens features entity-known", first, parts)


def _checked_against(side: dict) -> str:
    where = side["params"].get("checked_against")
    return f", checked against {where}" if where else ""


def _contrast_html(c: dict) -> str:
    rows = []
    for s in ("known", "unknown"):
        d = c[s]
        shown = ", ".join(d["names"][:20]) + (" ..." if d["n"] > 20 else "")
        rows.append(f"<li><b>{s}</b>: {d['n']} names, {html.escape(d['method'])}; {d['n_rejected']} rejected. "
                    f"{html.escape(shown)}<br><small>{html.escape(json.dumps(d['params']))}</small></li>")  # fmt: skip
    return "<h2>Contrast sets</h2><ul>" + "".join(rows) + "</ul>"


# ----------------------------------------------------------------------------------------------- surprise


def run_surprise(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError
    from knowlens.outputs import check_output_dir

    _check_common(args)
    texts = None
    if args.text is not None:
        from knowlens.cli.capture_cmd import read_texts

        texts = read_texts(args.text)
    elif args.model != "organism" and not Path(args.model).is_dir():
        raise KnowlensError("--text is required unless --model is an organism")
    out = check_output_dir(args.out, overwrite=args.overwrite, owned=SURPRISE_OWNED)

    from knowlens.saes import locate_surprise, parse_sae_spec
    from knowlens.saes.train import held_out_texts

    model, org, sae = _load(args)
    if texts is None:
        texts = held_out_texts(org)
    tokens, mask = _rows(model, texts)
    res = locate_surprise(model, sae, tokens, mask=mask, max_frequency=args.max_frequency, top=args.top,
                          seed=args.seed, sae_label=parse_sae_spec(args.sae).label)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    res.save(out / "surprise.safetensors")
    _surprise_report(model, sae, res, tokens, mask, out / "report.html")
    print(f"{res.n_tokens} tokens in {res.n_sequences} sequences at {res.hook} (mean surprisal "
          f"{res.surprisal_mean:.3f} nats); {len(res.latents)} latents active on <= {args.max_frequency} of "
          f"{res.n_generic_tokens} generic tokens, by |Spearman rho|:")  # fmt: skip
    rows = [{"rank": i + 1, "latent": int(j), "rho": float(r), "frequency": float(f)}
            for i, (j, r, f) in enumerate(zip(res.latents.tolist(), res.rho.tolist(), res.frequency.tolist()))]
    _table(rows, ["rank", "latent", "rho", "frequency"])
    print(f"ridge direction (l2 {res.l2:g}): held-out R^2 {_num(res.r2)}, Pearson r {_num(res.pearson)} on "
          f"{res.n_test_tokens} tokens of {len(res.test_sequences)} held-out sequences")  # fmt: skip
    written = "surprise.safetensors + .json, report.html"
    if org is not None:
        _organism_entropy_gap(org, out / "entropy_gap.json", seed=args.seed)
        written += ", entropy_gap.json"
    print(f"written to {out}/ ({written})")
    return 0


def _organism_entropy_gap(org: Any, path: Path, *, seed: int) -> None:
    """The entropy-gap study on the organism's held-out questions: its own greedy answer vs the world's true
    answer, and vs another question's answer swapped in; printed and written to ``path``."""
    import json

    from knowlens.analyses import entropy_gap
    from knowlens.organism.corpus import answer_for, biography_for
    from knowlens.outputs import atomic_write_text

    items = list(org.corpus.held_out)
    prompts = [it.prompt for it in items]
    by_name = org.world.by_name
    truths = [biography_for(org.world, by_name[it.entity]) if it.attribute is None
              else answer_for(org.world, by_name[it.entity], it.attribute) for it in items]  # fmt: skip
    studies = {"true answer": entropy_gap(org.model, prompts, others=truths, max_new_tokens=48, seed=seed),
               "swapped answer": entropy_gap(org.model, prompts, others="derange", max_new_tokens=48, seed=seed)}  # fmt: skip
    print(f"entropy gap on {len(items)} held-out questions, output entropy (and input surprisal) on the model's own "
          "greedy answer / on other text after the same prompt, 95% bootstrap over questions:")  # fmt: skip
    for name, gap in studies.items():
        lo, hi = gap.entropy_interval
        slo, shi = gap.surprisal_interval
        print(f"  vs {name}: entropy ratio {_num(gap.entropy_ratio)} [{_num(lo)}, {_num(hi)}], surprisal ratio "
              f"{_num(gap.surprisal_ratio)} [{_num(slo)}, {_num(shi)}]")  # fmt: skip
    payload = {name: gap.to_dict() for name, gap in studies.items()}
    atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def _rows(model: Any, texts: list[str]) -> tuple[Any, Any]:
    """Each text as <bos> text <eos> (cut at n_ctx), right-padded; the mask of real tokens."""
    import torch

    from knowlens.capture.prompts import pad_token_id, warn_unknown_words
    from knowlens.errors import KnowlensError

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise KnowlensError("this model has no tokenizer to read --text with")
    warn_unknown_words(tok, texts)
    bos = [tok.bos_token_id] if isinstance(tok.bos_token_id, int) else []
    eos = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else []
    docs = [[*bos, *tok(t, add_special_tokens=False)["input_ids"], *eos][: int(model.cfg.n_ctx)] for t in texts]
    docs = [d for d in docs if len(d) >= 2]
    if len(docs) < 3:
        raise KnowlensError(f"{len(docs)} texts of 2 or more tokens; the surprise direction needs 3 or more")
    width = max(len(d) for d in docs)
    tokens = torch.full((len(docs), width), pad_token_id(model), dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.bool)
    for i, d in enumerate(docs):
        tokens[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = True
    return tokens, mask


def _surprise_report(model: Any, sae: Any, res: Any, tokens: Any, mask: Any, path: Path) -> None:
    from knowlens.saes import input_surprisal
    from knowlens.saes.features import latent_activations, top_contexts

    rho = [x for x in res.rho_all.tolist() if math.isfinite(x)]
    valid = mask.clone()
    valid[:, 0] = False
    acts = latent_activations(model, sae, tokens, res.latents)
    s = input_surprisal(model, tokens)
    tok = model.tokenizer
    contexts = {}
    for j, best in zip(res.latents.tolist(), top_contexts(acts, valid, n=50)):
        shown: dict[str, float] = {}  # distinct contexts only: many sequences share their opening words
        for r, p, v in best:
            before = tok.decode(tokens[r, max(0, p - 8) : p].tolist())
            shown.setdefault(f"{before} [[{tok.decode([int(tokens[r, p])])}]] (s = {float(s[r, p]):.2f})", v)
        contexts[j] = [(text, "", v) for text, v in list(shown.items())[:5]]
    rows = [{"rank": i + 1, "latent": int(j), "rho": float(r), "frequency": float(f)}
            for i, (j, r, f) in enumerate(zip(res.latents.tolist(), res.rho.tolist(), res.frequency.tolist()))]
    parts = [f"<p>{res.n_tokens} tokens, {res.n_sequences} sequences; ridge direction held-out R<sup>2</sup> "
             f"{_num(res.r2)}, Pearson r {_num(res.pearson)}</p>",
             _histogram(rho, "Spearman rho of every latent with the input surprisal", "hist-rho"),
             _latent_table(rows, contexts, ["rho", "frequency"])]  # fmt: skip
    _write_page(path, "knowlens features surprise", res, parts)


# ------------------------------------------------------------------------------------------------ shared


def _histogram(values: list[float], title: str, div_id: str) -> str:
    import plotly.graph_objects as go

    from knowlens.analyses.report import OFFLINE_CONFIG

    fig = go.Figure(go.Histogram(x=values, nbinsx=50))
    fig.update_layout(title=title, height=300, margin={"l": 40, "r": 10, "t": 40, "b": 30})
    return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=OFFLINE_CONFIG,
                       div_id=div_id)  # fmt: skip


def _latent_table(rows: list[dict], contexts: dict[int, list[tuple[str, str, float]]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["rank", "latent", *cols, "top-activating contexts"])
    body = []
    for r in rows:
        ctx = "<br>".join(f"{v:.3f} {html.escape(side)} <code>{html.escape(text)}</code>"
                          for text, side, v in contexts.get(r["latent"], []))  # fmt: skip
        cells = "".join(f"<td>{_num(r[c])}</td>" for c in cols)
        body.append(f"<tr><td>{r['rank']}</td><td>{r['latent']}</td>{cells}<td>{ctx or '(never active)'}</td></tr>")
    return f"<table class='latents'><tr>{head}</tr>{''.join(body)}</table>"


def _write_page(path: Path, title: str, obj: Any, parts: list[str]) -> None:
    from plotly.offline import get_plotlyjs

    from knowlens.analyses.report import STYLE
    from knowlens.outputs import atomic_write_text

    m = obj.model
    head = (f"<h1>{html.escape(title)}</h1><p>model {html.escape(m.get('name', ''))}: fingerprint "
            f"<code>{html.escape(m.get('fingerprint', ''))}</code>; SAE {html.escape(obj.sae_label)} at "
            f"<code>{html.escape(obj.hook)}</code></p>")  # fmt: skip
    style = STYLE + "table.latents{border-collapse:collapse;font-size:13px}.latents td,.latents th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}"
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
            f"<style>{style}</style></head><body>" + head + "\n".join(parts) + "</body></html>")  # fmt: skip
    atomic_write_text(path, page)


def _table(rows: list[dict], cols: list[str]) -> None:
    cells = [cols] + [[_num(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    return str(v)
