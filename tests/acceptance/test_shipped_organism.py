"""The organism shipped with knowlens: loads offline, meets its behaviour gates, runs the demo."""

import json
import math
import os

import pytest

import knowlens
from knowlens.cli.main import main
from knowlens.organism.store import SHIPPED


def test_shipped_files_are_small_and_safe():
    files = sorted(p.name for p in SHIPPED.iterdir() if not p.name.startswith("."))
    assert files == ["config.json", "model.safetensors", "probe-entity_slot.json", "probe-entity_slot.safetensors",
                     "saes", "tokenizer.json", "world.yaml"]  # fmt: skip
    saes = sorted(p.name for p in (SHIPPED / "saes").iterdir())
    assert saes == [f"blocks.{layer}.hook_resid_post" for layer in range(4)]
    every = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert {p.suffix for p in every} == {".json", ".safetensors", ".yaml"}  # nothing that would be unpickled
    assert sum(p.stat().st_size for p in every) <= 20 * 2**20


def test_load_model_organism_and_card():
    model, card = knowlens.load_model("organism")
    assert card.name == "organism"
    assert (card.n_layers, card.d_model, card.d_vocab) == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab)
    assert "blocks.0.hook_resid_post" in card.hook_names
    assert len(card.fingerprint) == 16 and card.fingerprint != card.shape_fingerprint
    _, again = knowlens.load_model("organism")
    assert again.fingerprint == card.fingerprint
    recorded = json.loads((SHIPPED / "config.json").read_text())
    assert (recorded["fingerprint"], recorded["shape_fingerprint"]) == (card.fingerprint, card.shape_fingerprint)
    tokens = model.to_tokens("Q : Where was Ab Cor born ? A :")
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id


@pytest.fixture(scope="module")
def info():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["organism", "info", "--json"])
    info = json.loads(buf.getvalue())
    passed = all(g["passed"] for g in info["gates"].values()) and info["signals"]["all_passed"]
    assert code == (0 if passed else 1)
    return info


def test_behaviour_gates_pass(info):
    failed = {k: g for k, g in info["gates"].items() if not g["passed"]}
    assert not failed, failed
    assert info["gates"]["known_accuracy"]["n"] >= 100
    assert info["gates"]["unknown_hallucination_rate"]["n"] >= 100


def test_signal_gates_are_reported_and_pass(info):
    gates = info["signals"]["gates"]
    assert info["signals"]["all_passed"], {k: (g["value"], g["threshold"]) for k, g in gates.items()}  # issue 7
    assert set(gates) == {"entity_known", "entity_known_when_hallucinating", "token_hallucination",
                          "token_hallucination_margin"}  # fmt: skip
    assert info["signals"]["all_passed"] == all(g["passed"] for g in gates.values())
    for name, g in gates.items():
        lo, hi = g["ci95"]
        assert lo <= g["value"] <= hi, (name, g)
        assert g["passed"] == (g["value"] >= g["threshold"])
        assert all(n > 0 for n in g["n"].values()) and g["n"]["entities"] >= 20
        if name != "token_hallucination_margin":  # a difference of AUROCs lies in [-1, 1]
            assert 0 <= lo and hi <= 1
            assert g["where"]["hook"].startswith("blocks.") and g["where"]["position"] in ("entity", "answer", "decision", "before_token")
    baselines = gates["token_hallucination"]["baselines"]
    for b in ("top1", "entropy"):
        assert 0 <= baselines[b]["ci95"][0] <= baselines[b]["value"] <= baselines[b]["ci95"][1] <= 1


def test_demo_writes_labels_and_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-split", "4", "--bios-per-split", "1"]) == 0
    printed = capsys.readouterr().out
    assert "answers" in printed and "labels (probe entity_slot" in printed
    records = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert len(records) == 4 * (4 + 1)
    # every token labelled by the shipped probe, as `knowlens label` labels the same prompt
    from knowlens.labels import label_generation
    from knowlens.organism.store import load_organism
    from knowlens.probes import load_probe

    org = load_organism()
    probe = load_probe(SHIPPED / "probe-entity_slot.safetensors", model=org.model)
    for r in records:
        assert all((t["label"] == "reliable") == (t["p_reliable"] >= probe.threshold) for t in r["tokens"])
    first = records[0]
    (gen,) = label_generation(org.model, [first["prompt"]], [probe], max_new_tokens=len(first["tokens"]))
    assert [t.text for t in gen.tokens] == [t["text"] for t in first["tokens"]]
    assert [t.p_reliable for t in gen.tokens] == pytest.approx([t["p_reliable"] for t in first["tokens"]], abs=1e-4)
    assert {r["split"] for r in records} == {"known", "partial", "refusal", "unknown"}
    _, card = knowlens.load_model("organism")
    assert {json.dumps(r["model"]) for r in records} == {json.dumps(card.identity())}
    # the folder is taken now: a second run needs --overwrite, and replaces the files when given it
    assert main(["demo", "--out", str(out), "--per-split", "1", "--bios-per-split", "0"]) == 2
    assert main(["demo", "--out", str(out), "--per-split", "1", "--bios-per-split", "0", "--overwrite"]) == 0
    assert len((out / "labels.jsonl").read_text().splitlines()) == 4
    for r in records:
        assert r["tokens"], r
        for t in r["tokens"]:
            assert t["class"] in ("correct", "hallucinated", "refusal", "other")
            assert t["logprob"] <= 0 and 0 <= t["top1_prob"] <= 1 and t["entropy"] >= 0
            assert t["logprob"] <= 1e-4 + math.log(t["top1_prob"])  # the chosen token is at most the top-1 (values rounded to 5 places)
    page = (out / "report.html").read_text()
    assert "<script src=" not in page and "Plotly" in page
    assert sorted(os.listdir(out)) == ["labels.jsonl", "report.html"]
