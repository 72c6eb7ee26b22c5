"""`knowlens.labels.explain`: activation x gradient onto positions and SAE latents equals the derivative of the probe's
decision (finite differences, and an exact linear case), latents + error add up to the position, shares sum to 1,
explanations only on unreliable tokens with the decision behind p_reliable, the real-ablation check, bad hooks
refused, nothing left on the model after a failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knowlens.errors import KnowlensError
from knowlens.labels import attribute_reads, check_explanations, explain_generation, label_generation
from knowlens.labels.explain import check_explain_hooks, shares
from knowlens.patching import ablate_latents
from knowlens.probes import InputRule, fit_probe, load_probe, save_probe
from tests.helpers import build_model, word_level_model
from tests.unit.test_saes_load import build_sae

PROBE_HOOK = "blocks.1.hook_resid_post"
SAE_HOOK = "blocks.0.hook_resid_post"
TOKENS = [1, 7, 12, 30, 4, 9, 22, 5]


def make_probe(tmp: Path, model, *, hook: str = PROBE_HOOK, position: str = "before_token", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(60, 32, generator=g, dtype=torch.float64)
    y = X @ torch.randn(32, generator=g, dtype=torch.float64) > 0
    fit = fit_probe(X, y, [i // 2 for i in range(60)], k=3, n_boot=0)
    path = save_probe(tmp / f"{position}-{hook}.safetensors", fit, model=model, hook=hook, position=position,
                      input_rule=InputRule("residual", 32, 32), label_source="random direction (test)")  # fmt: skip
    return load_probe(path, model=model)


@pytest.fixture(scope="module")
def model():
    return build_model(dtype=torch.float64)


@pytest.fixture(scope="module")
def sae():
    return build_sae(hook=SAE_HOOK).double()


@pytest.fixture(scope="module")
def probe(model, tmp_path_factory):
    return make_probe(tmp_path_factory.mktemp("p"), model)


def decision(model, probe, tokens, read, fwd_hooks=()):
    seen = {}

    def keep(x, hook):
        seen["a"] = x.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[*fwd_hooks, (probe.hook, keep)]):
        model(torch.tensor([tokens]))
    return float(probe.decision(seen["a"][0, read]))


def hooks_on(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp._forward_hooks or hp.fwd_hooks]


def test_positions_and_latents_equal_the_derivative_of_the_decision(model, sae, probe):
    reads = [4, 7]
    atts = attribute_reads(model, TOKENS, reads, probe, sae=sae, position_hook="blocks.0.hook_resid_pre")
    eps = 1e-4
    for att, r in zip(atts, reads):
        assert att.positions.shape == (r + 1,) and att.latents is not None and att.error is not None
        assert att.decision == pytest.approx(decision(model, probe, TOKENS, r), abs=1e-9)
        for c in (0, 2, r):  # d/ds m(a_c -> s a_c) at s = 1 is a_c . g_c
            def scale(x, hook, c=c, s=1.0):
                x = x.clone()
                x[:, c] = x[:, c] * s
                return x

            up = decision(model, probe, TOKENS, r, [("blocks.0.hook_resid_pre", lambda x, hook: scale(x, hook, s=1 + eps))])
            down = decision(model, probe, TOKENS, r, [("blocks.0.hook_resid_pre", lambda x, hook: scale(x, hook, s=1 - eps))])
            assert float(att.positions[c]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
        # the top latent: d/ds m(f_i -> s f_i at column c, error kept) at s = 1 is f_i (W_dec[i] . g)
        c, i = divmod(int(att.latents.abs().argmax()), att.latents.shape[1])
        up, down = (decision(model, probe, TOKENS, r, list(ablate_latents(sae, [i], scale=s, positions=[c])))
                    for s in (1 + eps, 1 - eps))  # fmt: skip
        assert float(att.latents[c, i]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
        assert att.latents[:, :].abs().sum() > 0


def test_exact_linear_case_and_completeness(model, sae, tmp_path):
    lin = make_probe(tmp_path, model, hook="blocks.0.hook_resid_pre", position="token")
    (att,) = attribute_reads(model, TOKENS, [5], lin, position_hook="blocks.0.hook_resid_pre")
    seen = {}
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.setdefault("a", x.detach()))]):
        model(torch.tensor([TOKENS]))
    exact = float(seen["a"][0, 5] @ (lin.weight / lin.std))  # z = a . w / std + const: a . dz/da
    assert float(att.positions[5]) == pytest.approx(exact, rel=1e-10)
    assert torch.all(att.positions[:5] == 0)  # nothing before the read column reaches a probe at the embedding
    probe1 = make_probe(tmp_path, model)
    (att,) = attribute_reads(model, TOKENS, [6], probe1, sae=sae, position_hook=SAE_HOOK)
    assert att.latents is not None and att.error is not None and att.bias is not None
    torch.testing.assert_close(att.latents.sum(1) + att.error + att.bias, att.positions, rtol=1e-9, atol=1e-9)


def test_shares_sum_to_one_and_top_entries(model, sae, probe):
    (ex,) = explain_generation(model, TOKENS, 4, [2], probe, sae=sae, top_k=10_000, text_of=lambda t: f"t{t}")
    assert ex.read_position == 5 and ex.read_token == "t9"
    assert sum(e.share for e in ex.positions) == pytest.approx(1.0)
    assert sum(e.share for e in ex.latents) == pytest.approx(1.0)
    (att,) = attribute_reads(model, TOKENS, [5], probe, sae=sae)
    assert att.latents is not None and att.error is not None and att.bias is not None
    full = torch.cat([att.latents, att.error[:, None], att.bias[:, None]], dim=1)
    assert len(ex.latents) == int((full != 0).sum()) and sum(e.latent == "error" for e in ex.latents) == 6
    assert all(e.value != 0 for e in ex.latents)  # zero entries are not listed
    (top,) = explain_generation(model, TOKENS, 4, [2], probe, sae=sae, top_k=5)
    assert len(top.positions) == 5 and len(top.latents) == 5
    mags = [abs(e.value) for e in top.latents]
    assert mags == sorted(mags, reverse=True) and top.latents[0].value == ex.latents[0].value
    assert all(e.sign == ("+" if e.value >= 0 else "-") for e in top.latents)
    assert torch.allclose(shares(torch.tensor([1.0, -3.0])), torch.tensor([0.25, 0.75], dtype=torch.float64))
    d = json.loads(json.dumps(top.to_dict()))
    assert d["latents"]["hook"] == SAE_HOOK and set(d["latents"]["top"][0]) >= {"position", "token", "latent", "share"}


def test_bad_hooks_are_refused(model, probe, tmp_path):
    late = build_sae(hook="blocks.1.hook_resid_post")
    early = make_probe(tmp_path, model, hook="blocks.0.hook_resid_post")
    with pytest.raises(KnowlensError, match="runs after the probe's hook"):
        check_explain_hooks(model, early, sae=late)
    with pytest.raises(KnowlensError, match="runs after the probe's hook"):
        check_explain_hooks(model, early, position_hook="blocks.1.hook_resid_pre")
    with pytest.raises(KnowlensError, match="not a residual hook"):
        check_explain_hooks(model, probe, position_hook="blocks.0.attn.hook_z")
    assert check_explain_hooks(model, probe) == "blocks.0.hook_resid_pre" and not hooks_on(model)


def test_nothing_left_on_the_model_after_a_failure(model, sae, probe, monkeypatch):
    attribute_reads(model, TOKENS, [3], probe, sae=sae)
    assert all(p.grad is None for p in model.parameters()) and not hooks_on(model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.blocks[1].mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attribute_reads(model, TOKENS, [3], probe, sae=sae)
    assert not hooks_on(model) and all(p.grad is None for p in model.parameters())


def test_label_generation_explains_only_unreliable_tokens(tmp_path):
    words = word_level_model()
    probe = make_probe(tmp_path, words)
    words_sae = build_sae(hook=SAE_HOOK)
    labels = label_generation(words, ["w4 w5", "w6 w7 w8"], [probe], max_new_tokens=6, threshold=0.7, explain=True,
                              sae=words_sae, explain_top_k=3)  # fmt: skip
    tokens = [t for g in labels for t in g.tokens]
    assert any(t.label == "unreliable" for t in tokens) and any(t.label == "reliable" for t in tokens)
    for t in tokens:
        assert (t.explanation is not None) == (t.label == "unreliable")
        if t.explanation is not None:  # the decision explained is the one behind p_reliable
            p = float(probe.calibration.apply(torch.tensor(t.explanation.decision, dtype=torch.float64)))
            assert p == pytest.approx(t.p_reliable, abs=1e-4)
            assert len(t.explanation.positions) == 3 and len(t.explanation.latents) == 3
    ex = labels.params["explain"]
    assert ex["tokens"] == sum(t.label == "unreliable" for t in tokens) and ex["seconds_per_token"] > 0
    path = labels.to_jsonl(tmp_path / "l.jsonl")
    recs = [t for line in path.read_text().splitlines() for t in json.loads(line)["tokens"]]
    assert all(("explanation" in t) == (t["label"] == "unreliable") for t in recs)
    assert "of the attribution" in labels.to_html(tmp_path / "r.html").read_text()  # the why, on hover
    check = check_explanations(words, labels, probe, words_sae, sample=8)
    assert 1 <= len(check.rows) <= 8
    assert all(r["attributed"] == pytest.approx(-next(e.value for e in tokens_at(labels, r).explanation.latents
                                                      if isinstance(e.latent, int))) for r in check.rows)  # fmt: skip
    assert check.sign_agreement >= 0.5  # first order of a small ablation: the signs mostly agree


def tokens_at(labels, r):
    return next(t for g in labels if g.row == r["row"] for t in g.tokens if t.index == r["index"])
