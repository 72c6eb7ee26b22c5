"""The HTML report (`write_report`): self-contained, and rendered for real by a headless Chromium.

The browser test needs a Chromium (`apt-get install -y chromium`) and playwright's Python package
(`pip install playwright`, in the `dev` extra); playwright only drives the system browser, it downloads none.
Without either it is skipped, saying which is missing. Set KNOWLENS_REPORT_SCREENSHOT=<file.png> to keep a
screenshot of the rendered page.
"""

from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from knowlens.analyses.answers import Answer
from knowlens.analyses.report import CLASS_CODES, CLASS_COLOURS, summary, summary_text, write_report
from knowlens.organism.corpus import EvalItem
from knowlens.organism.grader import Grade

BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-headless-shell")
BROWSER_NAMES = (
    "chromium",
    "chromium-headless-shell",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
)
# Without these Chromium keeps trying the (closed) network: updates, sync, field trials.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NO_BROWSER = (
    "no Chromium browser found (looked for {} and {} on PATH): the report's browser test needs one; "
    "install it with `apt-get install -y chromium` (or `apt-get install -y chromium-headless-shell`)"
).format(", ".join(BROWSER_CANDIDATES), ", ".join(BROWSER_NAMES))
NO_PLAYWRIGHT = (
    "playwright's Python package is not installed: the report's browser test drives Chromium with it; "
    "install it with `pip install playwright` (no `playwright install` needed: the system Chromium is used)"
)
REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
MEDIANS_LINE = "median top-1 probability by class: "


def find_browser() -> str | None:
    for path in BROWSER_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in BROWSER_NAMES:
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def answers() -> list[Answer]:
    from knowlens.analyses.answers import answer_items
    from knowlens.organism.store import load_organism

    org = load_organism()
    held = org.corpus.held_out
    items = [
        item
        for split in ("known", "partial", "refusal", "unknown")
        for item in [i for i in held if i.split == split][:2]
    ]
    return answer_items(org.model, org.world, items)


@pytest.fixture(scope="module")
def report(answers, tmp_path_factory) -> Path:
    return write_report(
        answers, tmp_path_factory.mktemp("report") / "report.html", title="knowlens browser test"
    )


# -- no browser needed ------------------------------------------------------------------------------------------


