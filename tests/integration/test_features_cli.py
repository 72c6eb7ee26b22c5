"""`knowlens features entity-known|surprise` on the shipped organism with a small SAE trained here: the FeatureSets,
the ground-truth comparison and the surprise result are written, load against the model and the HTML report fetches
nothing; exemplar-free sets never use a fabricated name the organism was trained on; bad input is one line, exit 2."""

from __future__ import annotations

import json
import re

import pytest

from knowlens.cli.main import main
from knowlens.organism.store import load_organism
from knowlens.saes import FeatureSet, SaeTrainConfig, SurpriseResult, organism_training_texts, train_sae
from knowlens.saes.train import _encode, _special

HOOK = "blocks.1.hook_resid_post"
SAE_TINY = SaeTrainConfig(expansion=2, k=8, steps=30, batch_tokens=256, buffer_batches=4)
FAST = ["--samples", "128", "--k", "4", "--threshold", "0", "--top", "5"]


@pytest.fixture(scope="module")
def organism():
    return load_organism()


@pytest.fixture(scope="module")
def sae_dir(organism, tmp_path_factory):
    docs = [_encode(organism.tokenizer, d) for d in organism.corpus.documents]
    sae = train_sae(organism.model, docs, HOOK, pad_id=_special(organism.tokenizer, "<pad>"), config=SAE_TINY,
                    progress=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("sae") / HOOK
    sae.save_inference_model(folder)
    return folder


def assert_self_contained(page: str) -> None:
    assert "<script type='text/javascript'>" in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"]?https?:", page)


