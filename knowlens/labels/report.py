"""The self-contained HTML report of `TokenLabels`: generations as rows of tokens coloured by ``p_reliable``.

Conventions of `knowlens.analyses.report` (the demo's report): plotly.js inlined (nothing is fetched: no CDN,
MathJax, fonts or map tiles), token texts HTML-escaped (plotly would read ``<eos>`` as a tag), one heatmap row
per generation; hovering a token shows its label, ``p_reliable`` and every signal, and for an explained (unreliable)
token the top latents and positions driving the probe's decision (`knowlens.labels.explain`). With ground truth
(`TokenLabels.with_classes`) a second grid shows the grader's class of each token. Written atomically.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from pathlib import Path
from typing import Any

from knowlens.labels.tokens import TokenLabels
from knowlens.outputs import atomic_write_text

# plotly.js config: no plotly.com logo link, no cloud button, no TeX typesetting, no topojson CDN
OFFLINE_CONFIG = {"displaylogo": False, "showSendToCloud": False, "typesetMath": False, "topojsonURL": ""}
CLASS_CODES = {"correct": 0, "other": 1, "refusal": 2, "hallucinated": 3}  # the grader's classes, as the demo report
CLASS_COLOURS = ["#2ca02c", "#d9d9d9", "#1f77b4", "#d62728"]
STYLE = (
    "body{font-family:sans-serif;margin:1em 2em}table.probes{border-collapse:collapse;font-size:13px}"
    "table.probes td,table.probes th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
    ".class-legend{display:flex;flex-wrap:wrap;gap:.4em 1.4em;margin:.2em 0 .4em;font-size:14px}"
    ".class-legend .swatch{display:inline-block;width:1.1em;height:1.1em;border:1px solid #888;margin-right:.3em}"
)


def write_html(labels: TokenLabels, path: str | os.PathLike[str], *, title: str = "knowlens labels") -> Path:
    """Write the report of ``labels`` to ``path`` (module docstring)."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    gens = [g for g in labels.generations]
    width = max([len(g.tokens) for g in gens] + [1])
    names = [f"{g.row}: {_short(g.prompt if isinstance(g.prompt, str) else ' '.join(g.prompt_tokens))}" for g in gens]
    text = [[html.escape(t.text) for t in g.tokens] + [""] * (width - len(g.tokens)) for g in gens]
    hover = [[_hover(t) for t in g.tokens] + [""] * (width - len(g.tokens)) for g in gens]
    height = 140 + 24 * len(gens)

    def grid(z: list[list[Any]], colorscale: Any, zmin: float, zmax: float, colorbar: Any, div_id: str) -> str:
        fig = go.Figure(go.Heatmap(
            z=z, text=text, customdata=hover, texttemplate="%{text}", textfont={"size": 10},
            hovertemplate="%{customdata}<extra>%{y}</extra>", colorscale=colorscale, zmin=zmin, zmax=zmax,
            colorbar=colorbar, showscale=colorbar is not None, xgap=1, ygap=1, y=names,
        ))  # fmt: skip
        fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, yaxis={"autorange": "reversed"})
        fig.update_xaxes(showticklabels=False)
        return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=OFFLINE_CONFIG,
                           div_id=div_id)  # fmt: skip

    p = [[t.p_reliable for t in g.tokens] + [None] * (width - len(g.tokens)) for g in gens]
    n_unreliable = sum(t.label == "unreliable" for g in gens for t in g.tokens)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>model {html.escape(labels.model.get('name', '?'))}: fingerprint "
        f"<code>{html.escape(labels.model.get('fingerprint', '?'))}</code>. {len(gens)} generations, "
        f"{labels.n_tokens} tokens, {n_unreliable} labelled unreliable.</p>",
        f"<p>{html.escape(str(labels.params.get('rule', '')))}</p>",
        _probe_table(labels),
        "<h2>Tokens coloured by p_reliable</h2>",
        grid(p, "RdYlGn", 0.0, 1.0, {"title": "p_reliable"}, "p-reliable-heatmap"),
    ]
    if all(g.classes is not None for g in gens) and gens:
        cls = [[CLASS_CODES.get(c, 1) for c in g.classes or ()] + [None] * (width - len(g.tokens)) for g in gens]
        counts = Counter(c for g in gens for c in g.classes or ())
        parts += ["<h2>Tokens coloured by ground truth (grader class)</h2>", _class_legend(counts),
                  grid(cls, _stepped(CLASS_COLOURS), -0.5, len(CLASS_CODES) - 0.5, None, "class-heatmap")]  # fmt: skip
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
        f"<style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    return atomic_write_text(Path(path), page)


def _hover(t: Any) -> str:
    lines = [f"<b>{html.escape(t.text)}</b>: {t.label}", f"p_reliable: {_fmt(t.p_reliable)}"]
    lines += [f"{html.escape(k)}: {_fmt(v)}" for k, v in t.signals.items()]
    ex = getattr(t, "explanation", None)
    if ex is not None:
        lines.append(f"<b>why</b> ({html.escape(ex.probe)} decision {_fmt(ex.decision)} at {html.escape(repr(ex.read_token))}):")
        lines += [html.escape(line) for line in ex.summary()]
    return "<br>".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _probe_table(labels: TokenLabels) -> str:
    head = "<tr><th>probe</th><th>role</th><th>hook @ position</th><th>target</th><th>labels from</th><th>OOF AUROC</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(str(p['name']))}</td><td>{html.escape(str(p['role']))}</td>"
        f"<td>{html.escape(str(p['hook']))} @ {html.escape(str(p['position']))}</td>"
        f"<td>{html.escape(str(p.get('target') or ''))}</td><td>{html.escape(str(p.get('label_source') or ''))}</td>"
        f"<td>{_fmt(p.get('oof_auroc'))}</td></tr>"
        for p in labels.probes
    )
    return f"<table class='probes'>{head}{rows}</table>"


def _class_legend(counts: Counter[str]) -> str:
    items = "".join(
        f"<span data-class='{k}'><span class='swatch' style='background:{c}'></span>{k} "
        f"<small>({counts.get(k, 0)} tokens)</small></span>"
        for k, c in zip(CLASS_CODES, CLASS_COLOURS)
    )
    return f"<div class='class-legend' aria-label='grader class legend'>{items}</div>"


def _stepped(colours: list[str]) -> list[list[Any]]:
    n = len(colours)
    return [[(i + j) / n, c] for i, c in enumerate(colours) for j in (0, 1)]


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
