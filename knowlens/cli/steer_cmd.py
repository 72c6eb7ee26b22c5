"""`knowlens steer`: generate with a direction added at a hook (alpha in units of the residual norm), next to the
baseline, optionally with a random direction of the same norm as a control."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from knowlens.cli._patching_common import (
    Formatter,
    add_label_args,
    add_model_args,
    add_prompt_args,
    check_common,
    check_prompt_args,
)

EPILOG = """\
Directions (--direction):
  latent:N        the decoder row W_dec[N] of --sae (hook: the SAE's, unless --hook)
  features:FILE   the mean of the decoder rows of a saved FeatureSet's latents (--top K: its first K; hook: the set's)
  probe:FILE      a knowlens probe over the residual (its card checked against the model): its weight on the raw
                  activation (weight / std), the direction that raises its logit; hook: the probe's
  file:FILE       a .safetensors file: its tensor 'direction' (e.g. features surprise's surprise.safetensors), else
                  'weight' (a probe), else its only tensor; hook: --hook, else the file's metadata 'hook' or the
                  'hook' of the FILE.json card beside it
--unit resid_norm (default): every position t gets x_t + alpha * ||x_t|| * d/||d|| (alpha = 2 adds twice the
activation's own norm there); --unit raw: x_t + alpha * d. Steering acts on the prompt and on every generated token
(greedy, KV-cached). --random-control runs a seeded random direction of the same norm at the same alphas. Printed:
per prompt the refusal probability (first refusal tokens at the answer position; for an organism that refuses
in the value slot, "Ab Cor was born in unknown .", the slot word's highest probability over the answer), entropy,
top-1 probability and the answer; over all prompts the refusal rate of each run and its change in points. Token
labels: each run's answer is labelled by the probes (--probe, else those shipped with the model) reading that run's
own (steered) activations: unreliable tokens in [brackets], the answer's least reliable p_reliable and the share of
unreliable tokens. --out writes the dose-response figure (self-contained HTML).
examples:
  knowlens steer --sae organism:blocks.2.hook_resid_post --direction latent:117 --alpha 2 --prompt 'Q : Who or what is Mor Ard ? A :'
  knowlens steer --direction features:feats/entity_known.slot.unknown.safetensors --alpha 1 --alpha 2 --split known --n 32 --random-control"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="generate with a direction added at a hook, next to the baseline",
                       description="Steer a model along a direction while generating and compare with the baseline.",
                       epilog=EPILOG, formatter_class=Formatter)  # fmt: skip
    add_model_args(p)
    p.add_argument("--direction", required=True, help="latent:N | features:FILE | probe:FILE | file:FILE.safetensors")
    p.add_argument("--sae", default=None, help="the SAE for latent:N ('release:sae_id', a folder or organism:<hook>)")
    p.add_argument("--hook", default=None, help="hook to steer at, if not the direction's own")
    p.add_argument("--alpha", type=float, action="append", required=True, metavar="A",
                   help="steering coefficient (repeatable: a dose-response)")
    p.add_argument("--unit", choices=["resid_norm", "raw"], default="resid_norm", help="what alpha counts in")
    p.add_argument("--top", type=int, default=None, help="features:FILE: only its first K latents")
    p.add_argument("--random-control", action="store_true", help="also steer along a random direction of the same norm")
    p.add_argument("--out", default=None, metavar="FILE.html", help="write the dose-response figure here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_prompt_args(p)
    add_label_args(p)
    p.set_defaults(run=run, command="steer")


def run(args: argparse.Namespace) -> int:
    import math
    import time

    from knowlens.cli._patching_common import (
        LABEL_KEYS,
        check_prompts_fit,
        label_runner,
        labels_line,
        load,
        points,
        prompts_for,
        refusal_measures,
        side_by_side,
        table,
    )
    from knowlens.errors import KnowlensError
    from knowlens.outputs import check_output_file

    start = time.perf_counter()
    check_common(args)
    check_prompt_args(args)
    kind, _, value = args.direction.partition(":")
    if kind not in ("latent", "features", "probe", "file") or not value:
        raise KnowlensError(f"--direction {args.direction!r}: expected latent:N, features:FILE, probe:FILE or "
                            "file:FILE.safetensors")  # fmt: skip
    if kind == "latent" and args.sae is None:
        raise KnowlensError("--direction latent:N needs --sae")
    if kind == "latent" and not value.isdigit():
        raise KnowlensError(f"--direction {args.direction!r}: N must be a latent number >= 0")
    if args.top is not None and (args.top < 1 or kind != "features"):
        raise KnowlensError("--top must be >= 1 and goes with --direction features:FILE")
    if not all(math.isfinite(a) for a in args.alpha):
        raise KnowlensError(f"--alpha must be finite, got {args.alpha}")
    out = check_output_file(args.out, overwrite=args.overwrite) if args.out is not None else None

    from knowlens.capture.hooks import validate_hook_names
    from knowlens.patching.dose import (
        dose_response,
        measure_generations,
        summarise,
    )

    loaded = load(args, sae=args.sae if kind == "latent" else None)
    model = loaded.model
    direction, hook, source = _direction(kind, value, args, loaded)
    validate_hook_names(model, [hook])
    prompts, _ = prompts_for(args, loaded)
    check_prompts_fit(model, prompts, args.max_new_tokens)
    _check_width(model, hook, direction, prompts[0])
    refusal = refusal_measures(args, loaded, prompts[0])
    per_run, labelled_by = label_runner(args, loaded, prompts)
    opts = {"max_new_tokens": args.max_new_tokens, "per_run": per_run, **refusal}
    base = measure_generations(model, prompts, **opts)
    dose = dose_response(model, prompts, direction, hook, args.alpha, unit=args.unit,
                         control="random" if args.random_control else None, seed=args.seed, **opts)  # fmt: skip

    print(f"steering at {hook} along {source} (norm {float(direction.norm()):.3g}), alpha in units of "
          f"{'the residual norm at each position' if args.unit == 'resid_norm' else 'the raw direction'}; every "
          "position, every generated token\n")  # fmt: skip
    runs = [(f"{'steered' if r['direction'] == 'target' else 'random'} alpha={r['alpha']:g}", r["direction"],
             r["alpha"]) for r in dose.rows]  # fmt: skip
    for i in range(min(args.show, len(prompts))):
        cols = [("baseline", base[i])]
        for title, name, alpha in runs:
            hit = next(p for p in dose.per_prompt if p["direction"] == name and p["alpha"] == alpha and p["prompt"] == i)
            cols.append((title, hit))
        print(side_by_side(prompts[i], cols) + "\n")
    b = {"direction": "none", "alpha": 0.0, **summarise(base)}
    print(f"over {len(prompts)} prompt{'s' if len(prompts) != 1 else ''}:")
    print(table([b, *dose.rows], ["direction", "alpha", "refusal_rate", "refusal_prob", "entropy_answer", "top1_answer",
                                  "entropy_mean", *(LABEL_KEYS if labelled_by else [])]))  # fmt: skip
    line = labels_line([b, *dose.rows], labelled_by)
    if line:
        print(line)
    changes = [f"{r['direction']} alpha={r['alpha']:g} {points(r['refusal_rate'], b['refusal_rate'])}" for r in dose.rows]
    print("refusal rate against the baseline: " + "; ".join(changes))
    if out is not None:
        _write_figure(dose, out, f"knowlens steer: {source} at {hook}")
        print(f"wrote {out}")
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


def _direction(kind: str, value: str, args: argparse.Namespace, loaded: Any) -> tuple[Any, str, str]:
    """(direction, hook, description) for --direction."""
    import torch

    from knowlens.errors import KnowlensError

    if kind == "latent":
        from knowlens.patching import latent_direction

        sae = loaded.sae
        latent = int(value)
        d_sae = int(sae.cfg.d_sae)
        if latent >= d_sae:
            raise KnowlensError(f"--direction latent:{latent}: the SAE has latents 0..{d_sae - 1}")
        return latent_direction(sae, latent), args.hook or sae.cfg.metadata.hook_name, f"latent {latent} of {args.sae}"
    if kind == "features":
        from knowlens.saes import FeatureSet

        fs = FeatureSet.load(value, model=loaded.model)
        rows = fs.decoder[: args.top] if args.top is not None else fs.decoder
        if rows.shape[0] == 0:
            raise KnowlensError(f"--direction features:{value}: the feature set has no latents")
        shown = fs.latents[: rows.shape[0]].tolist()
        return rows.float().mean(0), args.hook or fs.hook, f"{fs.name} latents {shown} (mean decoder row)"
    if kind == "probe":
        from knowlens.probes import load_probe

        file = Path(value).with_suffix(".safetensors") if value.endswith(".json") else Path(value)
        if not file.is_file():
            raise KnowlensError(f"--direction probe:{value}: no such file")
        probe = load_probe(file, model=loaded.model)
        if probe.input.kind != "residual":
            raise KnowlensError(f"--direction probe:{value}: the probe reads {probe.input.kind.replace('_', ' ')}, "
                                "not the residual; its weights are no direction at the hook")  # fmt: skip
        raw = (probe.weight.double() / probe.std.double()).float()
        return raw, args.hook or probe.hook, f"probe {probe.name} (weight / std)"
    path = Path(value)
    tensors, meta = _read_safetensors(path)
    for key in ("direction", "weight"):
        if key in tensors:
            t = tensors[key]
            break
    else:
        if len(tensors) != 1:
            raise KnowlensError(f"--direction file:{value}: no 'direction' or 'weight' tensor and not exactly one tensor "
                                f"({', '.join(sorted(tensors)) or 'none'})")  # fmt: skip
        key, t = next(iter(tensors.items()))
    t = t.squeeze(0) if t.ndim == 2 and t.shape[0] == 1 else t
    if t.ndim != 1 or not t.is_floating_point():
        raise KnowlensError(f"--direction file:{value}: tensor {key!r} must be a 1-D float vector, got "
                            f"{t.dtype} {tuple(t.shape)}")  # fmt: skip
    hook = args.hook or meta.get("hook") or meta.get("hook_name") or _card_hook(path)
    if not hook:
        raise KnowlensError(f"--direction file:{value}: the file names no hook; give --hook")
    return t.to(torch.float32), str(hook), f"{key} of {path}"


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    from knowlens.errors import KnowlensError

    if not path.is_file():
        raise KnowlensError(f"--direction file:{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KnowlensError(f"--direction file:{path}: not a readable safetensors file ({first})") from None
    return tensors, meta


def _card_hook(path: Path) -> str | None:
    import json

    card = path.with_suffix(".json")
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    hook = data.get("hook") or data.get("hook_name") if isinstance(data, dict) else None
    return hook if isinstance(hook, str) else None


def _check_width(model: Any, hook: str, direction: Any, prompt: str) -> None:
    """Refuse a direction whose size differs from the hook's per-token width (one short forward to see it)."""
    import math

    import torch

    from knowlens.capture.hooks import is_query_key_hook, stop_layer_for
    from knowlens.errors import KnowlensError

    if is_query_key_hook(hook):
        raise KnowlensError(f"--hook {hook}: not a per-token activation (its columns are keys); use e.g. a resid hook")
    seen: dict[str, Any] = {}

    def keep(x: Any, hook: Any) -> None:
        seen["shape"] = tuple(x.shape)

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, keep)]):
        model(model.to_tokens(prompt), stop_at_layer=stop_layer_for(model, [hook]))
    width = math.prod(seen["shape"][2:])
    if direction.numel() != width:
        raise KnowlensError(f"the direction has {direction.numel()} elements, {hook} has {width} per token")


def _write_figure(dose: Any, path: Path, title: str) -> None:
    import html

    from plotly.offline import get_plotlyjs

    from knowlens.analyses.report import OFFLINE_CONFIG, STYLE
    from knowlens.outputs import atomic_write_text

    fig = dose.figure(title=title)
    div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=OFFLINE_CONFIG,
                      div_id="dose")  # fmt: skip
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{div}</body></html>")  # fmt: skip
    atomic_write_text(path, page)