class _References(HTMLParser):
    """Every src/href attribute and every <style> text; <script> bodies (the inlined plotly.js) are not markup."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.refs += [
            (tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data", "action", "poster")
        ]
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def test_report_html_references_nothing_remote(report):
    page = report.read_text()
    parsed = _References()
    parsed.feed(page)
    remote = [r for r in parsed.refs if REMOTE.match(r[2])]
    assert remote == [], remote
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert scripts and all("src" not in attrs for attrs in scripts), scripts  # everything inlined
    assert not [attrs for tag, attrs in parsed.tags if tag == "link"]  # no external stylesheets or fonts
    assert parsed.styles and not any(re.search(r"@import|url\(", s) for s in parsed.styles), parsed.styles
    assert "Plotly.newPlot" in page and "mathjax" not in page.split("</script>", 1)[1].lower()
    assert '"displaylogo": false' in page  # no plotly.com link in the mode bar


def test_class_legend_is_categorical(report, answers):
    page = report.read_text()
    legend = re.search(r"<div class='class-legend'[^>]*>(.*?)</div>", page, re.S)
    assert legend, "no categorical legend for the grader classes"
    assert re.findall(r"data-class='(\w+)'", legend.group(1)) == list(CLASS_CODES)
    for colour in CLASS_COLOURS:
        assert f"background:{colour}" in legend.group(1)
    counts = summary(answers)["token_classes"]
    for name in CLASS_CODES:
        assert f"{name} <small>({counts.get(name, 0)} tokens)</small>" in legend.group(1)


def _printed_medians(text: str) -> dict[str, str]:
    line = next(line for line in text.splitlines() if line.startswith(MEDIANS_LINE))
    return dict(part.split(" ") for part in line[len(MEDIANS_LINE) :].split(", "))


def _answer(classes: list[str], top1: list[float]) -> Answer:
    item = EvalItem(
        entity="Ab Cor",
        type="person",
        split="known",
        attribute=None,
        question="Tell me about Ab Cor .",
        withheld=False,
    )
    n = len(classes)
    return Answer(
        item=item,
        tokens=("x",) * n,
        grade=Grade(tuple(classes), (), "other"),
        logprob=(0.0,) * n,
        entropy=(0.0,) * n,
        top1=tuple(top1),
    )


@pytest.mark.parametrize(
    ("top1", "expected"),
    [
        ({"correct": 0.5, "other": 0.25, "refusal": 0.75, "hallucinated": 1.0}, ["0.50", "0.25", "0.75", "1.00"]),
        ({"correct": 0.99993, "other": 0.99996, "refusal": 1.0, "hallucinated": 0.93}, ["0.99993", "0.99996", "1.00000", "0.93000"]),
        ({"correct": 0.9999965, "other": 0.99999988, "refusal": 1.0, "hallucinated": 0.0000002}, ["0.9999965", "0.9999999", "1.0000000", "0.0000002"]),
    ],
)  # fmt: skip
def test_summary_medians_print_enough_digits_to_differ(top1, expected):
    answers = [_answer([c], [p]) for c, p in top1.items()]
    assert list(_printed_medians(summary_text(answers)).values()) == expected


def test_summary_medians_of_the_organism_differ_when_they_differ(answers):
    true = summary(answers)["median_top1_by_class"]
    printed = _printed_medians(summary_text(answers))
    assert printed.keys() == true.keys()
    for a in true:
        decimals = len(printed[a].split(".")[1])  # rounded to as many decimals as the values need to differ
        assert float(printed[a]) == pytest.approx(true[a], abs=0.5 * 10**-decimals + 1e-12)
        if true[a] < 1:
            assert float(printed[a]) < 1, (a, printed[a])
        for b in true:
            if true[a] != true[b]:
                assert printed[a] != printed[b], (a, b, printed)


# -- in a real browser ----------------------------------------------------------------------------------------


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_report_renders_offline_in_headless_chromium(report, answers):
    browser_path = find_browser()
    if browser_path is None:
        pytest.skip(NO_BROWSER)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(NO_PLAYWRIGHT)

    url = report.resolve().as_uri()
    requests: list[str] = []
    blocked: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=browser_path, args=CHROMIUM_FLAGS, headless=True, timeout=60_000
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900}, service_workers="block")
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(url, wait_until="load")
            for div in ("top1-heatmap", "class-heatmap"):
                page.wait_for_selector(f"#{div} .heatmaplayer g.hm image", state="attached", timeout=30_000)
            page.wait_for_load_state("networkidle")

            graphs = page.evaluate(
                """() => [...document.querySelectorAll('.js-plotly-plot')].map(d => {
                    const img = d.querySelector('.heatmaplayer g.hm image');
                    const box = img.getBBox();
                    return {id: d.id, heatmaps: d.querySelectorAll('.heatmaplayer g.hm').length,
                            image: (img.getAttribute('href') || img.getAttribute('xlink:href') || '').slice(0, 22),
                            width: box.width, height: box.height,
                            colorbars: d.querySelectorAll('.colorbar').length,
                            texts: [...d.querySelectorAll('.heatmaplayer text')].map(t => t.textContent)};
                })"""
            )
            legend = page.evaluate(
                """() => [...document.querySelectorAll('.class-legend .item')].map(i => ({
                    text: i.innerText.replace(/\\s+/g, ' ').trim(),
                    colour: getComputedStyle(i.querySelector('.swatch')).backgroundColor,
                    visible: i.getBoundingClientRect().width > 0}))"""
            )
            # hovering a token cell shows its class
            box = page.locator("#class-heatmap .nsewdrag").first.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + 5, box["y"] + 5)
            page.wait_for_selector("#class-heatmap .hoverlayer .hovertext", timeout=10_000)
            hover = page.eval_on_selector("#class-heatmap .hoverlayer .hovertext", "e => e.textContent")
            if shot := os.environ.get("KNOWLENS_REPORT_SCREENSHOT"):
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()

    assert console_errors == [], console_errors
    assert page_errors == [], page_errors
    assert blocked == [], f"the report tried to fetch: {blocked}"
    assert [u for u in requests if not u.startswith(("data:", "blob:"))] == [url], requests

    assert [g["id"] for g in graphs] == ["top1-heatmap", "class-heatmap"], graphs
    tokens = {t for a in answers for t in a.tokens}
    for g in graphs:
        assert g["heatmaps"] == 1 and g["image"].startswith("data:image/png"), g
        assert g["width"] > 100 and g["height"] > 50, g
        # every token is printed in its cell, "<eos>" too
        assert tokens <= set(g["texts"]), tokens - set(g["texts"])
    # a continuous colour bar for the probability only; the classes get the categorical legend
    assert [g["colorbars"] for g in graphs] == [1, 0]

    assert [item["text"].split(" ")[0] for item in legend] == list(CLASS_CODES), legend
    assert [item["colour"] for item in legend] == [_rgb(c) for c in CLASS_COLOURS], legend
    assert all(item["visible"] for item in legend), legend
    first = answers[0]
    assert first.tokens[0] in hover and f"class: {first.grade.classes[0]}" in hover, hover
