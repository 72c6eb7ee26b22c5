"""Activation patching equals TransformerLens's own patching functions (resid_pre, attn_out, mlp_out, heads at
all positions), one patch per run and batched; invariants that hold for any model (an unchanged position does
nothing, patching the only changed token at layer 0 restores the clean run); metrics; labels; errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformer_lens.patching as tl_patching

from knowlens.errors import KnowlensError
from knowlens.patching import SITES, activation_patch, activation_patch_sweep, logit_diff, token_prob
from tests.helpers import build_model, word_level_model

TL_FUNCTIONS = {
    "resid_pre": tl_patching.get_act_patch_resid_pre,
    "attn_out": tl_patching.get_act_patch_attn_out,
    "mlp_out": tl_patching.get_act_patch_mlp_out,
    "head": tl_patching.get_act_patch_attn_head_out_all_pos,
}


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks]


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def pair():
    """Two rows of 7 tokens; the corrupted prompt differs at columns 2 and 4 only."""
    clean = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % 50
    corrupted[:, 4] = (clean[:, 4] + 23) % 50
    return clean, corrupted


@pytest.fixture(scope="module")
def metric():
    return logit_diff([3, 8], [5, 9])  # one answer / wrong id per row


@pytest.fixture(scope="module")
def sweep(model, pair, metric):
    clean, corrupted = pair
    return activation_patch_sweep(model, clean, corrupted, metric)


def test_equals_transformer_lens(model, pair, metric, sweep):
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean)
    for site, tl_fn in TL_FUNCTIONS.items():
        want = tl_fn(model, corrupted, cache, metric).cpu()
        got = sweep[site].values
        assert got.shape == want.shape, site
        assert torch.equal(got.float(), want), site  # the same runs: equal after TL's float32 storage
        assert got.std() > 1e-3, site  # the patches do move the metric
    assert hooks_left(model) == []


def test_batched_patches_agree(model, pair, metric, sweep):
    clean, corrupted = pair
    for site in ("resid_pre", "head"):
        batched = activation_patch(model, clean, corrupted, metric, site=site, patches_per_pass=3)
        torch.testing.assert_close(batched.values, sweep[site].values, rtol=0, atol=1e-5)


def test_invariants(model, pair, metric, sweep):
    clean, corrupted = pair
    res = sweep["resid_pre"]
    with torch.no_grad():
        assert res.clean_metric == pytest.approx(float(metric(model(clean))), abs=1e-9)
        assert res.corrupted_metric == pytest.approx(float(metric(model(corrupted))), abs=1e-9)
    assert abs(res.clean_metric - res.corrupted_metric) > 0.1
    same = [0, 1, 3, 5, 6]  # tokens equal here: the layer-0 residual is the same, so patching changes nothing
    assert (res.values[0, same] == res.corrupted_metric).all()
    # a prompt differing in one token: patching that token's embedding restores the clean run exactly
    one = clean.clone()
    one[:, 2] = corrupted[:, 2]
    single = activation_patch(model, clean, one, metric, site="resid_pre")
    torch.testing.assert_close(single.recovered()[0, 2], torch.tensor(1.0, dtype=torch.float64))
    assert single.recovered()[0, [0, 1, 3]].abs().max() == 0
    # the last block's attention and MLP outputs at a column only reach that column's logits: before the
    # final column (the metric's) they change nothing, at it they do
    for site in ("attn_out", "mlp_out"):
        last = sweep[site].values[-1]
        assert (last[:-1] == res.corrupted_metric).all() and last[-1] != res.corrupted_metric, site


def test_metrics_are_what_they_say():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 10, generator=g)
    torch.testing.assert_close(
        logit_diff(3, 5)(logits), (logits[:, -1, 3] - logits[:, -1, 5]).double().mean()
    )
    torch.testing.assert_close(
        logit_diff([3, 4], [5, 6], position=1)(logits),
        ((logits[0, 1, 3] - logits[0, 1, 5]) + (logits[1, 1, 4] - logits[1, 1, 6])).double() / 2,
    )
    p = torch.softmax(logits[:, -1].double(), -1)
    torch.testing.assert_close(token_prob([2, 7])(logits), (p[:, 2] + p[:, 7]).mean())
    torch.testing.assert_close(token_prob(torch.tensor(2))(logits), p[:, 2].mean())
    assert token_prob([2, 7]).name == "token_prob(ids=[2, 7], position=-1)"
    with pytest.raises(KnowlensError, match="3 ids given for 2 batch rows"):
        logit_diff([1, 2, 3], 0)(logits)
    with pytest.raises(KnowlensError, match="integer"):
        token_prob([True])


def test_result_labels_and_dict(sweep, model):
    res = sweep["resid_pre"]
    assert res.axes == ("layer", "pos") and res.values.shape == (2, 7)
    assert res.labels[0] == ("0", "1") and len(res.labels[1]) == 7
    assert res.labels[1][2].startswith("2:") and "|" in res.labels[1][2] and "|" not in res.labels[1][3]
    assert res.metric_name.startswith("logit_diff(answer=[3, 8], wrong=[5, 9]")
    heads = sweep["head"]
    assert heads.axes == ("layer", "head") and heads.values.shape == (2, model.cfg.n_heads)
    assert heads.hook == "blocks.{layer}.attn.hook_z"
    d = json.loads(json.dumps(res.to_dict()))
    assert d["values"] == res.values.tolist() and d["labels"]["pos"] == list(res.labels[1])
    torch.testing.assert_close(torch.tensor(d["recovered"], dtype=torch.float64), res.recovered())
    assert set(sweep) == set(SITES)


def test_text_prompts_progress_and_errors(capsys):
    words = word_level_model()
    res = activation_patch(words, "w1 w2 w3", "w1 w9 w3", token_prob([5]), site="mlp_out", progress=True)
    assert res.labels[1] == ("0:<bos>", "1:w1", "2:w2|w9", "3:w3")
    assert "activation patching" in capsys.readouterr().err  # the tqdm bar
    with pytest.raises(KnowlensError, match=r"same shape .* clean \(1, 4\), corrupted \(1, 5\)"):
        activation_patch(words, "w1 w2 w3", "w1 w2 w3 w4", token_prob([5]))
    with pytest.raises(KnowlensError, match="unknown patching site 'resid_post'"):
        activation_patch(words, "w1", "w2", token_prob([5]), site="resid_post")
    with pytest.raises(KnowlensError, match="must return a scalar"):
        activation_patch(words, "w1", "w2", lambda logits: logits[:, -1])
    assert hooks_left(words) == []
