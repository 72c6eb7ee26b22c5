"""Benchmark of knowlens labels (a benchmark, not a timed test): ratios measured in one run.

    python benchmarks/bench_labels.py                      # the shipped organism and its shipped probe(s), CPU
    python benchmarks/bench_labels.py --device cuda        # the GPU variant, on a lent accelerator
    python benchmarks/bench_labels.py --skip-fit --repeats 3   # labelling only

Three measurements:

* **labelling overhead**: `label_generation` with the organism's shipped probes (``probe-*.safetensors`` in its
  folder, `knowlens label`'s default) versus plain capture ``generate`` recording the same hooks, on the same 16
  held-out prompts x 64 new tokens (``stop_at_eos=False``: every variant runs the same steps), and ``generate``
  recording nothing; interleaved repeats (order rotated) after a warm-up; medians, and the median of the per-repeat
  ratios, process CPU time and the fastest runs (less sensitive to a shared machine). Target: label / capture
  <= 1.05.
* **explanations**: ``label_generation(..., explain=True)`` with the shipped SAE at the probe's hook: seconds per
  explained (unreliable) token, also as a multiple of the labelling time per generated token.
* **probe fitting**: knowlens's logistic probe (`fit_logistic`: standardised, Newton, float64 and float32 (tolerance
  1e-6 in float32), on ``--device``) versus scikit-learn (``StandardScaler`` + ``LogisticRegression``, lbfgs and newton-cholesky) at the
  same L2 strength (C = 1 / l2) on the same 200k x d_model rows: the organism's residual at ``--fit-hook`` over its
  training distribution, labelled by whether the model's greedy next-token prediction there is right (a real,
  non-separable target); AUROC on 50k further rows; median of ``--fit-repeats`` fits each. Ratio of times at equal
  AUROC.

The last line printed is the JSON of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip-fit", action="store_true", help="leave out the probe-fitting comparison")
    p.add_argument("--fit-rows", type=int, default=200_000)
    p.add_argument("--fit-test-rows", type=int, default=50_000)
    p.add_argument("--fit-hook", default="blocks.2.hook_resid_post")
    p.add_argument("--fit-l2", type=float, default=1.0)
    p.add_argument("--fit-repeats", type=int, default=3)
    return p.parse_args(argv)


def timed(fn: Any, sync: Any) -> tuple[float, float]:
    """Wall and process CPU seconds of one call (CPU time: less sensitive to other processes on a shared machine)."""
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - start, time.process_time() - start_cpu


def labelling(args: argparse.Namespace, org: Any, sync: Any) -> dict[str, Any]:

    from knowlens.capture import generate
    from knowlens.labels import label_generation
    from knowlens.organism.store import organism_path
    from knowlens.probes import load_probe
    from knowlens.saes import load_sae

    model = org.model
    folder = organism_path("organism")
    files = sorted(folder.glob("probe-*.safetensors"))
    if not files:
        raise SystemExit(f"bench_labels: no shipped probe in {folder} (knowlens organism fit-probes makes one)")
    probes = [load_probe(f, model=model) for f in files]
    hooks = sorted({p.hook for p in probes})
    longest = model.cfg.n_ctx - args.new_tokens
    prompts = [it.prompt for it in org.corpus.held_out if len(model.to_tokens(it.prompt)[0]) <= longest]
    prompts = prompts[: args.batch]
    if len(prompts) < args.batch:
        raise SystemExit(f"bench_labels: only {len(prompts)} held-out prompts fit {args.new_tokens} new tokens")
    n = args.new_tokens
    variants = {
        "generate": lambda: generate(model, prompts, hooks=(), max_new_tokens=n, stop_at_eos=False),
        "capture": lambda: generate(model, prompts, hooks=hooks, max_new_tokens=n, stop_at_eos=False),
        "label": lambda: label_generation(model, prompts, probes, max_new_tokens=n, stop_at_eos=False,
                                          batch_size=args.batch),  # fmt: skip
    }
    names = list(variants)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for fn in variants.values():  # warm-up
        fn()
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            w, c = timed(variants[name], sync)
            wall[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = args.batch * n
    out: dict[str, Any] = {
        "probes": [f"{p.name} ({p.hook} @ {p.position})" for p in probes],
        "prompts": len(prompts), "new_tokens": n, "repeats": args.repeats,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "label_over_capture": round(med["label"] / med["capture"], 3),
        "label_over_generate": round(med["label"] / med["generate"], 3),
        "paired_label_over_capture": round(statistics.median(a / b for a, b in zip(wall["label"], wall["capture"])), 3),
        "cpu_time_label_over_capture": round(med_cpu["label"] / med_cpu["capture"], 3),
        "min_label_over_capture": round(min(wall["label"]) / min(wall["capture"]), 3),
        "tokens_per_s_label": round(tokens / med["label"], 1),
        "wall_s_all": {k: [round(x, 4) for x in v] for k, v in wall.items()},
    }  # fmt: skip
    sae_spec = f"organism:{probes[0].hook}"
    try:
        sae = load_sae(sae_spec, model)
    except Exception as err:  # noqa: BLE001 - no shipped SAE at that hook: positions only
        out["explain_sae"] = f"none ({type(err).__name__}: {err})"
        sae = None
    else:
        out["explain_sae"] = sae_spec
    per_tok, explained = [], 0
    for _ in range(max(1, args.repeats // 2)):
        res = label_generation(model, prompts, probes, max_new_tokens=n, stop_at_eos=False, batch_size=args.batch,
                               sae=sae, explain=True)  # fmt: skip
        info = res.params["explain"]
        explained = info["tokens"]
        if info["seconds_per_token"] is not None:
            per_tok.append(info["seconds_per_token"])
    out["explained_tokens"] = explained
    if per_tok:
        s = statistics.median(per_tok)
        out["explain_s_per_token"] = round(s, 5)
        out["explain_over_label_per_token"] = round(s / (med["label"] / tokens), 1)
    return out


def residual_rows(org: Any, hook: str, rows: int, device: Any) -> tuple[Any, Any]:
    """``rows`` residuals at ``hook`` over the organism's training distribution, and whether the model's greedy
    next-token prediction at each is right."""
    import torch

    from knowlens.capture import stream_rows
    from knowlens.organism.corpus import training_text_stream

    X, y, have = [], [], 0
    with torch.inference_mode():
        for batch in stream_rows(org.model, training_text_stream(org.world, org.corpus), seq_len=64, rows=64):
            batch = batch.to(device)
            logits, cache = org.model.run_with_cache(batch, names_filter=hook)
            right = logits[:, :-1].argmax(-1) == batch[:, 1:]
            X.append(cache[hook][:, :-1].reshape(-1, cache[hook].shape[-1]).float())
            y.append(right.reshape(-1))
            have += right.numel()
            if have >= rows:
                break
    return torch.cat(X)[:rows], torch.cat(y)[:rows]


def fitting(args: argparse.Namespace, org: Any, sync: Any) -> dict[str, Any]:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from knowlens.probes import fit_logistic

    device = torch.device(args.device)
    X, y = residual_rows(org, args.fit_hook, args.fit_rows + args.fit_test_rows, device)
    Xtr, ytr, Xte, yte = X[: args.fit_rows], y[: args.fit_rows], X[args.fit_rows :], y[args.fit_rows :]
    Xtr_np, ytr_np, Xte_np, yte_np = (t.cpu().numpy() for t in (Xtr, ytr, Xte, yte))
    C = 1.0 / args.fit_l2

    def knowlens_fit(dtype: Any) -> Any:  # float32 cannot reach the float64 default tolerance: 1e-6 there
        tol = 1e-10 if dtype == torch.float64 else 1e-6
        return lambda: fit_logistic(Xtr, ytr, l2=args.fit_l2, dtype=dtype, tol=tol)

    def sk_fit(solver: str) -> Any:
        return lambda: make_pipeline(StandardScaler(), LogisticRegression(C=C, solver=solver, max_iter=1000)).fit(
            Xtr_np.astype(np.float64), ytr_np)

    fits = {"knowlens float64": knowlens_fit(torch.float64), "knowlens float32": knowlens_fit(torch.float32),
            "sklearn lbfgs": sk_fit("lbfgs"), "sklearn newton-cholesky": sk_fit("newton-cholesky")}  # fmt: skip
    out: dict[str, Any] = {"rows": int(len(Xtr)), "test_rows": int(len(Xte)), "d": int(X.shape[1]),
                           "hook": args.fit_hook, "l2": args.fit_l2, "positive_share": round(float(y.float().mean()), 3),
                           "fits": {}}  # fmt: skip
    for name, fn in fits.items():
        times, model = [], None
        for _ in range(args.fit_repeats):
            sync()
            start = time.perf_counter()
            model = fn()
            sync()
            times.append(time.perf_counter() - start)
        if name.startswith("knowlens"):
            auc = roc_auc_score(yte_np, model.decision(Xte).cpu().numpy())
        else:
            auc = roc_auc_score(yte_np, model.decision_function(Xte_np.astype(np.float64)))
        out["fits"][name] = {"median_s": round(statistics.median(times), 3), "auroc": round(float(auc), 5)}
    base = out["fits"]["knowlens float64"]["median_s"]
    for name in ("sklearn lbfgs", "sklearn newton-cholesky"):
        out[f"{name} / knowlens float64"] = round(out["fits"][name]["median_s"] / base, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import knowlens
    from knowlens.organism.store import load_organism, organism_path

    device = torch.device(args.device)
    org = load_organism(organism_path("organism"), device=args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    result: dict[str, Any] = {
        "model": f"organism {org.info.get('fingerprint', '')}".strip(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "knowlens": knowlens.__version__, "load_before": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    lab = labelling(args, org, sync)
    result["labelling"] = lab
    print(f"labelling ({', '.join(lab['probes'])}), {lab['prompts']} prompts x {lab['new_tokens']} new tokens, "
          f"{lab['repeats']} repeats, medians on {result['device']}:")
    for k, v in lab["median_s"].items():
        print(f"  {k:<9} {v * 1000:8.1f} ms")
    print(f"  label / capture {lab['label_over_capture']:.3f} (paired {lab['paired_label_over_capture']:.3f}, CPU time "
          f"{lab['cpu_time_label_over_capture']:.3f}, fastest runs {lab['min_label_over_capture']:.3f}; target <= 1.05); "
          f"label / generate {lab['label_over_generate']:.3f}")
    if "explain_s_per_token" in lab:
        print(f"  --explain ({lab['explain_sae']}): {lab['explain_s_per_token'] * 1000:.1f} ms per explained token "
              f"({lab['explained_tokens']} tokens), {lab['explain_over_label_per_token']:.0f}x a labelled token's time")
    if not args.skip_fit:
        fit = fitting(args, org, sync)
        result["fitting"] = fit
        print(f"probe fitting on {fit['rows']:,} x {fit['d']} rows ({fit['hook']}, l2 {fit['l2']}, "
              f"{fit['positive_share']:.0%} positive), AUROC on {fit['test_rows']:,} further rows:")
        for k, v in fit["fits"].items():
            print(f"  {k:<24} {v['median_s']:8.3f} s  AUROC {v['auroc']:.4f}")
    result["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
