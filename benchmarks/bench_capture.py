"""Benchmark of knowlens capture (a benchmark, not a timed test): ratios measured in one run.

    python benchmarks/bench_capture.py                          # the organism (falls back to its shape, random)
    python benchmarks/bench_capture.py --random-shape organism  # random weights, organism shape, loads nothing
    python benchmarks/bench_capture.py --device cuda --random-shape gpt2 --batch 32

Timed variants (``stop_at_eos=False`` everywhere, so every variant runs the same number of steps), run
interleaved (one of each per repeat) after a warm-up, medians reported:

* ``none``:      knowlens ``generate`` recording no hook (the loop alone)
* ``capture``:   knowlens ``generate`` recording ``hook_resid_post`` at every layer
* ``recompute``: TransformerLens ``model.generate(use_past_kv_cache=True, do_sample=False)``, then
  ``run_with_cache`` on the result, filtered to the same hooks (the approach capture replaces)
* ``tl_generate``: the TransformerLens ``generate`` alone (for reference)

Ratios: capture overhead = capture / none (target <= 1.10); speed-up = recompute / capture (target >= 1.3).
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
from typing import Any

SHAPES = {
    # the shipped organism's shape (knowlens/organism/data/config.json)
    "organism": dict(n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=125, n_ctx=96),
    "gpt2": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="a knowlens.load_model name (default: organism)")
    p.add_argument("--random-shape", choices=sorted(SHAPES), default=None,
                   help="build a random-weight model of this shape instead of loading one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[Any, str]:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if args.random_shape is None:
        try:
            import knowlens

            model, _card = knowlens.load_model(args.model, device=args.device)
            return model.eval(), args.model
        except Exception as err:  # the organism may not be shipped yet: say so, then use its shape
            print(f"# could not load {args.model!r} ({type(err).__name__}: {err}); using --random-shape organism",
                  file=sys.stderr)
            args.random_shape = "organism"
    torch.manual_seed(0)
    shape = SHAPES[args.random_shape]
    act_fn = "gelu_new" if args.random_shape == "gpt2" else "gelu"
    cfg = HookedTransformerConfig(**shape, act_fn=act_fn, normalization_type="LN", device=args.device, seed=0)
    model = HookedTransformer(cfg, tokenizer=word_tokenizer(shape["d_vocab"]))
    return model.eval(), f"random {args.random_shape} shape"


def word_tokenizer(d_vocab: int) -> Any:
    """A word-level tokenizer of ``d_vocab`` entries (pad 0, bos 1, eos 2, unk 3), built offline.

    The random model gets one because TransformerLens 3.9's cached ``generate`` computes wrong positions
    for a model without a tokenizer (it adds the cache length to the full sequence's positions, and
    fails outright once that passes n_ctx); with a tokenizer it takes its attention-mask path, as it does
    for the organism and every pretrained model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"t{i}" for i in range(4, d_vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path="bench-words", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", add_bos_token=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformer_lens

    from knowlens.capture import generate

    model, model_desc = build_model(args)
    device = torch.device(args.device)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    if args.prompt_len + args.new_tokens > model.cfg.n_ctx:
        print(f"bench_capture: --prompt-len + --new-tokens must be <= the model's context ({model.cfg.n_ctx})",
              file=sys.stderr)
        return 2
    low = 4  # keep clear of special tokens (pad/bos/eos/unk)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(low, model.cfg.d_vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    n = args.new_tokens

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def knowlens_loop(names: list[str]) -> None:
        generate(model, prompts, hooks=names, max_new_tokens=n, stop_at_eos=False)

    def tl_generate() -> Any:
        with torch.inference_mode():
            return model.generate(prompts, max_new_tokens=n, use_past_kv_cache=True, do_sample=False,
                                  stop_at_eos=False, verbose=False)

    wanted = set(hooks)

    def recompute() -> None:
        out = tl_generate()
        with torch.inference_mode():
            model.run_with_cache(out, names_filter=lambda name: name in wanted)

    variants = {
        "none": lambda: knowlens_loop([]),
        "capture": lambda: knowlens_loop(hooks),
        "recompute": recompute,
        "tl_generate": tl_generate,
    }
    names = list(variants)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    load_before = os.getloadavg()
    for fn in variants.values():  # warm-up
        fn()
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order: no position bias
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in wall.items()}
    # ratios within each repeat (variants run back to back), then their median: robust to slow load drift
    paired_overhead = statistics.median(c / z for c, z in zip(wall["capture"], wall["none"]))
    paired_speedup = statistics.median(r / c for r, c in zip(wall["recompute"], wall["capture"]))
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = args.batch * n
    result = {
        "model": model_desc,
        "shape": {k: int(getattr(model.cfg, k)) for k in ("n_layers", "d_model", "d_vocab", "n_ctx")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "3.x"),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "repeats": args.repeats,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "capture_overhead": round(med["capture"] / med["none"], 3),
        "speedup_vs_recompute": round(med["recompute"] / med["capture"], 3),
        "paired_capture_overhead": round(paired_overhead, 3),
        "paired_speedup_vs_recompute": round(paired_speedup, 3),
        "tokens_per_s": {
            "capture": round(tokens / med["capture"], 1),
            "recompute": round(tokens / med["recompute"], 1),
        },
        # process CPU time: less sensitive to other processes on a shared machine (meaningless on a GPU)
        "median_cpu_s": {k: round(v, 4) for k, v in med_cpu.items()},
        "cpu_time_capture_overhead": round(med_cpu["capture"] / med_cpu["none"], 3),
        "cpu_time_speedup_vs_recompute": round(med_cpu["recompute"] / med_cpu["capture"], 3),
        # the fastest repeat of each: the least disturbed by other processes
        "min_s": {k: round(min(v), 4) for k, v in wall.items()},
        "min_capture_overhead": round(min(wall["capture"]) / min(wall["none"]), 3),
        "min_speedup_vs_recompute": round(min(wall["recompute"]) / min(wall["capture"]), 3),
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "wall_s_all": {k: [round(x, 4) for x in v] for k, v in wall.items()},
    }
    print(f"model: {model_desc}; device: {result['device']}; torch {torch.__version__}, "
          f"{result['torch_threads']} threads; batch {args.batch} x ({args.prompt_len} prompt + {n} new) tokens; "
          f"{args.repeats} repeats (order rotated), medians; load average {result['loadavg_before_after']}")
    for name in names:
        print(f"  {name:<12} {med[name] * 1000:9.1f} ms wall ({tokens / med[name]:8.1f} generated tokens/s)"
              f"  {med_cpu[name] * 1000:9.1f} ms CPU")
    print(f"  capture overhead (capture / none)             wall {result['capture_overhead']:.3f}  "
          f"CPU {result['cpu_time_capture_overhead']:.3f}   (target <= 1.10)")
    print(f"  speed-up over recompute (recompute / capture) wall {result['speedup_vs_recompute']:.3f}  "
          f"CPU {result['cpu_time_speedup_vs_recompute']:.3f}   (target >= 1.3)")
    print(f"  median of per-repeat ratios: overhead {result['paired_capture_overhead']:.3f}, "
          f"speed-up {result['paired_speedup_vs_recompute']:.3f}")
    print(f"  fastest repeats: overhead {result['min_capture_overhead']:.3f}, "
          f"speed-up {result['min_speedup_vs_recompute']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
