"""Attribution patching: the estimate is the derivative of patching along the clean-minus-corrupted difference at the
corrupted run (finite differences), exact when the metric is linear in the patched activation and not otherwise,
well correlated with real activation patching where the change is small; SAE latents plus the error term add up to
the hook's attribution and a latent's estimate equals really patching that latent in a linear setting; metrics on
cached activations (a probe's score); no hook or gradient left behind. Dose-response: alpha 0 is the unsteered
model exactly, the random control has the direction's norm, the refusal matcher reads templates."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from scipy.stats import spearmanr

from knowlens.errors import KnowlensError
from knowlens.patching import (
    SITES,
    ablate_latents,
    attribute_latents,
    attribution_patch,
    attribution_patch_sweep,
    attribution_vs_activation,
    dose_response,
    logit_diff,
    measure_generations,
    random_direction_like,
    refusal_matcher,
    spearman,
    token_prob,
)
from tests.helpers import build_model, word_level_model


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks]


def pair(batch: int, pos: int, changed: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (batch, pos), generator=g)
    corrupted = clean.clone()
    for p in changed:
        corrupted[:, p] = (clean[:, p] + 1 + torch.randint(0, 49, (batch,), generator=g)) % 50
    return clean, corrupted


def real_change(check) -> torch.Tensor:
    return check.patching.values - check.patching.corrupted_metric


@pytest.fixture(scope="module")
def linear_model():
    """No LayerNorm: the logits are linear in the last block's mlp_out (and in its resid_post)."""
    return build_model(normalization_type=None)


# ----------------------------------------------------------------------------------------- residual sites


def test_estimate_is_the_derivative_at_the_corrupted_run():
    """Finite differences in float64: moving (L, p) by eps * (clean - corrupted) from the corrupted run changes the
    metric by eps * attribution[L, p], for every cell (gradient on the corrupted run, difference clean - corrupted,
    summed over batch rows and d_model). A gradient taken on the clean run or a flipped sign fails this."""
    model = build_model(dtype=torch.float64)
    clean, corrupted = pair(2, 6, (2, 4))
    metric = logit_diff([3, 8], [5, 9])
    got = attribution_patch(model, clean, corrupted, metric, site="resid_pre").values
    _, cc = model.run_with_cache(clean)
    _, ck = model.run_with_cache(corrupted)
    eps = 1e-6
    want = torch.zeros_like(got)
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_pre"
        for p in range(6):
            ends = []
            for step in (eps, -eps):

                def nudge(x, hook, step=step, p=p, name=name):
                    x = x.clone()
                    x[:, p] += step * (cc[name][:, p] - ck[name][:, p])
                    return x

                with torch.no_grad(), model.hooks(fwd_hooks=[(name, nudge)]):
                    ends.append(float(metric(model(corrupted))))
            want[layer, p] = (ends[0] - ends[1]) / (2 * eps)
    assert want.abs().max() > 0.05  # the metric does move
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_exact_when_the_metric_is_linear_in_the_patched_activation(linear_model):
    """The last block's mlp_out reaches the logits linearly (no LayerNorm): for a logit difference attribution
    equals activation patching there; through the nonlinear layer 0, or with a probability metric, it does not."""
    clean, corrupted = pair(2, 7, (2, 4))
    check = attribution_vs_activation(linear_model, clean, corrupted, logit_diff([3, 8], [5, 9]), site="mlp_out")
    real, est = real_change(check), check.attribution.values
    assert real[1].abs().max() > 0.01
    torch.testing.assert_close(est[1], real[1], rtol=1e-4, atol=1e-6)  # float32 model: rounding only
    assert (est[0] - real[0]).abs().max() > 1e-4  # layer 0 goes through layer 1: only approximately
    prob = attribution_vs_activation(linear_model, clean, corrupted, token_prob([3, 8]), site="mlp_out")
    gap = (prob.attribution.values[1] - real_change(prob)[1]).abs().max()
    assert gap > 1e-3 * real_change(prob)[1].abs().max()  # softmax: not linear, not exact


