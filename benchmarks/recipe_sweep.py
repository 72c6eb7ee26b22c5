"""Train several organism recipes side by side and measure each one's behaviour and signal gates.

Each variant is a world (a shipped world file plus overrides of its fields) and a training config (overrides
of `TrainConfig`). Variants train in parallel worker processes, on the CPU or a GPU (``--device cuda``);
the GPU trains the same recipes to other weights than the CPU would, so a sweep there ranks recipes, and
the recipe that ships is then trained on the CPU with ``knowlens organism train``.

    python benchmarks/recipe_sweep.py --device cuda --jobs 14 --out sweep/
    python benchmarks/recipe_sweep.py --variants base,epochs600 --epochs 2 --out /tmp/smoke   # a smoke run

Writes ``summary.json`` (one entry per finished variant: gates, signal gates with where they were found,
training time, value-token sources) and prints a table as variants finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

WORLDS = Path(__file__).resolve().parents[1] / "knowlens" / "organism" / "worlds"

# name: (world file, overrides of world fields (nested dicts merge), overrides of TrainConfig)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "base": ("v2_candidate.yaml", {}, {}),
    "epochs600": ("v2_candidate.yaml", {}, {"epochs": 600}),
    "layers6": ("v2_candidate.yaml", {}, {"n_layers": 6}),
    "wide256": ("v2_candidate.yaml", {}, {"d_model": 256, "d_mlp": 1024, "n_heads": 8}),
    "oneoff1200": ("v2_candidate.yaml", {"familiarity": {"one_off_questions": 1200}}, {}),
    "refuse07": ("v2_candidate.yaml", {"familiarity": {"one_off_refusal": 0.7}}, {}),
    "bios3": ("v2_candidate.yaml", {"augmentation": {"biographies_per_epoch": 3}}, {}),
    "nopartial": ("v2_candidate.yaml", {"splits": {"known": 0.64, "partial": 0.0, "refusal": 0.2, "unknown": 0.16}}, {}),
    "names23": ("v2_candidate.yaml", {"name_length": [2, 3]}, {}),
    "cue05": ("v2_candidate.yaml", {"cue_strength": 0.5}, {}),
    "qa08": ("v2_candidate.yaml", {"qa_train_fraction": 0.8}, {}),
    "wd01": ("v2_candidate.yaml", {}, {"weight_decay": 0.1}),
    "lr4e3": ("v2_candidate.yaml", {}, {"lr": 4e-3}),
    "combo": ("v2_candidate.yaml", {"familiarity": {"one_off_questions": 1200},
                                    "augmentation": {"biographies_per_epoch": 3}}, {"epochs": 600}),
    "archipelago": ("archipelago.yaml", {}, {}),
    "v1default": ("v1.yaml", {}, {}),
}


def merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def run_variant(name: str, out_dir: str, device: str, epochs: int | None, threads: int) -> dict[str, Any]:
    import torch
    import yaml

    torch.set_num_threads(threads)
    from dataclasses import replace

    from knowlens.analyses.answers import answer_items
    from knowlens.analyses.gates import gate_figures
    from knowlens.analyses.signals import signal_figures, signal_hooks
    from knowlens.organism.corpus import every_phrasing
    from knowlens.organism.spec import parse_spec
    from knowlens.organism.store import load_organism
    from knowlens.organism.train import TrainConfig, train_organism

    world_file, world_over, train_over = VARIANTS[name]
    raw = merge(yaml.safe_load((WORLDS / world_file).read_text()), world_over)
    spec = parse_spec(raw)
    config = replace(TrainConfig(), **{"epochs": 300, "weight_decay": 0.01, **train_over})  # the sweep ran with the v1 recipe: 300 epochs, weight decay 0.01
    if epochs is not None:
        config = replace(config, epochs=epochs)
    started = time.time()
    show = os.environ.get("SWEEP_PROGRESS") == "1"  # with TQDM_MININTERVAL=30 or so: a line now and then
    org = train_organism(spec, Path(out_dir) / name, config=config, progress=show, device=device)
    trained = time.time() - started
    org = load_organism(Path(out_dir) / name)  # as a user loads it: with its tokenizer
    model = org.model
    result: dict[str, Any] = {"variant": name, "world": world_file, "world_overrides": world_over,
                              "train_config": {**train_over, "epochs": config.epochs}, "device": device,
                              "train_seconds": round(trained, 1), "final_loss": org.info.get("training", {}).get("final_loss")}
    for where in (device, "cpu"):  # evaluate on the device; fall back to the CPU if anything there fails
        try:
            model.to(where)
            answers = answer_items(model, org.world, org.corpus.held_out)
            figures = gate_figures(answers)
            probed = answer_items(model, org.world, every_phrasing(org.world, org.corpus.held_out),
                                  hooks=signal_hooks(model.cfg.n_layers))
            signals = signal_figures(probed)
            break
        except Exception as err:  # noqa: BLE001
            if where == "cpu":
                raise
            result["eval_fallback"] = f"{type(err).__name__}: {err}"
    result["eval_seconds"] = round(time.time() - started - trained, 1)
    result["gates"] = {k: g["value"] for k, g in figures["gates"].items()}
    result["behaviour"] = {k: v for k, v in figures.items() if k != "gates"}
    result["signals"] = {
        k: {f: g.get(f) for f in ("value", "ci95", "where", "n", "baselines", "best_single", "candidates")}
        for k, g in signals["gates"].items()
    }
    sources: dict[str, int] = {}
    for a in probed:
        for c in a.grade.claims:
            for j in range(*c.value_tokens):
                key = f"{a.item.split}/{a.item.kind}/{a.grade.classes[j]}"
                sources[key] = sources.get(key, 0) + 1
    result["value_token_sources"] = dict(sorted(sources.items()))
    return result


def line(r: dict[str, Any]) -> str:
    g, s = r["gates"], r["signals"]

    def v(x: Any) -> str:
        val = x.get("value") if isinstance(x, dict) else x
        return "  -  " if val is None else f"{val:.3f}"

    top1 = (s["token_hallucination"].get("baselines") or {}).get("top1", {})
    return (f"{r['variant']:<12} known_acc {v(g.get('known_accuracy'))} unk_ref {v(g.get('unknown_refusal_rate'))} "
            f"unk_hal {v(g.get('unknown_hallucination_rate'))} | ek {v(s['entity_known'])} "
            f"ekh {v(s['entity_known_when_hallucinating'])} tok {v(s['token_hallucination'])} (top1 {v(top1)}) "
            f"| train {r['train_seconds']:.0f}s eval {r['eval_seconds']:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--epochs", type=int, default=None, help="override every variant's epochs (smoke runs)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which unfinished variants are dropped")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"recipe_sweep: unknown variants {unknown}; known: {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    started = time.time()
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, n, str(out), args.device, args.epochs, args.threads): n for n in names}
        pending = set(futures)
        while pending:
            left = None if args.deadline is None else max(0.0, args.deadline - (time.time() - started))
            done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            if not done:
                print(f"deadline: dropping {[futures[f] for f in pending]}", flush=True)
                for p in pool._processes.values():  # noqa: SLF001 (a sweep script: stop the workers now)
                    p.kill()
                break
            for f in done:
                try:
                    r = f.result()
                except Exception:  # noqa: BLE001
                    print(f"{futures[f]} FAILED:\n{traceback.format_exc()}", flush=True)
                    continue
                results.append(r)
                print(line(r), f"[{time.time() - started:.0f}s]", flush=True)
                tmp = out / "summary.json.tmp"
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
