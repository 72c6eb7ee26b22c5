"""`knowlens label`: on the shipped organism one prompt is labelled and written (JSONL with the grader's classes, HTML;
its time is measured by benchmarks/bench_cli.py); on a random-weight word-level model the printed tokens match the JSONL labels, colour only on a
terminal, --fit-pseudo is wired to `fit_pseudo_probes`; every bad input is one line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from knowlens.cli import label_cmd
from knowlens.cli.main import main
from knowlens.probes import InputRule, fit_probe, save_probe
from tests.helpers import word_level_model

HOOK = "blocks.1.hook_resid_post"


def make_probe(path: Path, model_or_identity, *, d: int, hook: str = HOOK, position: str = "before_token", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(60, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) > 0
    fit = fit_probe(X, y, [i // 2 for i in range(60)], k=3, n_boot=0)
    save_probe(path, fit, model=model_or_identity, hook=hook, position=position,
               input_rule=InputRule("residual", d, d), label_source="random direction (test)")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def word_model():
    return word_level_model()


@pytest.fixture(scope="module")
def probe_file(word_model, tmp_path_factory):
    return make_probe(tmp_path_factory.mktemp("p") / "rel.safetensors", word_model, d=32)


@pytest.fixture
def loads(word_model, monkeypatch):
    calls: list[str] = []

    def fake_load(name, device):
        calls.append(name)
        return word_model, None

    monkeypatch.setattr(label_cmd, "_load_model", fake_load)
    return calls


def test_organism_one_prompt(tmp_path, capsys):  # its time: benchmarks/bench_cli.py
    from knowlens.organism.store import SHIPPED

    record = json.loads((SHIPPED / "config.json").read_text())
    cfg = record["config"]
    identity = {"name": "organism", "fingerprint": record["fingerprint"], "shape_fingerprint": record["shape_fingerprint"],
                "d_model": cfg["d_model"], "n_layers": cfg["n_layers"], "d_vocab": cfg["d_vocab"]}  # fmt: skip
    probe = make_probe(tmp_path / "p.safetensors", identity, d=cfg["d_model"], hook="blocks.3.hook_resid_post")
    out, page = tmp_path / "labels.jsonl", tmp_path / "labels.html"
    code = main(["label", "--probe", str(probe), "--prompt", "Q : Tell me about Mor Tav . A :", "--out", str(out),
                 "--html", str(page), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["prompt"] == "Q : Tell me about Mor Tav . A :" and rec["tokens"]
    assert all(t["class"] in ("correct", "hallucinated", "refusal", "other") for t in rec["tokens"])
    assert rec["model"]["fingerprint"] == record["fingerprint"]
    assert "p-reliable-heatmap" in page.read_text() and "\x1b[" not in printed.out
    assert printed.out.splitlines()[0] == "[0] Q : Tell me about Mor Tav . A :"


def test_printed_tokens_match_the_jsonl(probe_file, loads, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w4 w5\nw6 w7 w8\n")
    out = tmp_path / "l.jsonl"
    code = main(["label", "--model", "tiny", "--probe", str(probe_file), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "5", "--threshold", "0.6", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert loads == ["tiny"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    lines = printed.out.splitlines()
    assert len(records) == 2 and lines[0] == "[0] w4 w5" and lines[2] == "[1] w6 w7 w8"
    for rec, line in zip(records, (lines[1], lines[3])):
        shown = " ".join(t["text"] if t["label"] == "reliable" else f"[{t['text']}]" for t in rec["tokens"])
        assert line == "    " + shown and rec["threshold"] == 0.6
        assert all((t["p_reliable"] >= 0.6) == (t["label"] == "reliable") for t in rec["tokens"])
    assert "class" not in records[0]["tokens"][0]  # no ground truth off an organism
    # colour on a terminal, none with --no-color
    monkeypatch.setattr(label_cmd.sys.stdout, "isatty", lambda: True)
    assert main(["label", "--model", "tiny", "--probe", str(probe_file), "--prompt", "w4 w5", "--no-progress"]) == 0
    assert "\x1b[3" in capsys.readouterr().out
    assert main(["label", "--model", "tiny", "--probe", str(probe_file), "--prompt", "w4 w5", "--no-progress",
                 "--no-color"]) == 0  # fmt: skip
    assert "\x1b[" not in capsys.readouterr().out


def test_fit_pseudo_is_wired(word_model, loads, tmp_path, capsys, monkeypatch):
    import knowlens.probes.pseudo as pseudo

    calls = []

    def fake_fit(model, prompts, *, hooks, out_dir, sources, k, seed, groups, model_name, options):
        calls.append({"prompts": list(prompts), "sources": sources, "k": k, "dir": Path(out_dir), "hooks": hooks})
        make_probe(Path(out_dir) / "self_consistency.safetensors", model, d=32, hook=hooks[-1])
        pseudo_card = {"counts": {"label_1": 5, "label_0": 3}, "hook": hooks[-1]}
        return {"self_consistency": SimpleNamespace(training={"pseudo": pseudo_card}, metrics={"oof_auroc": 0.7})}

    monkeypatch.setattr(pseudo, "fit_pseudo_probes", fake_fit)
    fit_prompts = tmp_path / "fit.txt"
    fit_prompts.write_text("\n".join(f"w{i} w{i + 1}" for i in range(4, 14)) + "\n")
    out = tmp_path / "l.jsonl"
    code = main(["label", "--model", "tiny", "--prompt", "w4 w5", "--fit-pseudo", "6", "--fit-prompts", str(fit_prompts),
                 "--fit-k", "3", "--out", str(out), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    (call,) = calls
    assert call["prompts"] == [f"w{i} w{i + 1}" for i in range(4, 10)] and call["k"] == 3
    assert call["sources"] == ("self_consistency",) and call["hooks"] == ("blocks.0.hook_resid_post", HOOK)
    assert not call["dir"].exists()  # a temporary folder, removed once the labels are made
    assert json.loads(out.read_text())["probes"] == ["self_consistency"] and "5 pseudo-reliable" in printed.err
    keep = tmp_path / "kept"
    assert main(["label", "--model", "tiny", "--prompt", "w4 w5", "--fit-pseudo", "6", "--fit-prompts",
                 str(fit_prompts), "--save-probes", str(keep), "--no-progress"]) == 0  # fmt: skip
    assert sorted(p.name for p in keep.iterdir()) == ["self_consistency.json", "self_consistency.safetensors"]


def test_bad_input_is_one_line(probe_file, loads, tmp_path, capsys, word_model):
    exists = tmp_path / "exists.jsonl"
    exists.write_text("x\n")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = make_probe(other_dir / "other.safetensors", {"name": "other", "fingerprint": "0123456789abcdef",
                       "shape_fingerprint": "x"}, d=32)  # fmt: skip
    p = ["--model", "tiny", "--probe", str(probe_file)]
    cases = [
        (["--model", "tiny", "--probe", str(probe_file)], "give the prompts", False),
        ([*p, "--prompt", "w4", "--prompts", "x.txt"], "give the prompts", False),
        ([*p, "--prompt", "w4", "--out", str(tmp_path / "l.json")], "must end in .jsonl", False),
        ([*p, "--prompt", "w4", "--out", str(exists)], "pass --overwrite", False),
        ([*p, "--prompt", "w4", "--html", str(tmp_path / "r.htm")], "must end in .html", False),
        (["--model", "tiny", "--probe", str(tmp_path / "none.safetensors"), "--prompt", "w4"], "no such file", False),
        ([*p, "--prompt", "w4", "--threshold", "1.5"], "--threshold", False),
        ([*p, "--prompt", "w4", "--max-new-tokens", "0"], "--max-new-tokens", False),
        ([*p, "--prompt", " "], "is empty", False),
        ([*p, "--prompts", str(tmp_path / "missing.txt")], "no such file", False),
        (["--model", "tiny", "--prompt", "w4"], "knowlens probe export", False),
        ([*p, "--prompt", "w4", "--fit-prompts", str(exists)], "go with --fit-pseudo", False),
        ([*p, "--prompt", "w4", "--fit-pseudo", "1"], "at least 2", False),
        (["--model", "tiny", "--probe", str(other), "--prompt", "w4"], "was made with model", True),
        ([*p, "--prompt", "w4", "--max-new-tokens", "100"], "exceeds the model's context", True),
    ]
    for argv, match, loaded in cases:
        loads.clear()
        code = main(["label", *argv, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("knowlens label: error:") and match in err, (argv, err)
        assert bool(loads) == loaded, (argv, loads)  # checked before the model loads where it can be
    assert exists.read_text() == "x\n" and not (tmp_path / "l.json").exists()


def test_explain_positions_only_or_with_sae_latents(probe_file, loads, tmp_path, capsys):
    from tests.unit.test_saes_load import build_sae

    base = ["label", "--model", "tiny", "--probe", str(probe_file), "--prompt", "w4 w5", "--explain", "--threshold",
            "0.7", "--max-new-tokens", "5", "--no-progress"]  # fmt: skip
    out = tmp_path / "l.jsonl"
    assert main([*base, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    tokens = json.loads(out.read_text())["tokens"]
    assert any(t["label"] == "unreliable" for t in tokens)
    assert all(("explanation" in t) == (t["label"] == "unreliable") for t in tokens)
    for t in tokens:
        if "explanation" in t:
            ex = t["explanation"]
            assert "latents" not in ex and ex["positions"]["hook"] == "blocks.0.hook_resid_pre"
            assert 1 <= len(ex["positions"]["top"]) <= 5 and ex["probe"] == "rel"
    assert "explained by positions," in err and "s per explained token" in err
    build_sae(hook="blocks.0.hook_resid_post").save_model(tmp_path / "sae")
    out2 = tmp_path / "l2.jsonl"
    assert main([*base, "--sae", str(tmp_path / "sae"), "--explain-top", "2", "--out", str(out2)]) == 0
    assert "explained by positions and SAE latents" in capsys.readouterr().err
    explained = [t["explanation"] for t in json.loads(out2.read_text())["tokens"] if "explanation" in t]
    assert explained and all(len(ex["latents"]["top"]) == 2 and ex["latents"]["hook"] == "blocks.0.hook_resid_post"
                             for ex in explained)  # fmt: skip


def test_explain_bad_input_is_one_line(word_model, loads, tmp_path, capsys):
    from tests.unit.test_saes_load import build_sae

    early = make_probe(tmp_path / "early.safetensors", word_model, d=32, hook="blocks.0.hook_resid_post")
    build_sae(hook=HOOK).save_model(tmp_path / "late")
    p = ["--model", "tiny", "--probe", str(early), "--prompt", "w4", "--explain", "--no-progress"]
    out = tmp_path / "l.jsonl"
    for argv, match in (([*p, "--sae", str(tmp_path / "late"), "--out", str(out)], "runs after the probe's hook"),
                        ([*p, "--explain-top", "0"], "--explain-top must be >= 1")):  # fmt: skip
        code = main(["label", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and match in err, (argv, err)
    assert not out.exists()


def test_the_shipped_entity_slot_probe_is_the_default(tmp_path, capsys):
    """Without --probe the shipped organism's exemplar-free probe labels the tokens; `organism fit-probes` rebuilds
    it (into --out) from the model alone and refuses to overwrite it."""
    from knowlens.organism.store import SHIPPED
    from knowlens.probes import load_probe

    out = tmp_path / "labels.jsonl"
    assert main(["label", "--prompt", "Q : Tell me about Mor Tav . A :", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "primary probe entity_slot on" in printed.out + printed.err
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(t["p_reliable"] == pytest.approx(t["signals"]["probe:entity_slot"]) for t in rec["tokens"])  # primary
    shipped = json.loads((SHIPPED / "probe-entity_slot.json").read_text())
    assert shipped["position"] == "before_token" and shipped["target"] == "known entity"
    assert "at the answer slot" in shipped["label_source"] and "self-generated" in shipped["label_source"]

    folder = tmp_path / "probes"
    assert main(["organism", "fit-probes", "--out", str(folder), "--samples", "256", "--k", "8"]) == 0
    printed = capsys.readouterr().out
    assert "kept blocks." in printed and "{name} was born in" in printed
    probe = load_probe(folder / "probe-entity_slot.safetensors")
    assert probe.position == "before_token" and probe.card["model"]["fingerprint"] == shipped["model"]["fingerprint"]
    assert sorted(p.name for p in folder.iterdir()) == ["probe-entity_slot.json", "probe-entity_slot.safetensors"]
    assert main(["organism", "fit-probes", "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds probe-entity_slot" in err[0]
