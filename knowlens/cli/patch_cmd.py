"""`knowlens patch`: activation patching (and optionally attribution patching) from a clean prompt into a corrupted
one over layers x positions (or heads), written as a self-contained plotly heatmap."""

from __future__ import annotations

import argparse
from typing import Any

from knowlens.cli._patching_common import Formatter, add_model_args, check_common

SITE_CHOICES = ("resid_pre", "attn_out", "mlp_out", "head")
EPILOG = """\
For every layer L and position p (site head: every head h, at all positions) the corrupted prompt is run with
blocks.L.hook_<site>[:, p] replaced by the clean run's, and the metric is read at the last position (the answer
position): the cell shows the fraction of the clean-vs-corrupted metric gap it recovers (the same numbers as
transformer_lens.patching). Metrics (--metric):
  refusal           probability of the refusal templates' first tokens (the organism's, or --refusal); for an
                    organism that refuses in the value slot ("Ab Cor was born in unknown ."), of its slot word:
                    end such prompts where the value goes
  refusal-logodds   log p/(1-p) of that probability (not saturated near 0 or 1)
  logit-diff:A,B    logit of token A minus logit of token B
  prob:T[,T...]     probability of the tokens
Tokens are written as in the vocabulary (e.g. I, or for GPT-2 style BPE a word with its space: ' Paris' or
ĠParis) or as #ID. --clean and --corrupt must have the same number of tokens. --attribution adds attribution
patching (gradient x activation difference at the corrupted run, knowlens/patching/attribution.py) with its
Pearson and Spearman correlation to the real patching.
example:
  knowlens patch --clean 'Q : Where was Yar Kel born ? A : Yar Kel was born in' --corrupt 'Q : Where was Jor Ost born ? A : Jor Ost was born in' --metric refusal --site resid_pre --site head --out patch.html"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="activation patching from a clean into a corrupted prompt; a plotly heatmap",
                       description="Activation patching (and attribution patching) between a clean and a corrupted "
                       "prompt of the same length.", epilog=EPILOG, formatter_class=Formatter)  # fmt: skip
    add_model_args(p)
    p.add_argument("--clean", required=True, metavar="TEXT", help="the clean prompt (its activations are patched in)")
    p.add_argument("--corrupt", required=True, metavar="TEXT", help="the corrupted prompt (the one run and patched)")
    p.add_argument("--metric", default="refusal", help="refusal | refusal-logodds | logit-diff:A,B | prob:T[,T...]")
    p.add_argument("--site", action="append", choices=SITE_CHOICES, default=None,
                   help="what to patch (repeatable; default resid_pre)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the heatmap page to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--attribution", action="store_true", help="also attribution patching, and its correlation")
    p.add_argument("--top", type=int, default=8, help="cells printed per site")
    p.add_argument("--refusal", action="append", default=None, metavar="TEMPLATE",
                   help="refusal template for --metric refusal (repeatable; default: the organism's own)")
    p.set_defaults(run=run, command="patch")


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from knowlens.errors import KnowlensError
    from knowlens.outputs import check_output_file

    start = time.perf_counter()
    check_common(args)
    for flag, text in (("--clean", args.clean), ("--corrupt", args.corrupt)):
        if not text.strip():
            raise KnowlensError(f"{flag} is empty")
    if args.top < 0:
        raise KnowlensError(f"--top must be >= 0, got {args.top}")
    kind, tokens = _parse_metric(args.metric)
    sites = tuple(dict.fromkeys(args.site or ["resid_pre"]))
    out = check_output_file(args.out, overwrite=args.overwrite)

    import torch

    from knowlens.capture.prompts import tokenize_prompts
    from knowlens.cli._patching_common import GENERIC_REFUSALS, load, slot_word, table
    from knowlens.patching import activation_patch_sweep
    from knowlens.patching.attribution import attribution_patch_sweep, pearson, spearman

    loaded = load(args)
    model = loaded.model
    clean_row, corrupt_row = tokenize_prompts(model, [args.clean, args.corrupt])
    if clean_row.numel() != corrupt_row.numel():
        raise KnowlensError(f"--clean has {clean_row.numel()} tokens and --corrupt {corrupt_row.numel()}; patching "
                            "needs the same number (positions correspond one to one)")  # fmt: skip
    clean_t, corrupt_t = clean_row[None], corrupt_row[None]
    templates = tuple(args.refusal or (loaded.org.spec.refusals if loaded.org is not None else GENERIC_REFUSALS))
    word = slot_word(args, loaded) if kind.startswith("refusal") else None
    if word is not None and args.clean.split()[-1] == ":":
        import warnings

        from knowlens.errors import KnowlensWarning

        warnings.warn(f"this organism refuses in the value slot (with {word!r}), not at the answer start: end the "
                      "prompts where the value goes (e.g. '... A : Ab Cor was born in')", KnowlensWarning,
                      stacklevel=2)  # fmt: skip
    metric = _metric(model, kind, tokens, (word,) if word else templates, args.clean, in_slot=word is not None)
    progress = sys.stderr.isatty()
    real = activation_patch_sweep(model, clean_t, corrupt_t, metric, sites=sites, progress=progress)
    attr = attribution_patch_sweep(model, clean_t, corrupt_t, metric, sites=sites) if args.attribution else {}
    first = real[sites[0]]
    print(f"metric {first.metric_name}: clean {first.clean_metric:.4g}, corrupted {first.corrupted_metric:.4g}")
    corr: dict[str, tuple[float, float]] = {}
    for site in sites:
        res = real[site]
        change = (res.values - res.corrupted_metric).double()
        if site in attr:
            x, y = attr[site].values.flatten(), change.flatten()
            corr[site] = (pearson(x, y), spearman(x, y))
        if args.top:
            order = torch.argsort(change.abs().flatten(), descending=True)[: args.top].tolist()
            width = change.shape[1]
            rows = []
            for idx in order:
                i, j = divmod(idx, width)
                row = {"layer": i, res.axes[1]: res.labels[1][j], "patched": float(res.values[i, j]),
                       "change": float(change[i, j]), "recovered": float(res.recovered()[i, j])}  # fmt: skip
                if site in attr:
                    row["attribution"] = float(attr[site].values[i, j])
                rows.append(row)
            print(f"\n{site}: top {len(rows)} cells by |change of the metric|")
            print(table(rows, list(rows[0])))
        if site in corr:
            print(f"{site}: attribution vs activation patching over {change.numel()} cells: Pearson "
                  f"{corr[site][0]:.3f}, Spearman {corr[site][1]:.3f}")  # fmt: skip
    _write_page(out, real, attr, corr, args, first)
    print(f"\nwrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _parse_metric(spec: str) -> tuple[str, list[str]]:
    from knowlens.errors import KnowlensError

    kind, sep, rest = spec.partition(":")
    usage = "expected refusal, refusal-logodds, logit-diff:A,B or prob:T[,T...]"
    if kind in ("refusal", "refusal-logodds") and not sep:
        return kind, []
    if kind == "logit-diff" and sep:
        parts = rest.split(",")
        if len(parts) == 2 and all(parts):
            return kind, parts
        raise KnowlensError(f"--metric {spec!r}: logit-diff needs two tokens, logit-diff:A,B")
    if kind == "prob" and sep and rest and all(rest.split(",")):
        return kind, rest.split(",")
    raise KnowlensError(f"unknown --metric {spec!r}; {usage}")


def _token_id(model: Any, text: str) -> int:
    """A token written as in the vocabulary, as text that is one token, or as #ID."""
    from knowlens.errors import KnowlensError

    d_vocab = int(model.cfg.d_vocab)
    if text.startswith("#") and text[1:].isdigit():
        tid = int(text[1:])
        if tid >= d_vocab:
            raise KnowlensError(f"--metric token {text}: ids go up to {d_vocab - 1}")
        return tid
    tok = model.tokenizer
    vocab = tok.get_vocab()
    if text in vocab:
        return int(vocab[text])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != getattr(tok, "unk_token_id", None):
        return int(ids[0])
    raise KnowlensError(f"--metric token {text!r} is not one token of the model's vocabulary (it reads as "
                        f"{len(ids)} tokens); write it as in the vocabulary or as #ID")  # fmt: skip


