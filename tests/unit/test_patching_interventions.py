"""Interventions: SAE-latent ablation keeps the error term (bit-exact when nothing changes), steering in units of
the residual norm, projection, patching from a cache; every one acts on every step of KV-cached generation
(knowlens's loop and TransformerLens's generate agree with a full-forward reference, a prompt-only hook does
not); absolute positions are located on decode steps; errors are one line and leave no hook behind."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from knowlens.capture import generate
from knowlens.errors import KnowlensError
from knowlens.patching import (
    ablate_latents,
    intervene,
    latent_direction,
    patch_from_cache,
    project_out,
    steer,
)
from tests.helpers import word_level_model

HOOK = "blocks.1.hook_resid_pre"
P, N = 6, 8  # prompt length, new tokens


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks]


@pytest.fixture(scope="module")
def model():
    return word_level_model()  # has a tokenizer: TransformerLens's generate then builds an attention mask


@pytest.fixture(scope="module")
def prompt():
    tokens = torch.randint(4, 50, (2, P), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1  # BOS
    return tokens


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=48, metadata=SAEMetadata(hook_name=HOOK))).eval()
    with torch.no_grad():
        sae.b_enc[7] = -1e4  # latent 7 never fires
    return sae


def run(model, tokens, fwd_hooks=()):
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        return model(tokens)


def captured(model, tokens, hook_name, fwd_hooks=()):
    """The activation at ``hook_name`` after the given hooks edited it (capture hook added last)."""
    out = {}

    def keep(x, hook):
        out["x"] = x.clone()

    run(model, tokens, [*fwd_hooks, (hook_name, keep)])
    return out["x"]


def reference(model, prompt, fwd_hooks=()):
    """Greedy tokens from full forwards over the whole sequence at every step (no cache), hooks on each."""
    tokens = prompt.clone()
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(N):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


def cached(model, prompt, *interventions):
    with intervene(model, *interventions):
        return generate(model, prompt, hooks=[], max_new_tokens=N, stop_at_eos=False).tokens


# ------------------------------------------------------------------------------------------------ ablation


def test_ablation_that_changes_nothing_is_bit_exact(model, prompt, sae):
    base = run(model, prompt)
    calls = []
    encode = sae.encode
    sae.encode = lambda x: (calls.append(1), encode(x))[1]
    try:
        for iv in (ablate_latents(sae, []), ablate_latents(sae, [3, 5], scale=1.0)):
            assert torch.equal(run(model, prompt, iv), base)
        assert calls == []  # short-circuited: the SAE never ran
        # latent 7 is 0 everywhere: setting it to 0 runs the SAE, and the change is exactly zero
        iv = ablate_latents(sae, [7], value=0.0)
        assert torch.equal(run(model, prompt, iv), base)
        assert calls == [1]
    finally:
        del sae.encode
    assert hooks_left(model) == []


def test_ablation_keeps_the_error_term(model, prompt, sae):
    x = captured(model, prompt, HOOK)
    with torch.no_grad():
        f = sae.encode(x)
        active = (f > 0).sum((0, 1))
        latents = active.argsort(descending=True)[:3].tolist()  # the three most active latents
        assert int(active[latents[-1]]) > 0
        f_zero = f.clone()
        f_zero[..., latents] = 0.0
        want = sae.decode(f_zero) + (x - sae.decode(f))
        f_half = f.clone()
        f_half[..., latents] *= 0.5
        want_half = sae.decode(f_half) + (x - sae.decode(f))
    got = captured(model, prompt, HOOK, ablate_latents(sae, latents))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - x).abs().max() > 1e-2  # it did change the activation
    torch.testing.assert_close(
        captured(model, prompt, HOOK, ablate_latents(sae, latents, scale=0.5)), want_half
    )
    torch.testing.assert_close(captured(model, prompt, HOOK, ablate_latents(sae, latents, scale=0.0)), got)
    # one value per latent, in the order given
    with torch.no_grad():
        f_set = f.clone()
        f_set[..., latents[1]], f_set[..., latents[0]] = 1.5, -0.5
        want_set = sae.decode(f_set) + (x - sae.decode(f))
    iv = ablate_latents(sae, [latents[1], latents[0]], value=[1.5, -0.5])
    torch.testing.assert_close(captured(model, prompt, HOOK, iv), want_set)
    assert not torch.equal(run(model, prompt, ablate_latents(sae, latents)), run(model, prompt))

    # positions: only column 3 changes; the others are the original activation bit for bit
    got3 = captured(model, prompt, HOOK, ablate_latents(sae, latents, positions=[3]))
    assert torch.equal(got3[:, 3], got[:, 3])
    keep = [c for c in range(P) if c != 3]
    assert torch.equal(got3[:, keep], x[:, keep])
    last = captured(model, prompt, HOOK, ablate_latents(sae, latents, positions="last"))
    assert torch.equal(last[:, -1], got[:, -1]) and torch.equal(last[:, :-1], x[:, :-1])


def test_latent_direction_is_the_decoder_row(sae):
    d = latent_direction(sae, 4)
    assert torch.equal(d, sae.W_dec[4].detach()) and not d.requires_grad
    with pytest.raises(KnowlensError, match=r"\[0, 48\)"):
        latent_direction(sae, 48)


# ------------------------------------------------------------------------------------- steer and project


def test_steer_adds_alpha_times_the_residual_norm(model, prompt):
    x = captured(model, prompt, HOOK)
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    iv = steer(HOOK, 3 * d, 2.0)
    assert iv.params["unit"] == "resid_norm" and iv.params["alpha"] == 2.0
    assert iv.params["direction_norm"] == pytest.approx(float(3 * d.norm()), rel=1e-6)
    added = captured(model, prompt, HOOK, iv) - x
    norms = x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(added, 2.0 * norms * d / d.norm(), rtol=1e-5, atol=1e-5)
    ratio = added.norm(dim=-1) / x.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0))  # "2x the residual norm", per token
    raw = captured(model, prompt, HOOK, steer(HOOK, d, 0.5, unit="raw")) - x
    torch.testing.assert_close(raw, (0.5 * d).expand_as(raw), rtol=1e-5, atol=1e-5)
    with pytest.raises(KnowlensError, match="zero"):
        steer(HOOK, torch.zeros(32), 1.0)


def test_project_out_removes_the_span_and_nothing_else(model, prompt):
    x = captured(model, prompt, HOOK)
    g = torch.Generator().manual_seed(2)
    dirs = torch.randn(2, 32, generator=g)
    q, _ = torch.linalg.qr(dirs.T)  # (32, 2) orthonormal
    rows = torch.cat([dirs, dirs[:1] * 2])  # 3 rows spanning 2 dimensions
    got = captured(model, prompt, HOOK, project_out(HOOK, rows))
    assert project_out(HOOK, rows).params["rank"] == 2
    assert (got @ q).abs().max() < 1e-5
    torch.testing.assert_close(got, x - (x @ q) @ q.T, rtol=1e-5, atol=1e-5)
    one = captured(model, prompt, HOOK, project_out(HOOK, dirs[0]))
    assert (one @ dirs[0]).abs().max() < 1e-4 and (one @ q[:, 1]).abs().max() > 1e-2


def test_patch_from_cache_copies_the_selected_columns(model, prompt):
    clean = prompt.flip(0)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=HOOK)
    x = captured(model, prompt, HOOK)
    got = captured(model, prompt, HOOK, patch_from_cache(HOOK, cache, positions=slice(2, 4)))
    assert torch.equal(got[:, 2:4], cache[HOOK][:, 2:4])
    assert torch.equal(got[:, [0, 1, 4, 5]], x[:, [0, 1, 4, 5]])
    everything = run(model, prompt, patch_from_cache(HOOK, cache[HOOK]))  # a tensor source, all columns
    torch.testing.assert_close(everything, run(model, clean))
    with pytest.raises(KnowlensError, match="column 6 is selected but the source has only 6 columns"):
        run(model, torch.cat([prompt, prompt[:, :1]], 1), patch_from_cache(HOOK, cache))
    assert hooks_left(model) == []


# ----------------------------------------------------------------------------- every step of generation


def test_steering_acts_on_every_decoding_step(model, prompt):
    d = torch.randn(32, generator=torch.Generator().manual_seed(3))
    iv = steer("blocks.0.hook_resid_post", d, 3.0)
    want = reference(model, prompt, iv)
    assert not torch.equal(want, reference(model, prompt))  # steering changes the continuation
    assert torch.equal(cached(model, prompt, iv), want)  # knowlens's KV-cached loop
    with intervene(model, iv):
        tl = model.generate(prompt, max_new_tokens=N, use_past_kv_cache=True, stop_at_eos=False, verbose=False,
                            do_sample=False)  # fmt: skip
    assert torch.equal(tl, want)  # TransformerLens's KV-cached generate

    # control: the same hook acting on the prompt pass only (a steering bug seen in other tools) differs
    name, fn = next(iter(iv))
    prompt_only = (name, lambda x, hook: fn(x, hook) if x.shape[1] > 1 else None)
    with model.hooks(fwd_hooks=[prompt_only]):
        control = generate(model, prompt, hooks=[], max_new_tokens=N, stop_at_eos=False).tokens
    assert torch.equal(control[:, :P], want[:, :P]) and not torch.equal(control, want)
    assert hooks_left(model) == []


@pytest.mark.parametrize(
    "hook_name, positions",
    [
        ("blocks.0.hook_resid_pre", slice(P + 2, None)),  # before any attention: offset guessed, then checked
        ("blocks.1.hook_resid_pre", [2, P + 1, P + 4]),  # offset from block 0's attention scores
        ("blocks.0.hook_resid_post", "last"),
        ("blocks.1.attn.hook_z", slice(1, None, 2)),
    ],
)
def test_absolute_positions_on_decode_steps(model, prompt, hook_name, positions):
    width = 32
    d = torch.randn(width, generator=torch.Generator().manual_seed(4))
    iv = steer(hook_name, d, 4.0, positions=positions)
    want = reference(model, prompt, iv)
    if positions == "last":  # in a full forward "last" is only the final column: build the reference by hand
        want = reference(model, prompt, steer(hook_name, d, 4.0, positions=slice(P - 1, None)))
    assert not torch.equal(want, reference(model, prompt))
    assert torch.equal(cached(model, prompt, iv), want)


def test_ablation_and_patching_act_on_every_decoding_step(model, prompt, sae):
    f = None

    def keep(x, hook):
        nonlocal f
        f = sae.encode(x)

    run(model, prompt, [(HOOK, keep)])
    latents = (f > 0).sum((0, 1)).argsort(descending=True)[:4].tolist()
    iv = ablate_latents(sae, latents, scale=-2.0)
    want = reference(model, prompt, iv)
    assert not torch.equal(want, reference(model, prompt))
    assert torch.equal(cached(model, prompt, iv), want)

    # a source covering every generated column: decode step at column c reads source[:, c]
    source_tokens = torch.randint(4, 50, (2, P + N), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens, names_filter="blocks.0.hook_resid_post")
    iv = patch_from_cache("blocks.0.hook_resid_post", cache, positions=slice(P, None))
    want = reference(model, prompt, iv)
    assert not torch.equal(want, reference(model, prompt))
    assert torch.equal(cached(model, prompt, iv), want)
    assert hooks_left(model) == []


# ------------------------------------------------------------------------------------------------- errors


def test_errors_are_one_line_and_leave_no_hook(model, prompt, sae):
    d = torch.randn(32)
    with pytest.raises(KnowlensError, match="absolute columns >= 0"):
        steer(HOOK, d, 1.0, positions=-1)
    with pytest.raises(KnowlensError, match="not a per-token activation"):
        steer("blocks.0.attn.hook_pattern", d, 1.0)
    with pytest.raises(KnowlensError, match="value or scale, not both"):
        ablate_latents(sae, [1], value=0.0, scale=0.0)
    with pytest.raises(KnowlensError, match=r"latents must be in \[0, 48\)"):
        ablate_latents(sae, [48])
    with pytest.raises(KnowlensError, match="must not repeat"):
        ablate_latents(sae, [2, 2])
    with pytest.raises(KnowlensError, match="one per latent"):
        ablate_latents(sae, [1, 2], value=[0.0, 1.0, 2.0])
    with pytest.raises(KnowlensError, match="direction has 16 elements, the activation 32"):
        run(model, prompt, steer(HOOK, torch.randn(16), 1.0))
    with pytest.raises(Exception, match="hook_resid_prex"):
        with intervene(model, steer("blocks.0.hook_resid_prex", d, 1.0)):
            pass

    # a hook before block 0's attention cannot tell a fresh 1-token pass from a decode step: it must say so
    iv = steer("hook_embed", d, 2.0, positions=[0])
    with intervene(model, iv):
        run(model, prompt)  # columns 0..5; the next 1-token pass is taken to be column 6
        with pytest.raises(KnowlensError, match="assumed its pass starts at column 6, but it starts at 0"):
            run(model, prompt[:, :1])
    assert hooks_left(model) == []

    # an exception inside generation (patch source too short for the decode steps) removes every hook
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt, names_filter=HOOK)
    with pytest.raises(KnowlensError, match="column 6 is selected") as err:
        cached(model, prompt, patch_from_cache(HOOK, cache))
    assert "\n" not in str(err.value)
    assert hooks_left(model) == []
