"""Benchmark (not a timed test): wall time of the CLI verbs whose issues set a time target, as a user runs them.

Each command runs in a fresh process (``python -m knowlens ...``, so Python start-up, imports and model loading are
included), ``--repeats`` times; medians and the fastest run are printed beside the target.

    python benchmarks/bench_cli.py
    python benchmarks/bench_cli.py --repeats 5

``label`` (target < 30 s after set-up): one prompt on the shipped organism with its shipped probe, JSONL and HTML
written. ``ablate`` (target < 20 s after set-up): the shipped blocks.2 SAE, two latents, two prompts.
The last line printed is the JSON of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(tmp: Path) -> dict[str, tuple[list[str], float]]:
    return {
        "label": (["label", "--prompt", "Q : Tell me about Mor Tav . A :", "--out", str(tmp / "labels.jsonl"),
                   "--html", str(tmp / "labels.html"), "--overwrite", "--no-progress", "--no-color"], 30.0),
        "ablate": (["ablate", "--sae", "organism:blocks.2.hook_resid_post", "--latent", "117", "--latent", "9",
                    "--prompt", "Q : Who or what is Mor Ard ? A :", "--prompt", "Q : Where was Jor Ost born ? A :"],
                   20.0),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = {"cpu_count": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2), "verbs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for verb, (cmd, target) in commands(Path(tmp)).items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "knowlens", *cmd], capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - start)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return done.returncode
            med = statistics.median(times)
            result["verbs"][verb] = {"median_s": round(med, 2), "min_s": round(min(times), 2), "target_s": target,
                                     "met": med < target, "runs_s": [round(t, 2) for t in times]}  # fmt: skip
            print(f"knowlens {verb:<7} median {med:5.1f} s, fastest {min(times):5.1f} s (target < {target:g} s, "
                  f"{'met' if med < target else 'NOT met'}); {args.repeats} runs, each a fresh process", flush=True)
    result["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