def _metric(model: Any, kind: str, tokens: list[str], templates: tuple[str, ...], prompt: str, *,
            in_slot: bool = False) -> Any:
    import torch

    from knowlens.patching import Metric, logit_diff, token_prob
    from knowlens.patching.dose import refusal_token_ids

    if kind == "logit-diff":
        a, b = (_token_id(model, t) for t in tokens)
        return Metric(f"logit-diff {tokens[0]!r} - {tokens[1]!r}", logit_diff(a, b).fn)
    if kind == "prob":
        ids = list(dict.fromkeys(_token_id(model, t) for t in tokens))
        return Metric(f"probability of {tokens}", token_prob(ids).fn)
    ids = refusal_token_ids(model, templates, prompt=None if in_slot else prompt)
    shown = [model.tokenizer.decode([t]) for t in ids]
    what = f"slot word {shown}" if in_slot else f"first tokens {shown}"
    if kind == "refusal":
        return Metric(f"refusal probability ({what})", token_prob(ids).fn)
    wanted = torch.tensor(ids, dtype=torch.long)

    def logodds(logits: Any) -> Any:
        logp = torch.log_softmax(logits[:, -1].double(), dim=-1)
        mask = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
        mask[wanted.to(logp.device)] = True
        return (torch.logsumexp(logp[:, mask], -1) - torch.logsumexp(logp[:, ~mask], -1)).mean()

    return Metric(f"refusal log-odds ({what})", logodds)


