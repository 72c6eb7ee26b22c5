"""locate_surprise: latents planted as functions of the model's own surprisal rank first (and only when aligned
with the token whose surprisal it is); Spearman agrees with scipy under ties; the ridge direction recovers a
linear target and not noise, split by sequence; the frequency filter; save/load; no hook left behind."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from knowlens.errors import KnowlensError
from knowlens.saes import SurpriseResult, input_surprisal, locate_surprise
from knowlens.saes.stats import grouped_holdout, ridge_fit, spearman
from tests.helpers import build_model

HOOK = "blocks.1.hook_resid_post"  # d_model 32 in the helpers' model
D_SAE = 12
ROWS, POS = 12, 16


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks]


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def data(model):
    """Random token rows, right padding masked out (row i keeps POS - i % 4 positions), and the surprisal."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (ROWS, POS), generator=gen)
    mask = torch.ones(ROWS, POS, dtype=torch.bool)
    for i in range(ROWS):
        mask[i, POS - i % 4 :] = False
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).double(), -1)
    s = torch.zeros(ROWS, POS, dtype=torch.float64)
    s[:, 1:] = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return tokens, mask, s


def planted_sae(planted, generic=None):
    """A real StandardSAE (so the model checks run) whose ``encode`` returns ``planted`` (rows, pos, d_sae) slices
    in call order; calls on activations of ``generic``'s shape return ``generic`` instead."""
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK))).eval()
    state = {"row": 0}

    def encode(x):
        if generic is not None and x.shape[1] == generic.shape[1]:
            return generic[: x.shape[0]].to(x.dtype)
        assert x.shape[1] == planted.shape[1]
        out = planted[state["row"] : state["row"] + x.shape[0]]
        state["row"] += x.shape[0]
        return out.to(x.dtype)

    sae.encode = encode
    return sae


