"""Bad input to `generate` gives one-line KnowlensErrors; any failure leaves no hook on the model."""

import pytest
import torch

from knowlens.capture import generate
from knowlens.capture.hooks import stop_layer_for, validate_hook_names
from knowlens.errors import HookNameError, KnowlensError
from tests.helpers import build_model


@pytest.fixture(scope="module")
def model():
    return build_model()


def no_hooks_left(model) -> bool:
    return all(len(hp.fwd_hooks) == 0 and len(hp.bwd_hooks) == 0 for hp in model.hook_dict.values())


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([], {}, "no prompts"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 2], [3, 99]], {}, "token id 99 outside the vocabulary"),
        ([[1, -1]], {}, "token id -1"),
        ([[1.5, 2.0]], {}, "integer token ids"),
        ([[[1, 2]]], {}, "1-D"),
        ([list(range(1, 50)) + [1] * 10], {"max_new_tokens": 10}, "exceeds the model's context of 64"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ([[1, 2]], {"temperature": -1.0}, "temperature"),
        ([[1, 2]], {"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ([[1, 2]], {"hooks": ["blocks.1.hook_resid_pots"]}, "blocks.1.hook_resid_post"),
    ],
)
def test_bad_input_is_a_one_line_knowlens_error(model, prompts, kwargs, match):
    args = {"hooks": ["blocks.0.hook_resid_post"], "max_new_tokens": 3, **kwargs}
    with pytest.raises(KnowlensError, match=match) as info:
        generate(model, prompts, **args)
    assert "\n" not in str(info.value)
    assert no_hooks_left(model)


def test_unknown_hook_lists_the_closest_names(model):
    with pytest.raises(HookNameError) as info:
        validate_hook_names(model, ["blocks.0.attn.hook_patern"])
    msg = str(info.value)
    assert "unknown hook name 'blocks.0.attn.hook_patern'" in msg and "blocks.0.attn.hook_pattern" in msg


def test_disabled_hook_point_is_refused_with_the_reason(model):
    assert not model.cfg.use_attn_result
    with pytest.raises(HookNameError, match="disabled in this model's config"):
        validate_hook_names(model, ["blocks.0.attn.hook_result"])


def test_hook_names_are_deduplicated_in_order(model):
    names = validate_hook_names(model, ["blocks.1.hook_resid_post", "hook_embed", "blocks.1.hook_resid_post"])
    assert names == ("blocks.1.hook_resid_post", "hook_embed")


def test_stop_layer_is_the_last_block_needed(model):
    assert stop_layer_for(model, ["hook_embed"]) == 0
    assert stop_layer_for(model, ["blocks.0.hook_resid_post", "hook_pos_embed"]) == 1
    assert stop_layer_for(model, ["blocks.1.attn.hook_pattern", "blocks.0.hook_mlp_out"]) == 2
    assert stop_layer_for(model, ["blocks.0.hook_resid_post", "ln_final.hook_normalized"]) is None
    assert stop_layer_for(model, []) == 0


def test_a_callback_exception_propagates_and_removes_the_hooks(model):
    class Boom(RuntimeError):
        pass

    def on_step(state):
        if state.step == 2:
            raise Boom("callback failed")

    with pytest.raises(Boom, match="callback failed"):
        generate(model, [[1, 2, 3]], hooks=["blocks.1.hook_resid_post"], max_new_tokens=5, on_step=on_step)
    assert no_hooks_left(model)
    # the model still works and is unchanged afterwards
    rec = generate(model, [[1, 2, 3]], hooks=["blocks.1.hook_resid_post"], max_new_tokens=5, stop_at_eos=False)
    assert rec.generated_mask.sum().item() == 5


def test_a_failure_inside_the_forward_pass_removes_the_hooks(model):
    def broken(act, hook):
        raise ValueError("hook exploded")

    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", broken)]):
        with pytest.raises(ValueError, match="hook exploded"):
            generate(model, [[1, 2]], hooks=["blocks.1.hook_resid_post"], max_new_tokens=2)
        # only knowlens's own hooks are gone; the caller's context still owns its hook
        assert len(model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks) == 1
        assert len(model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks) == 0
    assert no_hooks_left(model)


def test_prompts_as_a_2d_tensor_and_as_1d_tensors(model):
    a = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), hooks=[], max_new_tokens=3, stop_at_eos=False)
    b = generate(model, [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])], hooks=[], max_new_tokens=3, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens)
    assert a.tokens.shape == (2, 6)
