"""Benchmark (not a timed test): SAE latent statistics streamed over the organism's training distribution.

`knowlens.saes.latent_statistics` reads batches of token rows from a stream (`knowlens.capture.stream_rows` over
the organism's training documents, drawn epoch after epoch as its training drew them) and keeps per-latent
counters only. Each token count runs in a fresh process, so its peak resident memory (ru_maxrss) is its own: if
memory is bounded by the batch, the peak at 1M tokens is the peak at 100k.

    python benchmarks/bench_sae_stream.py                                     # 100k and 1M tokens, blocks.2 SAE
    python benchmarks/bench_sae_stream.py --tokens 20000,100000 --sae organism:blocks.0.hook_resid_post
    python benchmarks/bench_sae_stream.py --device cuda                       # on a lent accelerator

Prints one line per token count and, last, the JSON of the results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default="organism:blocks.2.hook_resid_post", help="an SAE spec as load_sae reads")
    p.add_argument("--tokens", default="100000,1000000", help="comma-separated token counts, one process each")
    p.add_argument("--rows", type=int, default=64, help="rows per batch (default 64)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row (default 64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from knowlens.capture import stream_rows
    from knowlens.organism.corpus import training_text_stream
    from knowlens.organism.store import load_organism, organism_path
    from knowlens.saes import latent_statistics, load_sae

    org = load_organism(organism_path("organism"), device=args.device)
    sae = load_sae(args.sae, org.model)
    sae.to(args.device)

    def texts():  # the organism's training distribution, epoch after epoch, never held whole
        return training_text_stream(org.world, org.corpus)

    batch_tokens = args.rows * args.seq_len
    batches = itertools.islice(stream_rows(org.model, texts(), seq_len=args.seq_len, rows=args.rows),
                               math.ceil(args.child / batch_tokens))  # fmt: skip
    # one batch first, so that "after set-up" includes a batch's working memory and a generated epoch
    latent_statistics(org.model, sae, [next(stream_rows(org.model, texts(), seq_len=args.seq_len, rows=args.rows))])
    setup_rss, setup_peak = rss_mib(), peak_rss_mib()
    start = time.perf_counter()
    stats = latent_statistics(org.model, sae, batches)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_requested": args.child, "tokens_counted": stats.n_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(stats.n_tokens / seconds, 1), "rss_after_setup_mib": round(setup_rss, 1),
            "peak_rss_after_setup_mib": round(setup_peak, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "dead_latents": int(stats.dead.sum()), "d_sae": int(stats.active.numel()),
            "median_frequency": round(float(stats.frequency.median()), 5),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device.startswith("cuda")
            else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    runs = []
    for n in [int(x) for x in args.tokens.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--sae", args.sae, "--rows", str(args.rows),
               "--seq-len", str(args.seq_len), "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(f"{r['tokens_counted']:>9,} tokens: {r['seconds']:7.1f} s, {r['tokens_per_s']:>9,.0f} tokens/s; "
              f"peak RSS {r['peak_rss_mib']:.1f} MiB (after set-up {r['peak_rss_after_setup_mib']:.1f}); "
              f"dead latents {r['dead_latents']} of {r['d_sae']}", flush=True)
    import torch

    result = {"sae": args.sae, "batch": f"{args.rows} rows x {args.seq_len} tokens", "device": args.device,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "threads": args.threads, "torch": torch.__version__, "runs": runs}  # fmt: skip
    if len(runs) >= 2:
        result["peak_rss_ratio_last_first"] = round(runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3)
        grow = [r["peak_rss_mib"] - r["peak_rss_after_setup_mib"] for r in runs]
        result["peak_growth_while_streaming_mib"] = [round(g, 1) for g in grow]
        print(f"peak RSS {runs[-1]['tokens_counted']:,} / {runs[0]['tokens_counted']:,} tokens: "
              f"{result['peak_rss_ratio_last_first']:.3f}; growth while streaming {result['peak_growth_while_streaming_mib']} MiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
