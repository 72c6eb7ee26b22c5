"""Acceptance test of the capture stage: knowlens's generation loop equals unbatched generation and
`run_with_cache` on each final sequence, for left-padded batches, greedy and seeded sampling."""

import pytest
import torch

from knowlens.capture import ActivationRecord, StepState, generate
from tests.helpers import build_model

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
PER_TOKEN_HOOKS = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
]
QUERY_KEY_HOOKS = ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"]


@pytest.fixture(scope="module", params=["standard", "rotary"])
def model(request):
    if request.param == "rotary":
        return build_model(positional_embedding_type="rotary", rotary_dim=8)
    return build_model()


def assert_matches_run_with_cache(model, rec: ActivationRecord, hooks):
    for row in range(rec.batch_size):
        seq = rec.sequence(row)
        _, cache = model.run_with_cache(seq[None], names_filter=lambda n: n in hooks)
        for name in hooks:
            got, want = rec.activation(name, row), cache[name][0]
            assert got.shape == want.shape, (name, row)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"{name} row {row}")


def test_batched_greedy_equals_unbatched_and_run_with_cache(model):
    hooks = PER_TOKEN_HOOKS + QUERY_KEY_HOOKS + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    rec = generate(model, PROMPTS, hooks=hooks, max_new_tokens=9, stop_at_eos=False)
    assert rec.tokens.shape == (4, 7 + 9)
    for row, prompt in enumerate(PROMPTS):
        single = generate(model, [prompt], hooks=hooks, max_new_tokens=9, stop_at_eos=False)
        assert torch.equal(single.sequence(0), rec.sequence(row))
        assert rec.sequence(row)[: len(prompt)].tolist() == prompt
        # TransformerLens's own greedy generation agrees on the tokens. (Without its KV cache: TL 3.9's cached
        # generate gives a tokenizer-less model with standard positions the wrong positions after step 1.)
        tl = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=9,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            use_past_kv_cache=False,
        )
        assert torch.equal(tl[0], rec.sequence(row))
        torch.testing.assert_close(single.logprobs[0, -9:], rec.logprobs[row, -9:], atol=1e-5, rtol=0)
        if row == 0:
            assert_matches_run_with_cache(model, single, hooks)  # the unpadded path (no attention mask)
    assert_matches_run_with_cache(model, rec, hooks)


def test_masks_partition_positions_and_stats_describe_the_model(model):
    rec = generate(model, PROMPTS, hooks=["blocks.1.hook_resid_post"], max_new_tokens=5, stop_at_eos=False)
    total = rec.prompt_mask.int() + rec.generated_mask.int() + rec.pad_mask.int()
    assert bool((total == 1).all())
    assert rec.prompt_mask.sum(1).tolist() == [len(p) for p in PROMPTS]
    assert rec.generated_mask.sum(1).tolist() == [5] * 4
    assert rec.pad_mask[:, :7].sum(1).tolist() == [7 - len(p) for p in PROMPTS]
    assert bool((rec.tokens[rec.pad_mask] == rec.pad_token_id).all())
    # stats at column t describe the distribution at column t-1 that token t was chosen from
    for row in range(4):
        start, stop = rec.real_range(row)
        seq = rec.sequence(row)
        logp = torch.log_softmax(model(seq[None])[0].float(), -1)
        for col in range(7, stop):
            dist = logp[col - 1 - start]
            assert rec.logprobs[row, col].item() == pytest.approx(dist[rec.tokens[row, col]].item(), abs=1e-4)
            assert rec.top1_prob[row, col].item() == pytest.approx(dist.exp().max().item(), abs=1e-4)
            entropy = -(dist.exp() * dist).sum().item()
            assert rec.entropy[row, col].item() == pytest.approx(entropy, abs=1e-4)
            assert rec.tokens[row, col].item() == dist.argmax().item()  # greedy
    assert bool((rec.logprobs[~rec.generated_mask] == 0).all())
    assert bool((rec.activations["blocks.1.hook_resid_post"][rec.pad_mask] == 0).all())


def test_seeded_sampling_is_reproducible_and_matches_run_with_cache():
    model = build_model()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"]
    kw = dict(hooks=hooks, max_new_tokens=12, temperature=1.3, top_p=0.9, stop_at_eos=False)
    a = generate(model, PROMPTS, seed=7, **kw)
    b = generate(model, PROMPTS, seed=7, **kw)
    c = generate(model, PROMPTS, seed=8, **kw)
    greedy = generate(model, PROMPTS, hooks=hooks, max_new_tokens=12, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, greedy.tokens)
    assert_matches_run_with_cache(model, a, hooks)
    single = generate(model, [PROMPTS[1]], seed=3, **kw)
    assert_matches_run_with_cache(model, single, hooks)


