"""How often does `knowlens label --explain` name the entity-known latents behind a hallucinated token?

On the organism: greedy answers to its held-out questions about *unknown* entities, labelled by the shipped probe
with explanations (``label_generation(..., explain=True, sae=...)``: the SAE latents that most drive the probe's
decision on every unreliable token, activation x gradient). For each hallucinated token (the grader's class) that
got an explanation, does its top-k latent list hold a latent of the exemplar-free entity-known FeatureSets (both
directions, every position rule, at the SAE's hook)? Control: random latent sets of the same size.

    knowlens features entity-known --sae organism:blocks.2.hook_resid_post --out feats/
    python benchmarks/explain_entity_latents.py feats/entity_known.*.safetensors

Prints the fraction with its count, the attribution share those latents carry, and the control; last line JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features", nargs="+", type=Path, help="FeatureSet files (entity_known.*.safetensors)")
    p.add_argument("--sae", default="organism:blocks.2.hook_resid_post")
    p.add_argument("--top", type=int, default=5, help="latents per explanation (default 5, as --explain-top)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--controls", type=int, default=200, help="random latent sets for the control")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    from knowlens.labels import label_generation
    from knowlens.organism.corpus import every_phrasing
    from knowlens.organism.grader import grade_answer
    from knowlens.organism.store import load_organism, organism_path
    from knowlens.probes import load_probe
    from knowlens.saes import FeatureSet, load_sae

    folder = organism_path("organism")
    org = load_organism(folder)
    model = org.model
    sae = load_sae(args.sae, model)
    probes = [load_probe(f, model=model) for f in sorted(folder.glob("probe-*.safetensors"))]
    sets = [FeatureSet.load(f, model=model) for f in args.features]
    sets = [s for s in sets if s.hook == sae.cfg.metadata.hook_name]
    if not sets:
        raise SystemExit(f"no FeatureSet at the SAE's hook {sae.cfg.metadata.hook_name}")
    entity_latents = {int(i) for s in sets for i in s.latents.tolist()}
    items = [it for it in every_phrasing(org.world, org.corpus.held_out) if it.split == "unknown"]
    labels = label_generation(model, [it.prompt for it in items], probes, max_new_tokens=args.max_new_tokens,
                              sae=sae, explain=True, explain_top_k=args.top)  # fmt: skip
    explained: list[list[tuple[int, float]]] = []  # per hallucinated explained token: (latent, share) of its top list
    hallucinated = 0
    for g, it in zip(labels.generations, items):
        classes = grade_answer(org.world, list(g.token_texts), entity=it.entity).classes
        for t, c in zip(g.tokens, classes):
            if c != "hallucinated":
                continue
            hallucinated += 1
            if t.explanation is not None:
                explained.append([(int(e.latent), abs(e.share)) for e in t.explanation.latents
                                  if isinstance(e.latent, int)])  # fmt: skip
    if not explained:
        raise SystemExit("no hallucinated token was labelled unreliable and explained")
    rng = random.Random(0)
    d_sae = int(sae.cfg.d_sae)

    def measure(latents: set[int]) -> dict[str, Any]:
        hit = [any(lat in latents for lat, _ in top) for top in explained]
        share = [sum(s for lat, s in top if lat in latents) for top in explained]
        control = sorted(statistics.mean(any(lat in pick for lat, _ in top) for top in explained)
                         for pick in (set(rng.sample(range(d_sae), len(latents))) for _ in range(args.controls)))
        return {"latents": len(latents), "fraction": round(statistics.mean(hit), 3),
                "mean_share": round(statistics.mean(share), 3), "control_mean": round(statistics.mean(control), 3),
                "control_p95": round(control[int(0.95 * len(control)) - 1], 3)}  # fmt: skip

    groups = {"all": entity_latents}
    for position in sorted({s.position for s in sets}):
        groups[position] = {int(i) for s in sets if s.position == position for i in s.latents.tolist()}
    result = {
        "sae": args.sae, "feature_sets": [f"{s.name} @ {s.position} ({len(s)} latents)" for s in sets],
        "unknown_entity_prompts": len(items), "hallucinated_tokens": hallucinated, "explained": len(explained),
        "top": args.top, "by_feature_sets": {k: measure(v) for k, v in groups.items()},
    }  # fmt: skip
    print(f"{len(explained)} of {hallucinated} hallucinated tokens about unknown entities were labelled unreliable "
          f"and explained (top {args.top} latents each). Share of explanations naming a latent of the entity-known "
          f"FeatureSets (both directions), by position rule; control: {args.controls} random latent sets of the same size:")
    for k, m in result["by_feature_sets"].items():
        print(f"  {k:<7} {m['latents']:3d} latents: {m['fraction']:.3f} (attribution share {m['mean_share']:.3f}); "
              f"random sets {m['control_mean']:.3f} (95th percentile {m['control_p95']:.3f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
