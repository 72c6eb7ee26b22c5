"""Exports of graded answers: `labels.jsonl` (one record per generation) and a self-contained plotly report."""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from knowlens.analyses.answers import Answer
from knowlens.outputs import atomic_write_text

CLASS_CODES = {"correct": 0, "other": 1, "refusal": 2, "hallucinated": 3}
CLASS_COLOURS = ["#2ca02c", "#d9d9d9", "#1f77b4", "#d62728"]
# plotly.js config: no plotly.com logo link, no cloud button, no TeX typesetting, no topojson CDN.
OFFLINE_CONFIG = {
    "displaylogo": False,
    "showSendToCloud": False,
    "typesetMath": False,
    "topojsonURL": "",
}
STYLE = (
    "body{font-family:sans-serif;margin:1em 2em}"
    ".class-legend{display:flex;flex-wrap:wrap;gap:.4em 1.4em;margin:.2em 0 .4em;font-size:14px}"
    ".class-legend .item{display:inline-flex;align-items:center;gap:.4em}"
    ".class-legend .swatch{display:inline-block;width:1.1em;height:1.1em;border:1px solid #888}"
)
MEDIAN_MAX_DECIMALS = 7  # float32 resolution near 1 (1 - 2**-23 = 0.99999988)


def token_reliability(answers: Sequence[Answer], probe: Any) -> list[list[float]]:
    """Per answer, ``p_reliable`` of each generated token: ``probe`` (a `knowlens.probes.LoadedProbe` whose position
    rule is ``before_token``) on the activation at the position that predicted the token, from `answer_items`'s
    captured activations (answered with ``hooks=(probe.hook,)``): the same figure `label_generation` computes."""
    from knowlens.errors import KnowlensError

    if probe.position != "before_token":
        raise KnowlensError(f"probe {probe.name} reads position {probe.position!r}; token_reliability reads before_token")
    out = []
    for a in answers:
        if a.activations is None or probe.hook not in a.activations or a.prompt_tokens is None:
            raise KnowlensError(f"answers were not captured at {probe.hook}: answer_items(..., hooks=({probe.hook!r},))")
        n = len(a.prompt_tokens)
        rows = a.activations[probe.hook][n - 1 : n - 1 + len(a.tokens)]
        out.append([round(float(p), 5) for p in probe.score(rows)])
    return out


def answer_record(a: Answer, reliability: Sequence[float] | None = None, threshold: float = 0.5) -> dict[str, Any]:
    tokens = [
        {"text": t, "class": c, "logprob": round(lp, 5) + 0.0, "entropy": round(h, 5) + 0.0, "top1_prob": round(p, 5)}
        for t, c, lp, h, p in zip(a.tokens, a.grade.classes, a.logprob, a.entropy, a.top1)
    ]
    if reliability is not None:
        for t, r in zip(tokens, reliability):
            t["p_reliable"] = r
            t["label"] = "reliable" if r >= threshold else "unreliable"
    return {
        "prompt": a.item.prompt,
        "entity": a.item.entity,
        "entity_type": a.item.type,
        "split": a.item.split,
        "kind": a.item.kind,
        "attribute": a.item.attribute,
        "withheld": a.item.withheld,
        "generated": a.text,
        "verdict": a.grade.verdict,
        "tokens": tokens,
    }


def write_labels(
    answers: Sequence[Answer], path: str | Path, *, model: dict[str, str] | None = None,
    reliability: Sequence[Sequence[float]] | None = None, threshold: float = 0.5,
) -> Path:  # fmt: skip
    """One JSON record per answer (docs/formats.md); ``model`` (name and fingerprints) goes into each record;
    ``reliability`` (per answer, `token_reliability`) adds ``p_reliable`` and ``label`` (by ``threshold``) per token."""
    extra = {"model": model} if model is not None else {}
    rel: Sequence[Sequence[float] | None] = reliability if reliability is not None else [None] * len(answers)
    return atomic_write_text(Path(path), "".join(json.dumps({**answer_record(a, r, threshold), **extra}) + "\n"
                                                  for a, r in zip(answers, rel)))  # fmt: skip