def test_top_p_restricts_sampling_to_the_nucleus():
    model = build_model()
    rec = generate(model, PROMPTS, hooks=[], max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=0, stop_at_eos=False)
    greedy = generate(model, PROMPTS, hooks=[], max_new_tokens=20, stop_at_eos=False)
    assert torch.equal(rec.tokens, greedy.tokens)  # a tiny nucleus keeps only the top token


def test_eos_stops_rows_pads_after_and_trims_columns():
    model = build_model()
    probe = generate(model, PROMPTS, hooks=[], max_new_tokens=10, stop_at_eos=False)
    eos = int(probe.tokens[0, 7 + 2])  # row 0's third generated token becomes "EOS"
    hooks = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
    rec = generate(model, PROMPTS, hooks=hooks, max_new_tokens=10, eos_token_id=eos, check_eos_every=1)
    for row in range(4):
        gen = rec.tokens[row][rec.generated_mask[row]].tolist()
        full = probe.tokens[row, 7:].tolist()
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert gen == full[:cut]  # same tokens up to and including the first EOS, nothing after
    n_real = (~rec.pad_mask).sum(1)
    assert rec.tokens.shape[1] == 7 + int(rec.generated_mask.sum(1).max())
    assert bool((rec.tokens[rec.pad_mask] == rec.pad_token_id).all())
    assert n_real.tolist() == [len(p) + int(g) for p, g in zip(PROMPTS, rec.generated_mask.sum(1))]
    assert_matches_run_with_cache(model, rec, hooks)
    # checking EOS only every 4 steps gives the same record
    lazy = generate(model, PROMPTS, hooks=hooks, max_new_tokens=10, eos_token_id=eos, check_eos_every=4)
    assert torch.equal(lazy.tokens, rec.tokens) and torch.equal(lazy.pad_mask, rec.pad_mask)


def test_all_rows_stopping_ends_the_loop_early():
    model = build_model()
    probe = generate(model, [[5]], hooks=[], max_new_tokens=3, stop_at_eos=False)
    eos = int(probe.tokens[0, 1])
    steps = []
    rec = generate(model, [[5]], hooks=[], max_new_tokens=40, eos_token_id=[eos, 49], check_eos_every=2,
                   on_step=lambda s: steps.append(s.step))
    assert rec.tokens.shape == (1, 2)
    assert steps == [0, 1]  # one extra step at most before the every-2-steps check


def test_on_step_gets_device_tensors_and_the_new_tokens_activations():
    model = build_model()
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    seen: list[StepState] = []

    def on_step(state):
        seen.append(
            StepState(**{**state.__dict__, "activations": {k: v.clone() for k, v in state.activations.items()}})
        )

    rec = generate(model, PROMPTS, hooks=hooks, max_new_tokens=4, stop_at_eos=False, on_step=on_step)
    assert [s.step for s in seen] == [0, 1, 2, 3] and [s.position for s in seen] == [7, 8, 9, 10]
    for s in seen:
        assert torch.equal(s.tokens, rec.tokens[:, s.position])
        assert torch.equal(s.logprobs, rec.logprobs[:, s.position])
        assert bool(s.alive.all())
        assert torch.equal(s.activations["blocks.1.hook_resid_post"], rec.activations["blocks.1.hook_resid_post"][:, s.position])
        assert torch.equal(
            s.activations["blocks.0.attn.hook_pattern"],
            rec.activations["blocks.0.attn.hook_pattern"][:, :, s.position, : s.position + 1],
        )


def test_last_generated_token_has_activations_and_final_pass_stops_early():
    model = build_model(n_layers=3)
    calls = []
    hook = "blocks.1.hook_resid_post"  # needs only blocks 0 and 1 for the final pass
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", lambda a, hook: calls.append(a.shape[1]))]):
        rec = generate(model, PROMPTS, hooks=[hook], max_new_tokens=3, stop_at_eos=False)
    # prompt pass + 2 full step passes reach block 2; the 3rd (final) pass stops before it
    assert calls == [7, 1, 1]
    last = rec.activations[hook][:, -1]
    assert bool((last.abs().sum(-1) > 0).all())
    assert_matches_run_with_cache(model, rec, [hook])


def test_captured_tensors_support_autograd():
    model = build_model()
    rec = generate(model, PROMPTS, hooks=["blocks.1.hook_resid_post"], max_new_tokens=3, stop_at_eos=False)
    acts = rec.activations["blocks.1.hook_resid_post"]
    assert not acts.is_inference()
    w = torch.zeros(acts.shape[-1], requires_grad=True)
    (acts @ w).sum().backward()
    assert w.grad is not None


def test_string_prompts_need_a_tokenizer():
    from knowlens.errors import KnowlensError

    with pytest.raises(KnowlensError, match="tokenizer"):
        generate(build_model(), ["hello"], hooks=[], max_new_tokens=2)