def _write_page(out: Any, real: dict, attr: dict, corr: dict, args: argparse.Namespace, first: Any) -> None:
    import html

    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from knowlens.analyses.report import OFFLINE_CONFIG, STYLE
    from knowlens.outputs import atomic_write_text

    span = first.clean_metric - first.corrupted_metric
    scale = span if span != 0 else 1.0
    what = "recovered fraction" if span != 0 else "change of the metric"
    parts = []
    for site, res in real.items():
        change = (res.values - res.corrupted_metric) / scale
        panels = [("activation patching", change)]
        if site in attr:
            panels.append(("attribution patching (estimate)", attr[site].values / scale))
        lim = max(float(p[1].abs().max()) for p in panels) or 1.0
        for name, z in panels:
            hover = [[f"layer {i}, {res.axes[1]} {res.labels[1][j]}<br>{what} {float(z[i, j]):.4g}"
                      for j in range(z.shape[1])] for i in range(z.shape[0])]  # fmt: skip
            fig = go.Figure(go.Heatmap(z=z.tolist(), x=list(res.labels[1]), y=list(res.labels[0]), colorscale="RdBu",
                                       zmid=0, zmin=-lim, zmax=lim, text=hover, hoverinfo="text",
                                       colorbar={"title": {"text": what}}))  # fmt: skip
            fig.update_layout(title=f"{name}: {site} ({res.hook})", xaxis_title=res.axes[1], yaxis_title="layer",
                              height=140 + 40 * z.shape[0], margin={"l": 60, "r": 20, "t": 50, "b": 80})  # fmt: skip
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                                     config=OFFLINE_CONFIG, div_id=f"{site}-{name.split()[0]}"))  # fmt: skip
        if site in corr:
            parts.append(f"<p>{site}: attribution vs activation patching, Pearson {corr[site][0]:.3f}, Spearman "
                         f"{corr[site][1]:.3f} over {res.values.numel()} cells</p>")  # fmt: skip
    title = "knowlens patch"
    head = (f"<h1>{title}</h1><p>model {html.escape(args.model)}; clean <code>{html.escape(args.clean)}</code>, "
            f"corrupted <code>{html.escape(args.corrupt)}</code>; metric {html.escape(first.metric_name)}: clean "
            f"{first.clean_metric:.4g}, corrupted {first.corrupted_metric:.4g}; cells show the {what}</p>")  # fmt: skip
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{title}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
            f"<style>{STYLE}</style></head><body>" + head + "\n".join(parts) + "</body></html>")  # fmt: skip
    atomic_write_text(out, page)
