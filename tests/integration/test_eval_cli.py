"""`knowlens eval`: on the shipped organism with small settings it prints the table and writes eval.md, eval.json and a
self-contained eval.html; every bad input (a model with no world, a bad number, a missing probe, an output that
exists) is one line, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from knowlens.cli.main import main
from knowlens.probes import InputRule, fit_probe, save_probe


def organism_probe(path, *, hook, seed):
    """A probe on random data, carded for the shipped organism (the CLI checks the card, not the data)."""
    from knowlens.organism.store import SHIPPED

    record = json.loads((SHIPPED / "config.json").read_text())
    cfg = record["config"]
    identity = {"name": "organism", "fingerprint": record["fingerprint"], "shape_fingerprint": record["shape_fingerprint"],
                "d_model": cfg["d_model"], "n_layers": cfg["n_layers"], "d_vocab": cfg["d_vocab"]}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(60, cfg["d_model"], generator=g, dtype=torch.float64)
    y = X @ torch.randn(cfg["d_model"], generator=g, dtype=torch.float64) > 0
    fit = fit_probe(X, y, [i // 2 for i in range(60)], k=3, n_boot=0)
    save_probe(path, fit, model=identity, hook=hook, position="before_token", name=path.stem,
               input_rule=InputRule("residual", cfg["d_model"], cfg["d_model"]), label_source="random (test)")  # fmt: skip
    return path


def test_eval_small_on_the_organism_writes_three_files(tmp_path, capsys):
    a = organism_probe(tmp_path / "first.safetensors", hook="blocks.3.hook_resid_post", seed=0)
    b = organism_probe(tmp_path / "second.safetensors", hook="blocks.1.hook_resid_post", seed=1)
    out = tmp_path / "eval"
    rc = main(["eval", "--items", "60", "--k", "2", "--n-boot", "30", "--probe", str(a), "--probe", str(b),
               "--out", str(out), "--threads", "1", "--results", str(tmp_path / "page.md")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    page_md = (tmp_path / "page.md").read_text()
    assert page_md.startswith("# knowlens evaluation: organism\n") and (out / "eval.md").read_text() in page_md
    assert f"knowlens eval --probe {a} --probe {b} --k 2 --items 60 --n-boot 30 --threads 1 --results " in page_md
    assert "world `default`, trained 450 epochs" in page_md and "--overwrite" in page_md
    assert sorted(p.name for p in out.iterdir()) == ["eval.html", "eval.json", "eval.md"]
    md = (out / "eval.md").read_text()
    assert md in captured.out  # the table printed is the one written
    assert "| knowlens labels (probe first) |" in md and "| probe second |" in md and "| self-consistency (k=2) |" in md
    data = json.loads((out / "eval.json").read_text())
    assert data["params"]["k"] == 2 and data["params"]["items"] == 60 and data["params"]["n_boot"] == 30
    assert data["params"]["fit"] == "given probes" and data["params"]["labels"]["primary"]["name"] == "first"
    assert data["model"]["name"] == "organism" and data["skipped"] == {"sae_latent": "no SAE given (--sae)"}
    names = [s["name"] for s in data["signals"]]
    assert names == ["labels", "probe:second", "ground_truth_probe", "top1_prob", "entropy", "self_consistency"]
    assert all(0 <= s["metrics"]["auroc"]["value"] <= 1 for s in data["signals"])
    page = (out / "eval.html").read_text()
    assert "<script src=" not in page and "Plotly" in page and "knowlens eval: organism" in page
    assert "answering 60 held-out items" in captured.err  # progress on stderr


def test_eval_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.md").write_text("keep")
    assert main(["eval", "--items", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert (out / "eval.md").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["eval.md"]
    assert main(["eval", "--items", "10", "--results", str(out / "eval.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and (out / "eval.md").read_text() == "keep"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt2-small"], "needs an organism"),
        (["--k", "0"], "--k must be >= 1"),
        (["--items", "1"], "--items must be >= 2"),
        (["--n-boot", "-1"], "--n-boot must be >= 0"),
        (["--probe", "missing.safetensors"], "no such file"),
        (["--device", "nonesuch"], "nonesuch"),
        (["--results", "page.txt"], "name it *.md"),
        (["--results", "nowhere/page.md"], "no such folder"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *argv, "--out", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("knowlens eval: error:") and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_eval_on_a_folder_that_is_no_organism_is_one_line(tmp_path, capsys):
    folder = tmp_path / "notanorganism"
    folder.mkdir()
    assert main(["eval", "--model", str(folder), "--items", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err