def test_correlates_with_activation_patching():
    """On a random 2-layer model with LayerNorm, one token changed in 4 rows of 10: attn_out, mlp_out and head
    attributions correlate with real patching; resid_pre too from layer 1 on. At layer 0 resid_pre the patch swaps
    a whole token embedding, where a first-order estimate is known to be poor; it is left out."""
    model = build_model()
    clean, corrupted = pair(4, 10, (3,))
    metric = logit_diff(3, 5)
    for site in ("attn_out", "mlp_out", "head"):
        check = attribution_vs_activation(model, clean, corrupted, metric, site=site, patches_per_pass=4)
        assert check.pearson > 0.9, (site, check.pearson)
        assert check.n_cells == check.patching.values.numel()
    check = attribution_vs_activation(model, clean, corrupted, metric, site="resid_pre")
    x, y = check.attribution.values[1:].flatten(), real_change(check)[1:].flatten()
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.9
    # the reported correlations are the real ones
    x, y = check.attribution.values.flatten(), real_change(check).flatten()
    assert check.pearson == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-9)
    assert check.spearman == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-9)  # ties: many zeros
    assert check.max_abs_error == pytest.approx(float((x - y).abs().max()))


def test_sweep_layout_and_nothing_left_behind():
    model = build_model()
    clean, corrupted = pair(2, 5, (1,))
    metric = logit_diff(3, 5)
    sweep = attribution_patch_sweep(model, clean, corrupted, metric)
    assert set(sweep) == set(SITES)
    for site, res in sweep.items():
        width = 4 if site == "head" else 5
        assert res.values.shape == (2, width) and res.values.dtype == torch.float64
        assert res.axes == ("layer", "head" if site == "head" else "pos")
        assert len(res.labels[1]) == width
        single = attribution_patch(model, clean, corrupted, metric, site=site)
        torch.testing.assert_close(single.values, res.values, rtol=0, atol=1e-7)
    res = sweep["resid_pre"]
    with torch.no_grad():
        assert res.clean_metric == pytest.approx(float(metric(model(clean))), abs=1e-6)
        assert res.corrupted_metric == pytest.approx(float(metric(model(corrupted))), abs=1e-6)
    torch.testing.assert_close(res.estimated(), res.corrupted_metric + res.values)
    assert res.values[:, 0].abs().max() == 0  # position 0 is the same in both runs and comes first
    assert hooks_left(model) == []
    assert all(p.grad is None for p in model.parameters())  # no gradient reaches a parameter


def test_errors_are_one_line_and_leave_no_hook():
    model = build_model()
    clean, corrupted = pair(1, 5, (2,))

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patch(model, clean, corrupted, broken)
    assert hooks_left(model) == []
    with pytest.raises(KnowlensError, match="does not depend differentiably"):
        attribution_patch(model, clean, corrupted, lambda logits: logits[0, -1, 3].detach())
    with pytest.raises(KnowlensError, match="scalar tensor"):
        attribution_patch(model, clean, corrupted, lambda logits: 0.5)
    with pytest.raises(KnowlensError, match="same shape"):
        attribution_patch(model, clean, corrupted[:, :4], logit_diff(3, 5))
    with pytest.raises(KnowlensError, match="unknown patching site"):
        attribution_patch(model, clean, corrupted, logit_diff(3, 5), site="resid_mid")
    with pytest.raises(KnowlensError, match="unknown hook name"):
        attribution_patch(model, clean, corrupted, lambda logits, acts: logits.sum(), metric_hooks=["blocks.7.x"])
    assert hooks_left(model) == []
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------- metric on activations


