"""`knowlens ablate`: generate with SAE latents zeroed (or set, or scaled), keeping the SAE's error term, and print
the baseline and the ablated generation side by side."""

from __future__ import annotations

import argparse

from knowlens.cli._patching_common import (
    Formatter,
    add_label_args,
    add_model_args,
    add_prompt_args,
    check_common,
    check_prompt_args,
)

EPILOG = """\
At the SAE's hook every position (prompt and each generated token) becomes x + decode(f') - decode(f), f = encode(x)
and f' = f with the chosen latents set to --value (default 0) or multiplied by --scale: the SAE's error term is kept,
so nothing but the chosen latents changes. Generation is greedy and KV-cached. Per prompt: the refusal probability
(the probability of the refusal templates' first tokens at the answer position, i.e. after the prompt's last token;
for an organism that refuses in the value slot, "Ab Cor was born in unknown .", the slot word's highest probability
over the answer), the entropy and top-1 probability at the answer position, the mean entropy over the generated
tokens, and whether the answer is a refusal (it starts with a refusal template, or holds the slot word). With several
prompts (or --split), the refusal rate of both runs. Token labels: each run's answer is labelled by the probes
(--probe, else those shipped with the model) reading the run's own activations, the ablated ones included;
unreliable tokens in [brackets], the answer's least reliable p_reliable and the share of unreliable tokens.
examples:
  knowlens ablate --sae organism:blocks.2.hook_resid_post --latent 117 --latent 9 --prompt 'Q : Who or what is Mor Ard ? A :'
  knowlens ablate --sae organism:blocks.3.hook_resid_post --features feats/entity_known.slot.unknown.safetensors --split unknown --n 32"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="generate with SAE latents ablated (error term kept), next to the baseline",
                       description="Ablate SAE latents while generating and compare with the unablated model.",
                       epilog=EPILOG, formatter_class=Formatter)  # fmt: skip
    add_model_args(p)
    p.add_argument("--sae", required=True, help="'release:sae_id', an SAE folder (sae-lens format) or organism:<hook>")
    p.add_argument("--latent", type=int, action="append", default=None, metavar="N", help="latent to ablate (repeatable)")
    p.add_argument("--features", default=None, metavar="FILE",
                   help="a saved FeatureSet (knowlens features ...): ablate its latents (with --latent: both)")
    p.add_argument("--top", type=int, default=None, help="only the first K latents of --features")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--value", type=float, default=None, help="set the latents to this value (default 0)")
    how.add_argument("--scale", type=float, default=None, help="multiply the latents by this factor instead")
    add_prompt_args(p)
    add_label_args(p)
    p.set_defaults(run=run, command="ablate")


def run(args: argparse.Namespace) -> int:
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

    start = time.perf_counter()
    check_common(args)
    check_prompt_args(args)
    if not args.latent and args.features is None:
        raise KnowlensError("give --latent N (repeatable) or --features FILE")
    if args.top is not None and (args.top < 1 or args.features is None):
        raise KnowlensError("--top must be >= 1 and goes with --features")
    for value, flag in ((args.value, "--value"), (args.scale, "--scale")):
        if value is not None and not _finite(value):
            raise KnowlensError(f"{flag} must be a finite number, got {value}")

    from knowlens.patching import ablate_latents
    from knowlens.patching.dose import measure_generations, summarise

    loaded = load(args, sae=args.sae)
    model, sae = loaded.model, loaded.sae
    latents = list(args.latent or [])
    if args.features is not None:
        latents += _feature_latents(args.features, model, sae, args.top)
    latents = list(dict.fromkeys(latents))
    kwargs = {"scale": args.scale} if args.scale is not None else {"value": args.value}
    edit = ablate_latents(sae, latents, **kwargs)
    prompts, _ = prompts_for(args, loaded)
    check_prompts_fit(model, prompts, args.max_new_tokens)
    refusal = refusal_measures(args, loaded, prompts[0])
    ids = refusal["refusal_ids"]
    per_run, labelled_by = label_runner(args, loaded, prompts)
    opts = {"max_new_tokens": args.max_new_tokens, "per_run": per_run, **refusal}
    base = measure_generations(model, prompts, **opts)
    ablated = measure_generations(model, prompts, edit, **opts)

    change = f"scaled by {args.scale:g}" if args.scale is not None else f"set to {args.value or 0.0:g}"
    shown = ", ".join(str(i) for i in latents[:12]) + (f" ... ({len(latents)} latents)" if len(latents) > 12 else "")
    print(f"ablating latent{'s' if len(latents) != 1 else ''} {shown} of SAE {args.sae} at "
          f"{edit.hook_name}: {change}, error term kept (every position, every generated token)\n")  # fmt: skip
    title = f"ablated ({change})"
    for i in range(min(args.show, len(prompts))):
        print(side_by_side(prompts[i], [("baseline", base[i]), (title, ablated[i])]) + "\n")
    rows = [{"run": "baseline", **summarise(base)}, {"run": "ablated", **summarise(ablated)}]
    print(f"over {len(prompts)} prompt{'s' if len(prompts) != 1 else ''}:")
    print(table(rows, ["run", "refusal_rate", "refusal_prob", "entropy_answer", "top1_answer", "entropy_mean",
                       *(LABEL_KEYS if labelled_by else [])]))  # fmt: skip
    line = labels_line(rows, labelled_by)
    if line:
        print(line)
    print(f"refusal rate {points(rows[1]['refusal_rate'], rows[0]['refusal_rate'])}; refusal tokens "
          f"{[model.tokenizer.decode([t]) for t in ids]}; {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def _feature_latents(path: str, model, sae, top: int | None) -> list[int]:  # noqa: ANN001 - model/SAE objects
    from knowlens.errors import KnowlensError
    from knowlens.saes import FeatureSet

    fs = FeatureSet.load(path, model=model)
    hook = sae.cfg.metadata.hook_name
    if fs.hook != hook:
        raise KnowlensError(f"--features {path}: its latents are of an SAE at {fs.hook}, --sae reads {hook}")
    d_sae = int(sae.cfg.d_sae)
    sizes = {int(v.numel()) for v in fs.per_latent.values()}
    if sizes and sizes != {d_sae}:
        raise KnowlensError(f"--features {path}: made with an SAE of {sizes.pop()} latents, --sae has {d_sae}")
    latents = fs.latents.tolist()
    return latents[:top] if top is not None else latents


def _finite(x: float) -> bool:
    import math

    return math.isfinite(x)
