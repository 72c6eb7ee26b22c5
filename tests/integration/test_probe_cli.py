"""`knowlens probe export|show` on a random-weight word-level model: a probe fitted from a `capture generate` record
and a labels file loads against the model and scores the record's tokens; `show` prints its card; bad input is one
line, exit code 2, nothing written, and (where it can be) reported before the model loads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from knowlens.capture import generate
from knowlens.cli import probe_cmd
from knowlens.cli.main import main
from knowlens.probes import load_probe
from tests.helpers import word_level_model

HOOK = "blocks.1.hook_resid_post"
DIRECTION = torch.randn(32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def word_model():
    return word_level_model()


@pytest.fixture(scope="module")
def record_path(word_model, tmp_path_factory):
    prompts = [f"w{4 + i % 40} w{5 + (3 * i) % 40}" for i in range(24)]
    rec = generate(word_model, prompts, hooks=[HOOK], max_new_tokens=6, temperature=1.0, seed=0, stop_at_eos=False)
    path = tmp_path_factory.mktemp("rec") / "rec.safetensors"
    rec.save(path)
    return path


@pytest.fixture
def loads(word_model, monkeypatch):
    calls: list[str] = []

    def fake_load(name, device):
        calls.append(name)
        return word_model

    monkeypatch.setattr(probe_cmd, "_load_model", fake_load)
    return calls


def write_labels(path: Path, record_path: Path, *, numeric: bool = False) -> Path:
    from knowlens.capture import ActivationRecord

    rec = ActivationRecord.load(record_path)
    lines = []
    for r in range(rec.batch_size):
        n_prompt = int(rec.prompt_mask[r].sum())
        for j, col in enumerate(rec.generated_mask[r].nonzero().flatten().tolist()):
            # a linear read-out of the token's own activation (numeric: of the one before it), so a probe can learn it
            label = float(rec.activations[HOOK][r, col - 1] @ DIRECTION) if numeric else \
                bool(rec.activations[HOOK][r, col] @ DIRECTION > 0)
            at = {"generated": j} if j % 2 else {"token": n_prompt + j}  # both ways of naming a token
            lines.append(json.dumps({"row": r, **at, "label": label, "group": f"g{r // 2}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_export_then_show(word_model, record_path, loads, tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.jsonl", record_path)
    out = tmp_path / "probe.safetensors"
    code = main(["probe", "export", "--model", "tiny", "--record", str(record_path), "--labels", str(labels),
                 "--hook", HOOK, "--out", str(out), "--folds", "3", "--class-weight", "balanced",
                 "--target", "along DIRECTION"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert loads == ["tiny"] and "out-of-fold AUROC" in printed.out and "uncalibrated -> calibrated" in printed.out
    probe = load_probe(out, model=word_model)
    card = probe.card
    assert card["training"]["n_examples"] == 24 * 6 and card["training"]["n_groups"] == 12
    assert card["training"]["class_weight"] == "balanced" and card["calibration"]["kind"] == "platt"
    assert card["metrics"]["oof_auroc"] > 0.9 and card["target"] == "along DIRECTION"
    assert card["model"]["name"] == "tiny" and card["input"]["kind"] == "residual"
    # the probe scores the record's activations; class 1 tokens score higher
    from knowlens.capture import ActivationRecord

    rec = ActivationRecord.load(record_path)
    p = probe.score(rec.activations[HOOK])
    assert p.shape == rec.tokens.shape and bool(((p >= 0) & (p <= 1)).all())
    gen = rec.generated_mask
    positive = rec.activations[HOOK][gen] @ DIRECTION > 0
    assert p[gen][positive].mean() > p[gen][~positive].mean() + 0.3

    assert main(["probe", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    for word in (HOOK, "position token", card["model"]["fingerprint"], "residual (32 features)", "platt",
                 "out-of-fold AUROC", "144 examples"):  # fmt: skip
        assert word in shown, word
    assert main(["probe", "show", str(out.with_suffix(".json")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card


def test_export_ridge_before_token(word_model, record_path, loads, tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.jsonl", record_path, numeric=True)
    out = tmp_path / "ridge.safetensors"
    assert main(["probe", "export", "--record", str(record_path), "--labels", str(labels), "--hook", HOOK,
                 "--out", str(out), "--position", "before_token", "--folds", "3"]) == 0  # fmt: skip
    assert "R^2" in capsys.readouterr().out
    probe = load_probe(out, model=word_model)
    assert probe.card["metrics"]["oof_r2"] > 0.8
    assert probe.kind == "ridge" and probe.position == "before_token" and probe.calibration.kind == "none"
    assert probe.card["threshold"] is None and "oof_r2" in probe.card["metrics"]


def _bad_cases(tmp: Path, record_path: Path) -> list[tuple[list[str], str, bool]]:
    """(arguments after `probe export`, words of the error, whether the model may load first)."""
    good = write_labels(tmp / "good.jsonl", record_path)
    (tmp / "bad.jsonl").write_text('{"row": 0, "token": 1, "label": 1}\n{nope\n')
    (tmp / "both.jsonl").write_text('{"row": 0, "token": 1, "generated": 0, "label": 1}\n')
    (tmp / "row.jsonl").write_text('{"row": 99, "token": 1, "label": 1}\n')
    (tmp / "tok.jsonl").write_text('{"row": 0, "token": 50, "label": 1}\n')
    (tmp / "gen.jsonl").write_text('{"row": 0, "generated": 6, "label": 1}\n')
    (tmp / "neg.jsonl").write_text('{"row": 0, "token": -1, "label": 1}\n')
    (tmp / "lab.jsonl").write_text('{"row": 0, "token": 1, "label": "yes"}\n')
    (tmp / "first.jsonl").write_text('{"row": 0, "token": 0, "label": 1}\n')
    (tmp / "one.jsonl").write_text("".join(json.dumps({"row": r, "token": 3, "label": r % 2, "group": "same"}) + "\n"
                                           for r in range(10)))  # fmt: skip
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "exists.safetensors").write_bytes(b"x")
    rec, out = str(record_path), str(tmp / "o.safetensors")
    base = ["--record", rec, "--hook", HOOK]
    return [
        ([*base, "--labels", str(tmp / "missing.jsonl"), "--out", out], "no such file", False),
        ([*base, "--labels", str(tmp / "bad.jsonl"), "--out", out], "bad.jsonl:2: not JSON", False),
        ([*base, "--labels", str(tmp / "both.jsonl"), "--out", out], 'exactly one of "token" and "generated"', False),
        ([*base, "--labels", str(tmp / "row.jsonl"), "--out", out], "row 99 is outside the record's 24 rows", False),
        ([*base, "--labels", str(tmp / "tok.jsonl"), "--out", out], "token 50 is outside row 0's", False),
        ([*base, "--labels", str(tmp / "gen.jsonl"), "--out", out], "generated token 6 is outside", False),
        ([*base, "--labels", str(tmp / "neg.jsonl"), "--out", out], "'token' must be an integer >= 0", False),
        ([*base, "--labels", str(tmp / "lab.jsonl"), "--out", out], "'label' must be true/false or a finite number", False),
        ([*base, "--labels", str(tmp / "first.jsonl"), "--out", out, "--position", "before_token"], "no position before", False),
        ([*base, "--labels", str(tmp / "empty.jsonl"), "--out", out], "holds no", False),
        ([*base, "--labels", str(good), "--out", str(tmp / "o.pt")], "must end in .safetensors", False),
        ([*base, "--labels", str(good), "--out", str(tmp / "exists.safetensors")], "pass --overwrite", False),
        ([*base, "--labels", str(good), "--out", out, "--feature-set", "fs.safetensors"], "--feature-set needs --sae", False),
        ([*base, "--labels", str(good), "--out", out, "--kind", "ridge", "--calibration", "platt"], "a ridge probe takes none", False),
        ([*base, "--labels", str(good), "--out", out, "--folds", "1"], "--folds must be >= 2", False),
        (["--record", rec, "--hook", "blocks.0.hook_resid_pre", "--labels", str(good), "--out", out], "holds no activations for blocks.0.hook_resid_pre", False),
        (["--record", str(tmp / "good.jsonl"), "--hook", HOOK, "--labels", str(good), "--out", out], "activation record", False),
        ([*base, "--labels", str(tmp / "one.jsonl"), "--out", out], "at least 2 groups holding each class", True),
    ]  # fmt: skip


def test_bad_input_is_one_line_and_exit_2(record_path, loads, tmp_path, capsys):
    for args, words, may_load in _bad_cases(tmp_path, record_path):
        loads.clear()
        assert main(["probe", "export", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("knowlens probe export: error:"), (args, err)
        assert words in err[0], (words, err[0])
        assert may_load or not loads, f"the model loaded before {words!r} was reported"
        assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.json").exists()
    assert main(["probe", "show", str(tmp_path / "nothing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_record_from_other_weights_is_refused(word_model, record_path, tmp_path, monkeypatch, capsys):
    other = copy.deepcopy(word_model)
    with torch.no_grad():
        other.W_U.add_(0.1)
    monkeypatch.setattr(probe_cmd, "_load_model", lambda name, device: other)
    labels = write_labels(tmp_path / "labels.jsonl", record_path)
    code = main(["probe", "export", "--record", str(record_path), "--labels", str(labels), "--hook", HOOK,
                 "--out", str(tmp_path / "p.safetensors")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "activation record" in err and "fingerprint" in err
    assert not (tmp_path / "p.safetensors").exists()