def test_metric_on_cached_activations_such_as_a_probe_score(linear_model):
    """A linear probe on the last resid_post (a cached activation, not the logits): its attribution equals real
    patching at the last block's mlp_out exactly, and the real patching reads the probe after the patch."""
    hook = "blocks.1.hook_resid_post"
    w = torch.randn(32, generator=torch.Generator().manual_seed(1))

    def probe(logits, acts):
        return (acts[hook][:, -1] @ w).mean()

    clean, corrupted = pair(2, 6, (1, 3))
    check = attribution_vs_activation(linear_model, clean, corrupted, probe, site="mlp_out", metric_hooks=[hook])
    real = real_change(check)
    assert real[1].abs().max() > 0.01
    torch.testing.assert_close(check.attribution.values[1], real[1], rtol=1e-4, atol=1e-6)
    _, cache = linear_model.run_with_cache(clean)
    assert check.patching.clean_metric == pytest.approx(float((cache[hook][:, -1] @ w).mean()), abs=1e-5)
    assert check.pearson > 0.9
    assert hooks_left(linear_model) == []


# -------------------------------------------------------------------------------------------- SAE latents


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=32, d_sae=48, metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out"))).eval()


def test_latents_and_error_term_add_up_to_the_hook(linear_model, sae):
    clean, corrupted = pair(2, 6, (2, 4))
    metric = logit_diff([3, 8], [5, 9])
    lat = attribute_latents(linear_model, sae, clean, corrupted, metric)
    assert lat.values.shape == (6, 48) and lat.error.shape == (6,) and lat.hook == "blocks.1.hook_mlp_out"
    site = attribution_patch(linear_model, clean, corrupted, metric, site="mlp_out").values[1]
    torch.testing.assert_close(lat.per_position(), site, rtol=1e-4, atol=1e-6)
    assert lat.error.abs().max() > 1e-3  # a random SAE reconstructs badly: the error term carries real weight
    assert lat.values.abs().max() > 1e-3
    top = lat.top(60)
    assert len(top) == 60 and abs(top[0]["value"]) >= abs(top[-1]["value"])
    assert any(t["latent"] == "error" for t in top)
    torch.testing.assert_close(lat.per_latent(), lat.values.sum(0))
    assert hooks_left(linear_model) == []


def test_a_latent_estimate_equals_patching_that_latent_when_linear(linear_model, sae):
    """Setting latent i at position t of the corrupted run to its clean value (error term kept) changes a metric
    linear in the hook's activation by exactly the latent's attribution."""
    clean, corrupted = pair(1, 6, (2, 4), seed=3)
    metric = logit_diff(3, 5)
    lat = attribute_latents(linear_model, sae, clean, corrupted, metric)
    _, cache = linear_model.run_with_cache(clean)
    f_clean = sae.encode(cache["blocks.1.hook_mlp_out"]).detach()
    checked = 0
    for cell in lat.top(8):
        if cell["latent"] == "error":
            continue
        t, i = cell["position"], cell["latent"]
        edit = ablate_latents(sae, [i], value=float(f_clean[0, t, i]), positions=[t])
        with torch.no_grad(), linear_model.hooks(fwd_hooks=list(edit)):
            patched = float(metric(linear_model(corrupted)))
        assert patched - lat.corrupted_metric == pytest.approx(cell["value"], rel=1e-3, abs=1e-6)
        checked += 1
    assert checked >= 4


# --------------------------------------------------------------------------------------------- dose-response


@pytest.fixture(scope="module")
def words():
    return word_level_model()


PROMPTS = ["w5 w6 w7", "w8 w9 w10 w11", "w12 w13"]


