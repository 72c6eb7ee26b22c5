"""How an `Evaluation` is shown: a markdown table (rows signals, columns metrics with 95% intervals and the cost) and
a self-contained plotly HTML page (the same tables, ROC curves, reliability diagram, risk-coverage curves)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from knowlens.analyses.report import OFFLINE_CONFIG, STYLE
from knowlens.outputs import atomic_write_text

NOT_APPLICABLE = {"ece", "brier"}  # None there means: not a probability
TABLE_STYLE = ("table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}"
               "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}th{background:#f3f3f3}")  # fmt: skip


def _cell(metric: dict[str, Any], key: str, probability: bool) -> str:
    v, ci = metric.get("value"), metric.get("ci95")
    if v is None:
        return "n/a" if key in NOT_APPLICABLE and not probability else "–"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def main_table(ev: Any) -> tuple[list[str], list[list[str]]]:
    from knowlens.analyses.evaluation import METRICS

    header = ["signal", *METRICS.values(), "risk-coverage area", "passes / token"]
    rows = []
    for s in ev.signals:
        rc = s.risk_coverage
        rows.append([s.title, *(_cell(s.metrics[k], k, s.probability) for k in METRICS),
                     _cell({"value": rc["area"], "ci95": rc["ci95"]}, "area", True), s.cost])  # fmt: skip
    return header, rows


def split_table(ev: Any) -> tuple[list[str], list[list[str]]]:
    splits = list(ev.counts["by_split"])
    header = ["signal", *(f"{sp} ({ev.counts['by_split'][sp]['hallucinated']} h / "
                          f"{ev.counts['by_split'][sp]['correct']} c)" for sp in splits)]  # fmt: skip
    rows = [[s.title, *(_cell(s.by_split[sp]["auroc"], "auroc", True) for sp in splits)] for s in ev.signals]
    return header, rows


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    return ["| " + " | ".join(esc[0]) + " |", "|" + " --- |" * len(header), *("| " + " | ".join(r) + " |" for r in esc[1:])]


def summary_lines(ev: Any) -> list[str]:
    c, p = ev.counts, ev.params
    lines = [f"model {ev.model.get('name')} (fingerprint {ev.model.get('fingerprint')}); {c['items']} held-out items; "
             f"{c['value_tokens']} answer-value tokens ({c['hallucinated']} hallucinated, {c['correct']} correct) in "
             f"{c['answers']} answers about {c['entities']} entities"]  # fmt: skip
    if c.get("answers_left_out"):
        lines.append(f"{c['answers_left_out']} answers left out: {c['left_out_reason']}")
    labels = p.get("labels") or {}
    if labels.get("how"):
        fits = "; ".join(
            ("" if f["labels_entity_half"] is None else f"entity half {f['labels_entity_half']} labelled by a probe ")
            + f"fitted on {f['fit_prompts']} prompts, {f['hook']}, OOF AUROC on its pseudo-labels {f['pseudo_oof_auroc']:.3f}"
            for f in labels.get("fits") or []
        )
        lines.append(f"labels: {labels['how']}" + (f" (k={p['k']}); {fits}" if fits else ""))
    return lines


def notes(ev: Any) -> list[str]:
    p = ev.params
    refs = ev.references
    out = [
        "class 1 (to detect) = hallucinated; AUPRC and recall@10%FPR are for it. Intervals: 95% percentile bootstrap "
        f"over entities ({p['n_boot']} resamples, the same for every signal; scores held fixed).",
        "ECE / Brier: of P(correct) for signals that are probabilities (n/a: entropy, a raw score). ECE (Platt) / "
        f"Brier (Platt): after Platt scaling cross-fitted on {p['folds']} folds grouped by entity. ECE is biased "
        "upward in resamples, so its interval can lie above the point value; a low ECE with an AUROC near 0.5 "
        "means the signal predicts the base rate.",
        "risk-coverage: answers ranked by the minimum score of their value tokens, the least reliable abstained from "
        f"first; area = mean accuracy over coverages (random order {refs['random']:.3f}, oracle {refs['oracle']:.3f}).",
        f"passes / token: forward passes per generated token (self-consistency: k={p['k']} samples + the greedy answer).",
    ]
    out += [f"not measured: {name} ({why})" for name, why in ev.skipped.items()]
    out += list(ev.notes)
    return out


def markdown(ev: Any) -> str:
    lines = ["## knowlens evaluation: hallucinated vs correct answer-value tokens", "", *summary_lines(ev), ""]
    lines += _md(*main_table(ev))
    lines += ["", "AUROC by split (n hallucinated h / correct c value tokens):", ""]
    lines += _md(*split_table(ev))
    lines += ["", *(f"- {n}" for n in notes(ev))]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(ev: Any, path: Path, *, title: str) -> Path:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    def show(fig: Any, div_id: str, x: str, y: str) -> str:
        fig.update_layout(height=460, width=720, margin={"l": 50, "r": 10, "t": 30, "b": 50}, xaxis_title=x,
                          yaxis_title=y, legend={"font": {"size": 11}})  # fmt: skip
        return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=OFFLINE_CONFIG,
                           div_id=div_id)  # fmt: skip

    roc = go.Figure()
    for s in ev.signals:
        auc = s.metrics["auroc"]["value"]
        roc.add_trace(go.Scatter(x=s.curves["roc"]["fpr"], y=s.curves["roc"]["tpr"], mode="lines",
                                 name=f"{s.title} ({auc if auc is None else f'{auc:.3f}'})"))  # fmt: skip
    roc.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"}, name="chance"))
    rel = go.Figure()
    for s in ev.signals:
        bins = s.curves["reliability"]
        if bins:
            rel.add_trace(go.Scatter(x=[b["mean_p"] for b in bins], y=[b["observed"] for b in bins],
                                     mode="lines+markers", text=[f"n={b['n']}" for b in bins],
                                     name=f"{s.title} [{s.curves['reliability_of']}]"))  # fmt: skip
    rel.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"}, name="ideal"))
    rc = go.Figure()
    for s in ev.signals:
        r = s.risk_coverage
        rc.add_trace(go.Scatter(x=r["coverage"], y=r["accuracy"], mode="lines", name=f"{s.title} ({r['area']:.3f})"))
    rc.add_trace(go.Scatter(x=[0, 1], y=[ev.references["random"]] * 2, mode="lines",
                            line={"dash": "dot", "color": "#999"}, name="random order"))  # fmt: skip
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(line)}</p>" for line in summary_lines(ev)),
        _html_table(*main_table(ev)),
        "<h2>AUROC by split</h2>",
        _html_table(*split_table(ev)),
        "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes(ev)) + "</ul>",
        "<h2>ROC curves (hallucinated tokens detected)</h2>",
        show(roc, "roc", "false-positive rate", "true-positive rate"),
        "<h2>Reliability diagram (P(correct), 10 bins)</h2>",
        show(rel, "reliability", "mean predicted P(correct)", "observed share correct"),
        "<h2>Risk-coverage (answers; least reliable abstained from first)</h2>",
        show(rc, "risk-coverage", "coverage (share of answers kept)", "accuracy of the answers kept"),
    ]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
            f"<style>{STYLE}{TABLE_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>")  # fmt: skip
    return atomic_write_text(path, page)