def write_report(
    answers: Sequence[Answer], path: str | Path, *, title: str = "knowlens demo", model: dict[str, str] | None = None,
    reliability: Sequence[Sequence[float]] | None = None, probe_name: str = "",
) -> Path:  # fmt: skip
    """One self-contained HTML file (plotly.js inlined; it fetches nothing: no CDN, MathJax, fonts or map
    tiles): answers as rows of tokens, coloured by top-1 probability (continuous colour bar) and by grader
    class (categorical legend of swatches); hovering a token shows its class, log-probability, entropy and
    top-1 probability."""
    import plotly.graph_objects as go

    rows = list(answers)
    width = max(len(a.tokens) for a in rows)
    labels = [f"{a.item.split} · {_short(a.item.prompt[4:-4])}" for a in rows]
    # escaped: plotly reads "<eos>" as a tag and would drop it
    text = [[*map(html.escape, a.tokens), *[""] * (width - len(a.tokens))] for a in rows]
    top1 = [[*a.top1, *[None] * (width - len(a.tokens))] for a in rows]
    cls = [[CLASS_CODES[c] for c in a.grade.classes] + [None] * (width - len(a.tokens)) for a in rows]
    rel = [list(r) for r in reliability] if reliability is not None else None
    custom = [
        [
            [a.grade.classes[i], f"{a.logprob[i]:.3f}", f"{a.entropy[i]:.3f}", f"{a.top1[i]:.3f}",
             f"{rel[r][i]:.3f}" if rel is not None else "n/a"]
            if i < len(a.tokens)
            else ["", "", "", "", ""]
            for i in range(width)
        ]
        for r, a in enumerate(rows)
    ]  # fmt: skip
    hover = "<b>%{text}</b><br>class: %{customdata[0]}<br>log p: %{customdata[1]}<br>entropy: %{customdata[2]}<br>top-1 p: %{customdata[3]}<br>p_reliable: %{customdata[4]}<extra>%{y}</extra>"
    height = 120 + 22 * len(rows)

    def grid(z, colorscale, zmin, zmax, colorbar, div_id) -> str:
        fig = go.Figure(
            go.Heatmap(
                z=z, text=text, customdata=custom, texttemplate="%{text}", textfont={"size": 10},
                hovertemplate=hover, colorscale=colorscale, zmin=zmin, zmax=zmax, colorbar=colorbar,
                showscale=colorbar is not None, xgap=1, ygap=1, y=labels,
            )
        )  # fmt: skip
        fig.update_layout(
            height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, yaxis={"autorange": "reversed"}
        )
        fig.update_xaxes(showticklabels=False)
        return fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            config=OFFLINE_CONFIG,
            div_id=div_id,
        )

    counts = Counter(c for a in rows for c in a.grade.classes)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *(
            [f"<p>model {html.escape(model['name'])}: fingerprint <code>{html.escape(model['fingerprint'])}</code>, "
             f"shape <code>{html.escape(model['shape_fingerprint'])}</code></p>"]
            if model
            else []
        ),
        f"<pre>{html.escape(summary_text(rows))}</pre>",
        *(
            [f"<h2>Tokens coloured by p_reliable (knowlens labels, probe {html.escape(probe_name)})</h2>",
             grid([[*r, *[None] * (width - len(r))] for r in rel], "RdYlGn", 0.0, 1.0, {"title": "p_reliable"},
                  "p-reliable-heatmap")]
            if rel is not None
            else []
        ),
        "<h2>Tokens coloured by top-1 probability (stated confidence)</h2>",
        grid(top1, "RdYlGn", 0.0, 1.0, {"title": "top-1 p"}, "top1-heatmap"),
        "<h2>Tokens coloured by ground truth (grader class)</h2>",
        _class_legend(counts),
        grid(cls, _stepped_scale(CLASS_COLOURS), -0.5, len(CLASS_CODES) - 0.5, None, "class-heatmap"),
    ]
    from plotly.offline import get_plotlyjs

    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
        f"<style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    return atomic_write_text(Path(path), page)