def test_alpha_zero_is_the_unsteered_model_exactly(words):
    hook = "blocks.1.hook_resid_pre"
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    is_refusal = refusal_matcher(["w20 w21"])
    kw = {"max_new_tokens": 6, "is_refusal": is_refusal, "refusal_ids": [20]}
    base = measure_generations(words, PROMPTS, **kw)
    dose = dose_response(words, PROMPTS, direction, hook, [0.0, 3.0], control="random", seed=1, **kw)
    assert [r["direction"] for r in dose.rows] == ["target", "target", "random", "random"]
    for name in ("target", "random"):
        zero = [p for p in dose.per_prompt if p["direction"] == name and p["alpha"] == 0.0]
        assert [{k: v for k, v in p.items() if k not in ("direction", "alpha")} for p in zero] == base  # bit for bit
    steered = [p for p in dose.per_prompt if p["direction"] == "target" and p["alpha"] == 3.0]
    assert [p["text"] for p in steered] != [b["text"] for b in base]  # steering does act
    assert [p["refusal_prob"] for p in steered] != [b["refusal_prob"] for b in base]
    row = dose.rows[1]
    assert row["n_prompts"] == 3 and row["refusal_rate"] == sum(p["refused"] for p in steered) / 3
    assert row["entropy_answer"] == pytest.approx(sum(p["entropy_answer"] for p in steered) / 3)
    fig = dose.figure()
    assert {t.name for t in fig.data} == {"target", "random"} and len(fig.data) == 2 * 4
    assert hooks_left(words) == []


def test_random_control_has_the_direction_norm():
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 7.0
    r = random_direction_like(direction, seed=1)
    assert r.shape == direction.shape and r.dtype == direction.dtype
    assert float(r.norm()) == pytest.approx(float(direction.norm()), rel=1e-6)
    assert abs(float(torch.nn.functional.cosine_similarity(r, direction, dim=0))) < 0.5
    assert torch.equal(r, random_direction_like(direction, seed=1))
    assert not torch.equal(r, random_direction_like(direction, seed=2))


def test_refusal_matcher():
    is_refusal = refusal_matcher(["I do not know .", "I have never heard of {name} ."])
    assert is_refusal("I do not know .")
    assert is_refusal("  I   do not know . Zed Nim is a city")
    assert is_refusal("I have never heard of Zed Nim .")
    assert not is_refusal("I have never heard of .")
    assert not is_refusal("Zed Nim is a city in Estria .")
    assert not is_refusal("I do not")
    default = refusal_matcher()  # the shipped organism's
    assert default("I have never heard of Ab Quin .") and not default("Ab Quin works as a painter .")
    with pytest.raises(KnowlensError):
        refusal_matcher([])
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 5.0]), torch.tensor([3.0, 1.0, 1.0, 9.0])) == pytest.approx(
        spearmanr([1, 2, 2, 5], [3, 1, 1, 9]).statistic
    )


def test_slot_refusal_probability_is_the_highest_over_the_answer(words):
    """With ``refusal_in_slot`` the refusal probability is the slot token's largest probability over the positions
    that predicted the answer, recomputed here from a plain forward of prompt + answer, one prompt at a time."""
    slot = 20
    got = measure_generations(words, PROMPTS, max_new_tokens=6, is_refusal=refusal_matcher(["w30"], slot_word="w20"),
                              refusal_ids=[slot], refusal_in_slot=True)  # fmt: skip
    at_answer = measure_generations(words, PROMPTS, max_new_tokens=6, refusal_ids=[slot],
                                    is_refusal=refusal_matcher(["w30"]))  # fmt: skip
    for prompt, g, a in zip(PROMPTS, got, at_answer):
        full = words.to_tokens(f"{prompt} {g['text']}")[0]
        p = int(words.to_tokens(prompt)[0].numel())
        with torch.no_grad():
            probs = torch.softmax(words(full[None])[0].double(), -1)[:, slot]
        expected = probs[p - 1 : p - 1 + g["n_tokens"]]
        assert g["refusal_prob"] == pytest.approx(float(expected.max()), abs=1e-6)
        assert a["refusal_prob"] == pytest.approx(float(probs[p - 1]), abs=1e-6)  # the answer position only
        assert g["refusal_prob"] >= a["refusal_prob"] - 1e-9
        assert g["refused"] == ("w20" in g["text"].split())
    assert any(g["refusal_prob"] > a["refusal_prob"] + 1e-6 for g, a in zip(got, at_answer))  # not the same figure
    assert hooks_left(words) == []