def test_entity_known_exemplar_free(organism, sae_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert main(["features", "entity-known", "--sae", str(sae_dir), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "entity-known at name" in printed and "entity-unknown at answer" in printed
    assert "entity-known at slot" in printed  # v2 answers "X was born in ...": a frame is found
    assert "ground truth" in printed and "overlap" in printed
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([*(f"entity_known.{p}.{d}.{x}" for p in ("name", "answer", "slot")
                              for d in ("known", "unknown") for x in ("json", "safetensors")),
                            "report.html", "truth.json"])  # fmt: skip
    slot = FeatureSet.load(out / "entity_known.slot.unknown.safetensors", model=organism.model)
    templates = slot.params["slot_templates"]
    assert templates and all(t.count("{name}") == 2 for t in templates)
    assert all(any(t.startswith(base + " {name} ") for base in slot.params["templates"]) for t in templates)
    assert slot.params["answer_frames"]["params"]["n_names"] == slot.contrast["known"]["n"]
    fs = FeatureSet.load(out / "entity_known.name.known.safetensors", model=organism.model)
    assert len(fs) == 5 and fs.hook == HOOK and fs.sae_label == str(sae_dir) and fs.model["name"] == "organism"
    known, unknown = fs.contrast["known"], fs.contrast["unknown"]
    assert known["method"] == "self-generated" and unknown["method"] == "fabricated"
    assert known["n"] >= 2 and unknown["n"] == known["n"] and not set(known["names"]) & set(unknown["names"])
    trained = " \n ".join(f" {t} " for t in organism_training_texts(organism))
    assert not [n for n in unknown["names"] if f" {n} " in trained]  # never a name the organism was trained on
    assert all(f" {n} " in trained for n in unknown["rejected"])
    assert fs.params["templates"] == ["Q : Tell me about {name} . A :", "Q : Who or what is {name} ? A :"]
    truth = json.loads((out / "truth.json").read_text())
    assert set(truth["by"]) == {f"{p}/{d}" for p in ("name", "answer", "slot") for d in ("known", "unknown")}
    row = truth["by"]["name/known"]
    assert row["free_top"] == fs.latents.tolist() and len(row["truth_top"]) == 5
    assert row["overlap"] == len(set(row["free_top"]) & set(row["truth_top"]))
    assert all(v is None or 0 <= v <= 1 for v in row["free_auroc"] + row["truth_auroc"])
    assert truth["n_eval"]["known"] > 0 and truth["n_eval"]["unknown"] > 0
    # the top exemplar-free latent scored on every true entity the contrast sets did not use, with an interval
    assert truth["n_eval_all"]["known"] >= truth["n_eval"]["known"]
    assert truth["n_eval_all"]["unknown"] >= truth["n_eval"]["unknown"]
    lo, hi = row["free_top_auroc_all_ci"]
    assert lo <= row["free_top_auroc_all"] <= hi and "all unused" in printed
    # the ground-truth linear probe it is compared with: same hook, same entities, every position
    assert set(truth["probe"]["by"]) == {"name", "answer", "slot"} and "ground-truth linear probe" in printed
    assert all(0 <= v["auroc"] <= 1 and v["ci"][0] <= v["auroc"] <= v["ci"][1] for v in truth["probe"]["by"].values())
    assert truth["eval_all"]["known"] and not set(truth["eval_all"]["known"]) & set(known["names"] + unknown["names"])
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert "top-activating contexts" in page and "Contrast sets" in page

    # a second run refuses to overwrite, and writes nothing
    before = (out / "report.html").stat().st_mtime_ns
    assert main(["features", "entity-known", "--sae", str(sae_dir), "--out", str(out), *FAST]) == 2
    assert "already holds" in capsys.readouterr().err and (out / "report.html").stat().st_mtime_ns == before


def test_entity_known_user_lists(organism, sae_dir, tmp_path, capsys):
    known, unknown = organism.world.of(split="known")[:8], organism.world.of(split="unknown")[:8]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps({"name": e.name, "type": e.type}) + "\n" for e in known))
    (tmp_path / "u.txt").write_text("".join(e.name + "\n" for e in unknown))
    out = tmp_path / "lists"
    args = ["features", "entity-known", "--sae", str(sae_dir), "--out", str(out), "--known", str(tmp_path / "k.jsonl"),
            "--unknown", str(tmp_path / "u.txt"), "--hook-position", "answer", "--top", "3", "--max-frequency", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.glob("entity_known.*.safetensors")) == [
        "entity_known.answer.known.safetensors", "entity_known.answer.unknown.safetensors"]  # fmt: skip
    fs = FeatureSet.load(out / "entity_known.answer.unknown.safetensors")
    assert fs.contrast["known"]["method"] == "user list" and fs.contrast["known"]["types"] == [e.type for e in known]
    assert fs.contrast["unknown"]["names"] == [e.name for e in unknown] and fs.contrast["unknown"]["types"] is None
    assert json.loads((out / "truth.json").read_text())["by"].keys() == {"answer/known", "answer/unknown"}


def test_surprise(organism, sae_dir, tmp_path, capsys):
    out = tmp_path / "surprise"
    assert main(["features", "surprise", "--sae", str(sae_dir), "--out", str(out), "--top", "4"]) == 0
    printed = capsys.readouterr().out
    assert "held-out R^2" in printed and "rho" in printed
    res = SurpriseResult.load(out / "surprise.safetensors", model=organism.model)
    assert len(res.latents) == 4 and res.n_sequences == len(organism.corpus.held_out)
    assert_self_contained((out / "report.html").read_text())
    assert "entropy ratio" in printed and "vs true answer" in printed
    gap = json.loads((out / "entropy_gap.json").read_text())
    assert set(gap) == {"true answer", "swapped answer"}
    for study in gap.values():
        lo, hi = study["entropy"]["interval"]
        assert lo <= study["entropy"]["ratio"] <= hi


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["entity-known", "--holdout", "1"], ["--holdout"]),
        (["entity-known", "--contrast", "c.jsonl", "--known", "k.jsonl"], ["--contrast"]),
        (["entity-known", "--known", "missing.jsonl"], ["missing.jsonl", "no such file"]),
        (["entity-known", "--top", "0"], ["--top"]),
        (["surprise", "--model", "gpt2-small"], ["--text is required"]),
        (["surprise", "--max-frequency", "1.5"], ["--max-frequency"]),
        (["entity-known", "--sae", "organism:blocks.9.hook_resid_post"], ["organism:blocks.9.hook_resid_post"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    full = ["features", *args[:1], *(["--sae", "organism:blocks.1.hook_resid_post"] if "--sae" not in args else []),
            "--out", str(tmp_path / "out"), *args[1:]]  # fmt: skip
    assert main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"knowlens features {args[0]}: error: ")
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "out").exists()
