"""ActivationRecord: exact safetensors round trip, clear errors on bad files, concatenation."""

import json

import pytest
import torch
from safetensors.torch import save_file

from knowlens.capture import ActivationRecord, generate
from knowlens.capture.record import concat_records
from knowlens.errors import KnowlensError
from tests.helpers import build_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_attn_scores"]


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def record(model):
    return generate(
        model, [[1, 2, 3], [4, 5, 6, 7, 8]], hooks=HOOKS, max_new_tokens=4, temperature=1.0, seed=0, eos_token_id=9
    )


def assert_records_equal(a: ActivationRecord, b: ActivationRecord):
    for name in ("tokens", "prompt_mask", "generated_mask", "pad_mask", "logprobs", "entropy", "top1_prob"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.hook_names == b.hook_names
    for hook in a.hook_names:
        x, y = a.activations[hook], b.activations[hook]
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isinf(), y.isinf()), hook
    assert (a.prompt_len, a.pad_token_id, a.eos_token_ids, a.meta) == (
        b.prompt_len,
        b.pad_token_id,
        b.eos_token_ids,
        b.meta,
    )


def test_save_load_round_trips_exactly(record, tmp_path):
    path = record.save(tmp_path / "sub" / "rec.safetensors")
    loaded = ActivationRecord.load(path)
    assert_records_equal(record, loaded)
    assert loaded.eos_token_ids == (9,) and loaded.meta["seed"] == "0"
    assert not list(tmp_path.glob("**/*.tmp"))


def test_save_load_half_precision_round_trips(model, tmp_path):
    half = build_model(dtype=torch.bfloat16)
    rec = generate(half, [[1, 2]], hooks=["blocks.1.hook_resid_post"], max_new_tokens=2, stop_at_eos=False)
    assert rec.activations["blocks.1.hook_resid_post"].dtype == torch.bfloat16
    assert_records_equal(rec, ActivationRecord.load(rec.save(tmp_path / "h.safetensors")))


def test_truncated_file_is_a_one_line_error_naming_it(record, tmp_path):
    path = record.save(tmp_path / "rec.safetensors")
    data = path.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(KnowlensError) as info:
            ActivationRecord.load(bad)
        msg = str(info.value)
        assert str(bad) in msg and "\n" not in msg


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(KnowlensError, match="does not exist"):
        ActivationRecord.load(tmp_path / "nope.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(KnowlensError, match="not a knowlens activation record"):
        ActivationRecord.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text(json.dumps({"hello": 1}))
    with pytest.raises(KnowlensError, match=str(garbage)):
        ActivationRecord.load(garbage)


def test_concat_equals_one_batched_call(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12]]
    kw = dict(hooks=HOOKS + ["blocks.0.attn.hook_pattern"], max_new_tokens=5, stop_at_eos=False)
    whole = generate(model, prompts, **kw)
    parts = concat_records([generate(model, prompts[:2], **kw), generate(model, prompts[2:], **kw)])
    for name in ("tokens", "prompt_mask", "generated_mask", "pad_mask"):
        assert torch.equal(getattr(whole, name), getattr(parts, name)), name
    for name in ("logprobs", "entropy", "top1_prob"):
        torch.testing.assert_close(getattr(whole, name), getattr(parts, name), atol=1e-5, rtol=0)
    for hook in whole.hook_names:
        a, b = whole.activations[hook], parts.activations[hook]
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=hook)
    assert whole.prompt_len == parts.prompt_len == 6


def test_concat_refuses_mismatched_hooks(model):
    a = generate(model, [[1]], hooks=["hook_embed"], max_new_tokens=1)
    b = generate(model, [[1]], hooks=["blocks.0.hook_resid_post"], max_new_tokens=1)
    with pytest.raises(KnowlensError, match="differ"):
        concat_records([a, b])
    with pytest.raises(KnowlensError, match="no activation records"):
        concat_records([])