def summary(answers: Sequence[Answer]) -> dict[str, Any]:
    by_split: dict[str, dict[str, int]] = {}
    for a in answers:
        by_split.setdefault(a.item.split, Counter())[a.grade.verdict] += 1  # type: ignore[index]
    top1_by_class: dict[str, float] = {}
    for c in CLASS_CODES:
        vals = [p for a in answers for k, p in zip(a.grade.classes, a.top1) if k == c]
        if vals:
            top1_by_class[c] = round(statistics.median(vals), MEDIAN_MAX_DECIMALS)
    return {
        "answers": len(answers),
        "tokens": sum(len(a.tokens) for a in answers),
        "verdicts_by_split": {k: dict(v) for k, v in by_split.items()},
        "token_classes": dict(Counter(c for a in answers for c in a.grade.classes)),
        "median_top1_by_class": top1_by_class,
    }


def summary_text(answers: Sequence[Answer]) -> str:
    s = summary(answers)
    lines = [f"{s['answers']} answers, {s['tokens']} generated tokens"]
    for split, v in s["verdicts_by_split"].items():
        lines.append(f"  {split:<8} " + ", ".join(f"{k} {n}" for k, n in sorted(v.items())))
    lines.append("token classes: " + ", ".join(f"{k} {n}" for k, n in sorted(s["token_classes"].items())))
    medians = s["median_top1_by_class"]
    d = _decimals(list(medians.values()))
    lines.append(
        "median top-1 probability by class: " + ", ".join(f"{k} {v:.{d}f}" for k, v in medians.items())
    )
    return "\n".join(lines)


def labels_text(answers: Sequence[Answer], reliability: Sequence[Sequence[float]], threshold: float, name: str) -> str:
    """One line: how many tokens the labels flag, and how p_reliable and top-1 probability separate the grader's
    hallucinated tokens from its correct ones (AUROC, pooled over these answers)."""
    import torch

    from knowlens.probes import auroc

    flagged = sum(r < threshold for rel in reliability for r in rel)
    total = sum(len(rel) for rel in reliability)
    pairs = [(r, p, c == "hallucinated") for a, rel in zip(answers, reliability)
             for r, p, c in zip(rel, a.top1, a.grade.classes) if c in ("correct", "hallucinated")]  # fmt: skip
    line = f"labels (probe {name}, unreliable below p_reliable {threshold:.3f}): {flagged} of {total} tokens unreliable"
    n_hal = sum(h for _, _, h in pairs)
    if 0 < n_hal < len(pairs):
        y = torch.tensor([h for _, _, h in pairs])
        rel_auc = auroc(-torch.tensor([r for r, _, _ in pairs], dtype=torch.float64), y)
        top_auc = auroc(-torch.tensor([p for _, p, _ in pairs], dtype=torch.float64), y)
        line += (f"; hallucinated vs correct tokens ({n_hal} / {len(pairs) - n_hal}): AUROC of p_reliable "
                 f"{rel_auc:.3f}, of top-1 probability {top_auc:.3f}")  # fmt: skip
    return line


def _decimals(values: Sequence[float], lo: int = 2, hi: int = MEDIAN_MAX_DECIMALS) -> int:
    """The fewest decimals (lo..hi) at which different values print differently and no value short of 1 (or
    above 0) prints as 1 (or 0): medians of a confident model crowd against 1.00."""
    for d in range(lo, hi):
        shown = {v: f"{v:.{d}f}" for v in values}
        one, zero = f"{1:.{d}f}", f"{0:.{d}f}"
        if (
            len(set(shown.values())) == len(shown)
            and all(t != one for v, t in shown.items() if v < 1)
            and all(t != zero for v, t in shown.items() if v > 0)
        ):
            return d
    return hi


def _stepped_scale(colours: Sequence[str]) -> list[list[Any]]:
    """A colour scale of flat bands, one per class code (with zmin/zmax at -0.5 / n - 0.5): no blends."""
    n = len(colours)
    return [[(i + j) / n, c] for i, c in enumerate(colours) for j in (0, 1)]


def _class_legend(counts: Counter[str]) -> str:
    items = "".join(
        f"<span class='item' data-class='{k}'><span class='swatch' style='background:{c}'></span>"
        f"{k} <small>({counts.get(k, 0)} tokens)</small></span>"
        for k, c in zip(CLASS_CODES, CLASS_COLOURS)
    )
    return f"<div class='class-legend' aria-label='grader class legend'>{items}</div>"


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
