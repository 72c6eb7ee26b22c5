"""`label_generation`: per-token probe scores computed inside the capture loop equal `LoadedProbe.score` on the
activations `generate` captures separately (every position rule), p_reliable and labels follow the documented rule,
streaming sees the same labels, exports are atomic and parseable, and bad probes are refused in one line."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest
import torch

from knowlens.capture import generate
from knowlens.errors import KnowlensError
from knowlens.labels import TokenLabels, label_generation
from knowlens.probes import InputRule, fit_probe, load_probe, save_probe
from tests.helpers import word_level_model

HOOK = "blocks.1.hook_resid_post"
HOOK0 = "blocks.0.hook_resid_post"
PROMPTS = ["w4 w10 w11 w5", "w6 w7", "w8 w9 w12 w13 w14 w15"]
PIECES = {"w10", "w11", "w12", "w13"}


@pytest.fixture(scope="module")
def model():
    return word_level_model()


def make_probe(model, path, *, hook, position, seed, kind="auto", threshold=None, name=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(90, 32, generator=g, dtype=torch.float64)
    w = torch.randn(32, generator=g, dtype=torch.float64)
    y = X @ w if kind == "ridge" else X @ w > 0
    fit = fit_probe(X, y, [i // 3 for i in range(90)], kind=kind, k=3, n_boot=0)
    save_probe(path, fit, model=model, hook=hook, position=position, input_rule=InputRule("residual", 32, 32),
               label_source="random directions (test)", target="reliable", name=name, threshold=threshold)  # fmt: skip
    return load_probe(path, model=model)


@pytest.fixture(scope="module")
def probes(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    return {
        "before": make_probe(model, d / "before.safetensors", hook=HOOK, position="before_token", seed=1, threshold=0.4),
        "token": make_probe(model, d / "token.safetensors", hook=HOOK0, position="token", seed=2),
        "prompt": make_probe(model, d / "prompt.safetensors", hook=HOOK, position="prompt_last_token", seed=3),
        "entity": make_probe(model, d / "entity.safetensors", hook=HOOK0, position="entity_last_token", seed=4),
    }


def test_scores_equal_probes_on_separately_captured_activations(model, probes):
    order = [probes[k] for k in ("before", "token", "prompt", "entity")]
    labels = label_generation(model, PROMPTS, order, max_new_tokens=7, name_piece=lambda t: t in PIECES)
    rec = generate(model, PROMPTS, hooks=[HOOK, HOOK0], max_new_tokens=7)
    P = rec.prompt_len
    expect = {
        "before": probes["before"].score(rec.activations[HOOK][:, :-1]),  # column c predicts the token at c + 1
        "token": probes["token"].score(rec.activations[HOOK0]),
        "prompt": probes["prompt"].score(rec.activations[HOOK][:, P - 1]),
        "entity": probes["entity"].score(rec.activations[HOOK0]),
    }
    assert len(labels) == 3 and labels.threshold == 0.4 and labels.n_tokens == int(rec.generated_mask.sum())
    assert [p["role"] for p in labels.probes] == ["primary", "signal", "signal", "entity signal"]
    text = model.tokenizer.convert_ids_to_tokens
    for r, g in enumerate(labels):
        cols = rec.generated_mask[r].nonzero().flatten().tolist()
        assert [t.token_id for t in g.tokens] == rec.tokens[r, cols].tolist() and g.prompt == PROMPTS[r]
        start = rec.real_range(r)[0]
        carried, was = None, False  # the documented carry rule, replayed over prompt then generated tokens
        for c in range(start, P):
            piece = text(int(rec.tokens[r, c])) in PIECES
            carried = float(expect["entity"][r, c]) if piece and was else carried
            was = piece
        for j, (t, c) in enumerate(zip(g.tokens, cols)):
            assert t.index == j and t.row == r and c == P + j
            s = t.signals
            torch.testing.assert_close(s["probe:before"], float(expect["before"][r, c - 1]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s["probe:token"], float(expect["token"][r, c]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s["probe:prompt"], float(expect["prompt"][r]), rtol=1e-12, atol=1e-12)
            piece = text(t.token_id) in PIECES
            carried = float(expect["entity"][r, c]) if piece and was else carried
            was = piece
            if carried is None:
                assert s["entity_known"] is None
            else:
                torch.testing.assert_close(s["entity_known"], carried, rtol=1e-12, atol=1e-12)
            assert s["input_surprise"] == -float(rec.logprobs[r, c]) and s["top1_prob"] == float(rec.top1_prob[r, c])
            assert s["entropy"] == float(rec.entropy[r, c])
            assert t.p_reliable == s["probe:before"] and t.label == ("reliable" if t.p_reliable >= 0.4 else "unreliable")
    carried_any = [t.signals["entity_known"] for t in labels[0].tokens]
    assert carried_any[0] is not None  # prompt 0 names "w10 w11": carried from the prompt


def test_streaming_and_mean(model, probes):
    seen = []
    labels = label_generation(model, PROMPTS, [probes["token"], probes["before"]], max_new_tokens=5, combine="mean",
                              threshold=0.7, on_token=seen.append, batch_size=2)  # fmt: skip
    flat = sorted((t for g in labels for t in g.tokens), key=lambda t: (t.row // 2, t.index, t.row))
    assert seen == flat and len(seen) == labels.n_tokens  # batch by batch, step by step, rows in order
    assert [g.row for g in labels] == [0, 1, 2] and {t.row for t in seen} == {0, 1, 2}
    for t in seen:
        assert t.p_reliable == pytest.approx((t.signals["probe:token"] + t.signals["probe:before"]) / 2, abs=1e-12)
        assert t.label == ("reliable" if t.p_reliable >= 0.7 else "unreliable")
    assert "entity_known" not in seen[0].signals and labels.combine == "mean" and labels.threshold == 0.7


def test_exports_are_atomic_and_parseable(model, probes, tmp_path, monkeypatch):
    labels = label_generation(model, PROMPTS, [probes["before"], probes["entity"]], max_new_tokens=4,
                              name_piece=lambda t: t in PIECES)  # fmt: skip
    labels = labels.with_classes([["other"] * len(g.tokens) for g in labels])
    out = labels.to_jsonl(tmp_path / "labels.jsonl")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and [r["prompt"] for r in records] == PROMPTS
    assert records[0]["probes"] == ["before", "entity"] and records[0]["model"] == labels.model
    tok = records[1]["tokens"][0]
    assert set(tok) == {"index", "id", "text", "p_reliable", "label", "signals", "class"}
    assert tok["signals"]["entity_known"] is None  # prompt 1 has no name: JSON null
    assert records[0]["tokens"][0]["signals"]["entity_known"] is not None

    page = labels.to_html(tmp_path / "report.html", title="t<1>")
    parser = _Collect()
    parser.feed(page.read_text())
    assert {"p-reliable-heatmap", "class-heatmap"} <= parser.ids and parser.title == "t<1>"
    assert not parser.external  # self-contained: no script or link fetched from elsewhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl", "report.html"]  # no temporary file left

    import knowlens.outputs

    def fail(*a, **k):
        raise OSError("disk full")

    before = out.read_text()
    monkeypatch.setattr(knowlens.outputs.os, "replace", fail)
    with pytest.raises(OSError):
        TokenLabels(generations=labels.generations[:1], probes=labels.probes, threshold=0.5, combine="first",
                    model=labels.model).to_jsonl(out)  # fmt: skip
    assert out.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl", "report.html"]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.external: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if (tag == "script" and a.get("src")) or (tag == "link" and a.get("href")):
            self.external.append(tag)
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        self._in_title = False


def test_bad_probes_are_refused(model, probes, tmp_path):
    other = word_level_model()
    with torch.no_grad():
        other.W_U.mul_(2.0)  # same shape, other weights
    with pytest.raises(KnowlensError, match="was made with model"):
        label_generation(other, PROMPTS, [probes["before"]], max_new_tokens=2)
    with pytest.raises(KnowlensError, match="was made with model"):
        label_generation(other, PROMPTS, [probes["before"].path], max_new_tokens=2)
    ridge = make_probe(model, tmp_path / "ridge.safetensors", hook=HOOK, position="token", seed=5, kind="ridge")
    cases = [
        ([ridge], {}, "ridge probe"),
        ([probes["entity"]], {}, "no per-token probe"),
        ([probes["before"], probes["entity"], probes["entity"]], {}, "named 'entity'"),
        ([probes["before"]], {"combine": "max"}, "combine must be"),
        ([probes["before"]], {"threshold": 1.0}, "threshold must be"),
        ([], {}, "one or more probes"),
    ]
    for given, kw, match in cases:
        with pytest.raises(KnowlensError, match=match):
            label_generation(model, PROMPTS, given, max_new_tokens=2, **kw)


def test_a_failing_callback_leaves_no_hook(model, probes):
    def boom(_label):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        label_generation(model, PROMPTS, [probes["before"], probes["entity"]], max_new_tokens=3, on_token=boom)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    again = label_generation(model, PROMPTS[:1], [probes["before"]], max_new_tokens=3)
    assert all(math.isfinite(t.p_reliable) for t in again[0].tokens)
