"""Probe files: save/load round trip, the probability recomputed by hand and by the README's numpy-only loader
(with knowlens unimportable), and every refusal (truncated, other model, wrong dtype, missing tensor, bad card)."""

from __future__ import annotations

import json
import math
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from knowlens.errors import KnowlensError
from knowlens.fingerprint import model_identity
from knowlens.probes import fit_probe, load_probe, probe_features, save_probe
from knowlens.probes.files import FORMAT, FORMAT_VERSION
from knowlens.saes.cards import save_with_card
from tests.helpers import build_model
from tests.unit.test_probes_ridge_calibration import _sae

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return build_model()


def _data(seed: int = 0, n: int = 240, d: int = 32):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, d, generator=g) * 2 + 1  # float32, like a model's activations
    w = torch.randn(d, generator=g)
    y = torch.rand(n, generator=g) < torch.sigmoid(acts @ w * 0.3 - 0.5)
    return acts, y, [i // 4 for i in range(n)]


@pytest.fixture(scope="module")
def fitted():
    acts, y, groups = _data()
    X, rule = probe_features(acts)
    return acts, fit_probe(X, y, groups, k=3, l2_grid=(1.0, 100.0), n_boot=50), rule


@pytest.fixture
def saved(model, fitted, tmp_path):
    _, fit, rule = fitted
    return save_probe(tmp_path / "halluc.safetensors", fit, model=model, hook=HOOK, position="token", input_rule=rule,
                      label_source="toy labels", target="class 1", model_name="tiny")  # fmt: skip


def test_round_trip_scores_like_the_fit_and_the_card_says_what_it_is(model, fitted, saved):
    acts, fit, _ = fitted
    probe = load_probe(saved, model=model)
    torch.testing.assert_close(probe.score(acts), fit.predict(acts), rtol=0, atol=1e-15)
    assert probe.score(acts.reshape(8, 30, 32)).shape == (8, 30)  # any leading shape: (batch, pos)
    card = json.loads(saved.with_suffix(".json").read_text())
    assert card["format"] == FORMAT and card["kind"] == "logistic" and card["name"] == "halluc"
    ident = model_identity(model, "tiny")
    assert {k: card["model"][k] for k in ident} == ident
    assert (card["model"]["d_model"], card["model"]["n_layers"], card["model"]["d_vocab"]) == (32, 2, 50)
    assert card["hook"] == HOOK and card["position"] == "token"
    assert card["input"] == {"kind": "residual", "d_in": 32, "n_features": 32}
    assert card["calibration"] == {"kind": "platt", "a": fit.calibration.scale, "b": fit.calibration.shift}
    assert card["training"]["n_examples"] == 240 and card["training"]["folds"] == 3
    assert card["training"]["knowlens_version"] == card["knowlens_version"]
    assert card["metrics"]["oof_auroc"] == fit.metrics["oof_auroc"] and card["threshold"] == 0.5
    assert card["label_source"] == "toy labels" and card["regularisation"]["l2"] == fit.l2


def test_probability_recomputed_by_hand(fitted, saved):
    acts, fit, _ = fitted
    probe = load_probe(saved)
    t = load_file(str(saved))
    card = json.loads(saved.with_suffix(".json").read_text())
    for row in (0, 17, 239):
        x = acts[row].tolist()
        z = sum((x[j] - float(t["mean"][j])) / float(t["std"][j]) * float(t["weight"][j]) for j in range(32))
        z += float(t["bias"][0])
        p = 1 / (1 + math.exp(-(card["calibration"]["a"] * z + card["calibration"]["b"])))
        assert float(probe.score(acts[row])) == pytest.approx(p, rel=1e-12)
        assert float(probe.decision(probe.features(acts[row]))) == pytest.approx(z, rel=1e-12)


def _readme_loader() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [b for b in blocks if "from safetensors.numpy import load_file" in b]
    assert len(found) == 1, "the README documents one numpy-only probe loader"
    return found[0]


@pytest.mark.parametrize("calibration", ["platt", "temperature", "none", "ridge"])
def test_readme_numpy_loader_matches_score_without_knowlens(model, tmp_path, calibration):
    acts, y, groups = _data(1)
    X, rule = probe_features(acts)
    target = (acts[:, 0] * 2 + acts[:, 1]).double() if calibration == "ridge" else y
    fit = fit_probe(X, target, groups, k=3, l2_grid=(1.0, 100.0), n_boot=0,
                    calibration=None if calibration == "ridge" else calibration)  # fmt: skip
    path = save_probe(tmp_path / "p.safetensors", fit, model=model, hook=HOOK, position="token", input_rule=rule,
                      label_source="toy")  # fmt: skip
    np.save(tmp_path / "x.npy", acts.numpy())
    script = "import sys\nsys.modules['knowlens'] = None  # no knowlens: importing it fails\n" + _readme_loader()
    script += textwrap.dedent(f"""
        import numpy as np
        np.save({str(tmp_path / "p.npy")!r}, probe_probability({str(path)!r}, np.load({str(tmp_path / "x.npy")!r})))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=60)
    got = torch.from_numpy(np.load(tmp_path / "p.npy"))
    torch.testing.assert_close(got, load_probe(path, model=model).score(acts), rtol=1e-12, atol=1e-14)


def test_probe_over_sae_latents_needs_that_sae(model, tmp_path):
    sae = _sae(d_in=32, d_sae=48, hook=HOOK)
    acts, y, groups = _data(2)
    X, rule = probe_features(acts, sae=sae, sae_label="test-sae")
    fit = fit_probe(X, y, groups, k=3, l2_grid=(10.0,), n_boot=0)
    path = save_probe(tmp_path / "s.safetensors", fit, model=model, hook=HOOK, position="before_token",
                      input_rule=rule, label_source="toy")  # fmt: skip
    with_sae = load_probe(path, model=model, sae=sae)
    torch.testing.assert_close(with_sae.score(acts), fit.predict(X), rtol=0, atol=1e-15)
    assert with_sae.card["input"]["sae"] == "test-sae" and with_sae.position == "before_token"
    with pytest.raises(KnowlensError, match="pass the SAE"):
        load_probe(path).score(acts)
    with pytest.raises(KnowlensError, match=r"d_sae 48\); the SAE given has d_in 32, d_sae 16"):
        load_probe(path, sae=_sae(d_in=32, d_sae=16, hook=HOOK))
    with pytest.raises(KnowlensError, match="the SAE given reads blocks.0"):
        load_probe(path, sae=_sae(d_in=32, d_sae=48, hook="blocks.0.hook_resid_post"))


# ------------------------------------------------------------------------------------------------ refusals


def test_another_models_weights_are_refused_naming_both(model, saved):
    other = build_model(seed=1)
    with pytest.raises(KnowlensError) as err:
        load_probe(saved, model=other)
    message = str(err.value)
    assert "\n" not in message and model_identity(model)["fingerprint"] in message
    assert model_identity(other)["fingerprint"] in message


def test_truncated_files_are_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(KnowlensError, match="truncated or replaced"):
        load_probe(saved)
    card = saved.with_suffix(".json")
    card.write_text(card.read_text()[:100])
    with pytest.raises(KnowlensError, match="not a readable JSON card"):
        load_probe(saved)
    card.unlink()
    with pytest.raises(KnowlensError, match="no such file"):
        load_probe(saved)


def _rewrite(path: Path, edit_tensors: Any = None, edit_card: Any = None) -> None:
    """Write the probe again through save_with_card (a valid SHA-256) with its tensors or card changed."""
    card = json.loads(path.with_suffix(".json").read_text())
    for key in ("format", "format_version", "knowlens_version", "tensors_sha256"):
        card.pop(key)
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_card:
        edit_card(card)
    save_with_card(path, tensors, card, fmt=FORMAT, version=FORMAT_VERSION)


@pytest.mark.parametrize(
    ("tensors", "card", "message"),
    [
        (lambda t: t.update(weight=t["weight"].float()), None, "tensor weight is float32, expected float64"),
        (lambda t: t.update(std=t["std"].half()), None, "tensor std is float16, expected float64"),
        (lambda t: t.pop("bias"), None, "missing tensor bias"),
        (lambda t: t.update(mean=t["mean"][:5]), None, r"tensor mean has shape \(5,\), expected \(32,\)"),
        (lambda t: t["weight"].__setitem__(0, math.nan), None, "tensor weight holds NaN"),
        (None, lambda c: c.update(calibration={"kind": "isotonic"}), "malformed card"),
        (None, lambda c: c.update(kind="forest"), "malformed card"),
        (None, lambda c: c.pop("hook"), "malformed card"),
        (None, lambda c: c["input"].update(n_features=7), "malformed card"),
    ],
    ids=["float32", "float16", "missing", "shape", "nan", "calibration", "kind", "no-hook", "input"],
)
def test_bad_tensors_and_cards_are_refused_in_one_line(saved, tensors, card, message):
    _rewrite(saved, tensors, card)
    with pytest.raises(KnowlensError, match=message) as err:
        load_probe(saved)
    assert "\n" not in str(err.value)


def test_a_hook_the_model_lacks_is_refused(model, fitted, tmp_path):
    _, fit, rule = fitted
    path = save_probe(tmp_path / "h.safetensors", fit, model=model, hook="blocks.7.hook_resid_post", position="token",
                      input_rule=rule, label_source="toy")  # fmt: skip
    with pytest.raises(KnowlensError, match="blocks.7.hook_resid_post, which this model does not have"):
        load_probe(path, model=model)


def test_loading_never_unpickles(model, saved, monkeypatch):
    def refuse(*args: Any, **kwargs: Any):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert load_probe(saved, model=model).kind == "logistic"