def planted_acts(s, mask, seed=1):
    """Latent 3 = log1p(s) (rises with s), 5 = 1/(1+s) (falls), 7 = the *next* token's surprisal (wrong
    alignment), 0 = sparse noise; 3 takes 1000 at position 0 and on padding, where it must not be counted."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.zeros(*s.shape, D_SAE, dtype=torch.float64)
    acts[..., 0] = (torch.rand(s.shape, generator=gen) < 0.3) * torch.rand(s.shape, generator=gen)
    acts[..., 3] = torch.log1p(s)
    acts[..., 5] = 1 / (1 + s)
    acts[:, :-1, 7] = s[:, 1:]
    acts[..., 3][~mask] = 1000.0
    acts[:, 0, 3] = 1000.0
    return acts


def test_input_surprisal_is_minus_log_prob_of_the_token(model, data):
    tokens, _, s = data
    got = input_surprisal(model, tokens, batch_size=5)
    assert got[:, 0].isnan().all()
    torch.testing.assert_close(got[:, 1:], s[:, 1:])
    assert (got[:, 1:] > 0).all()


def test_planted_latents_rank_first_with_their_sign(model, data):
    tokens, mask, s = data
    sae = planted_sae(planted_acts(s, mask))
    res = locate_surprise(model, sae, tokens, mask=mask, max_frequency=1.0, top=3, batch_size=5)
    valid = mask.clone()
    valid[:, 0] = False
    assert res.n_tokens == int(valid.sum()) and res.n_sequences == ROWS
    assert set(res.latents[:2].tolist()) == {3, 5}
    assert res.rho_all[3] == pytest.approx(1.0, abs=1e-6)  # padding and position 0 (value 1000) left out
    assert res.rho_all[5] == pytest.approx(-1.0, abs=1e-6)
    assert abs(float(res.rho_all[7])) < 0.5  # the next token's surprisal is not this token's
    assert res.rho_all[1].isnan() and 1 not in res.latents.tolist()  # never active: no rho, never ranked
    assert res.decoder.shape == (3, 32)
    torch.testing.assert_close(res.decoder, sae.W_dec.detach()[res.latents])
    assert res.rho.tolist() == res.rho_all[res.latents].tolist()
    assert res.surprisal_mean == pytest.approx(float(s[valid].mean()))
    assert hooks_left(model) == []


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    n = 300
    x = torch.randint(-2, 4, (n, 6), generator=gen).double()  # ties, zeros and negatives
    x[:, 1] = x[:, 1].clamp(min=0) * (torch.rand(n, generator=gen) < 0.1)  # mostly zeros
    x[:, 2] = torch.rand(n, generator=gen) + 0.5  # no zeros, no ties
    x[:, 3] = 0.0  # constant
    x[:, 4] = -torch.rand(n, generator=gen)  # negative only
    y = torch.randint(0, 10, (n,), generator=gen).double()
    y[:40] += x[:40, 0]  # some real correlation
    got = spearman(x, y)
    for j in range(x.shape[1]):
        if j == 3:
            assert got[j].isnan()
            continue
        want = scipy.stats.spearmanr(x[:, j].numpy(), y.numpy()).statistic
        assert float(got[j]) == pytest.approx(want, abs=1e-12), j


def test_ridge_recovers_a_linear_target_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    n_seq, per_seq, d = 60, 10, 8
    scale = torch.logspace(-2, 2, d, dtype=torch.float64)  # unstandardising must undo very different scales
    x = torch.randn(n_seq * per_seq, d, generator=gen, dtype=torch.float64) * scale + 3.0
    groups = torch.arange(n_seq).repeat_interleave(per_seq)
    w = torch.randn(d, generator=gen, dtype=torch.float64) / scale
    y = 2.0 + x @ w + 0.05 * torch.randn(len(x), generator=gen, dtype=torch.float64)
    fit = ridge_fit(x, y, groups, seed=1)
    assert fit.r2 > 0.9 and fit.pearson > 0.95
    torch.testing.assert_close(x @ fit.direction + fit.intercept, x @ w + 2.0, atol=0.1, rtol=0)
    assert len(fit.cv_mse) == 7 and fit.l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

    noise = torch.randn(len(x), generator=gen, dtype=torch.float64)
    assert abs(ridge_fit(x, noise, groups, seed=1).r2) < 0.1


def test_held_out_split_is_grouped_by_sequence():
    groups = torch.tensor([g for g in range(20) for _ in range(g % 3 + 1)])
    test = grouped_holdout(groups, 0.3, seed=4)
    for g in range(20):
        side = test[groups == g]
        assert side.all() or not side.any(), g  # no sequence on both sides
    assert int(torch.unique(groups[test]).numel()) == 6
    assert not torch.equal(test, grouped_holdout(groups, 0.3, seed=5))  # the seed draws the split
    with pytest.raises(KnowlensError, match="3 or more sequences"):
        grouped_holdout(torch.tensor([0, 0, 1]), 0.3)


def test_result_split_never_shares_a_sequence(model, data):
    tokens, mask, s = data
    res = locate_surprise(model, planted_sae(planted_acts(s, mask)), tokens, mask=mask, max_frequency=1.0)
    held = res.test_sequences.tolist()
    assert 0 < len(held) < ROWS and len(set(held)) == len(held)
    valid = mask.clone()
    valid[:, 0] = False
    assert res.n_test_tokens == int(valid[held].sum())  # held-out tokens are exactly those rows' tokens


def test_frequency_filter_drops_an_always_on_latent(model, data):
    tokens, mask, s = data
    acts = planted_acts(s, mask)
    acts[..., 9] = s + 1.0  # active on every token, rho 1
    acts[..., 8] = s * (s > s[mask].median())  # active on about half the tokens, rising with s
    res = locate_surprise(model, planted_sae(acts), tokens, mask=mask, max_frequency=0.6, top=4)
    assert res.frequency_all[9] == 1.0 and res.rho_all[9] == pytest.approx(1.0)
    assert 0.4 < res.frequency_all[8] <= 0.6 and res.rho_all[8] > 0.7
    kept = res.latents.tolist()
    assert 9 not in kept and 3 not in kept and 5 not in kept  # always on (3 and 5 too), dropped despite |rho| 1
    assert (res.frequency <= 0.6).all() and (res.frequency_all[res.latents] == res.frequency).all()
    assert kept[0] == 8  # the best latent left

    # with a generic sample on which 9 is silent it is kept; frequencies come from that sample
    g_tokens = torch.randint(0, model.cfg.d_vocab, (5, 11), generator=torch.Generator().manual_seed(3))
    generic = torch.zeros(5, 11, D_SAE)
    generic[:, 1:, 5] = 1.0  # 5 active on every valid generic token
    generic[0, 1:, 0] = 1.0  # 0 active on 10 of 50 (20%: kept at max_frequency 0.2)
    generic[1, 1:2, 0] = 1.0  # ... 11 of 50 would not be; this makes 11
    generic[:, 0, 3] = 1.0  # position 0 of the generic rows never counts
    res = locate_surprise(model, planted_sae(acts, generic), tokens, mask=mask, generic_tokens=g_tokens,
                          max_frequency=0.2, top=12)  # fmt: skip
    assert res.n_generic_tokens == 50 and res.frequency_all[3] == 0.0 and res.frequency_all[0] == 11 / 50
    kept = res.latents.tolist()
    assert kept[0] in (3, 9) and 9 in kept and 5 not in kept and 0 not in kept
    generic[1, 1:2, 0] = 0.0  # now exactly 20%
    res = locate_surprise(model, planted_sae(acts, generic), tokens, mask=mask, generic_tokens=g_tokens,
                          max_frequency=0.2, top=12)  # fmt: skip
    assert res.frequency_all[0] == 0.2 and 0 in res.latents.tolist()


def test_save_load_round_trip_and_refusals(model, data, tmp_path):
    tokens, mask, s = data
    res = locate_surprise(model, planted_sae(planted_acts(s, mask)), tokens, mask=mask, max_frequency=1.0,
                          sae_label="planted")  # fmt: skip
    path = res.save(tmp_path / "surprise")
    assert path.name == "surprise.safetensors" and (tmp_path / "surprise.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["surprise.json", "surprise.safetensors"]  # no temp files
    back = SurpriseResult.load(path, model=model)
    for name in res.__dataclass_fields__:
        a, b = getattr(res, name), getattr(back, name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        elif isinstance(a, float) and math.isnan(a):
            assert math.isnan(b), name
        else:
            assert a == b, name
    assert back.sae_label == "planted" and back.hook == HOOK
    x = torch.randn(4, 32)
    torch.testing.assert_close(back.predict(x), res.predict(x))

    other = build_model(seed=1)
    with pytest.raises(KnowlensError, match="fingerprint") as err:
        SurpriseResult.load(path, model=other)
    assert "\n" not in str(err.value)

    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(KnowlensError, match="truncated") as err:
        SurpriseResult.load(path, model=model)
    assert "\n" not in str(err.value)
    path.write_bytes(data_bytes)
    (tmp_path / "surprise.json").write_text('{"format": "knowlens.surp')
    with pytest.raises(KnowlensError, match="not a readable JSON card"):
        SurpriseResult.load(path)


def test_no_hook_left_after_an_exception(model, data):
    tokens, mask, _ = data
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK))).eval()

    def broken(x):
        raise RuntimeError("encoder exploded")

    sae.encode = broken
    with pytest.raises(RuntimeError, match="encoder exploded"):
        locate_surprise(model, sae, tokens, mask=mask)
    assert hooks_left(model) == []

    # a failure in the generic-sample pass (a second hooked loop) leaves none either
    g = torch.randint(0, model.cfg.d_vocab, (2, 5))
    sae = planted_sae(torch.rand(ROWS, POS, D_SAE))
    plain = sae.encode

    def encode(x):
        if x.shape[1] == g.shape[1]:
            raise RuntimeError("generic encoder exploded")
        return plain(x)

    sae.encode = encode
    with pytest.raises(RuntimeError, match="generic encoder exploded"):
        locate_surprise(model, sae, tokens, mask=mask, generic_tokens=g)
    assert hooks_left(model) == []
