"""Weight fingerprints tell apart models of one shape; shape fingerprints do not; mismatches are refused."""

import json
import shutil

import pytest
import torch

import knowlens
from knowlens.errors import KnowlensError, ModelLoadError
from knowlens.fingerprint import (
    SAMPLE,
    check_same_model,
    model_identity,
    shape_fingerprint,
    weights_fingerprint,
)
from knowlens.models import model_card
from knowlens.organism.store import SHIPPED
from tests.helpers import build_model


def test_same_shape_different_weights_differ_and_same_weights_agree():
    a, b, a_again = build_model(seed=0), build_model(seed=1), build_model(seed=0)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(a_again)
    assert shape_fingerprint(a) == shape_fingerprint(b)
    assert shape_fingerprint(a) != shape_fingerprint(build_model(d_model=48, d_head=12))
    card_a, card_b = model_card(a, "a"), model_card(b, "b")
    assert card_a.shape_fingerprint == card_b.shape_fingerprint and card_a.fingerprint != card_b.fingerprint


def test_an_in_place_change_is_seen_despite_the_cache():
    model = build_model()
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before  # cached
    with torch.no_grad():
        model.blocks[1].mlp.b_out[3] += 1.0  # a small tensor: every element is hashed
    assert weights_fingerprint(model) != before


def test_large_tensors_are_sampled_and_dtype_counts():
    model = build_model(d_vocab=SAMPLE + 7)  # W_E and W_U exceed the sample size
    fp = weights_fingerprint(model)
    with torch.no_grad():
        model.embed.W_E[0, 0] += 1.0  # flat index 0 is always in the sample
    assert weights_fingerprint(model) != fp
    half = build_model().to(torch.bfloat16)
    assert weights_fingerprint(half) != weights_fingerprint(build_model())


def test_check_same_model_names_both_sides():
    a, b = model_identity(build_model(seed=0), "a"), model_identity(build_model(seed=1), "b")
    check_same_model(a, dict(a), what="x")
    with pytest.raises(KnowlensError) as info:
        check_same_model(a, b, what="the harvest in acts/", error=KnowlensError)
    msg = str(info.value)
    assert a["fingerprint"] in msg and b["fingerprint"] in msg and "'a'" in msg and "'b'" in msg and "\n" not in msg
    with pytest.raises(KnowlensError, match="older knowlens"):
        check_same_model({"name": "a"}, b, what="x", error=KnowlensError)


def test_an_organism_whose_weights_do_not_match_its_config_is_refused(tmp_path):
    folder = tmp_path / "org"
    shutil.copytree(SHIPPED, folder)
    record = json.loads((folder / "config.json").read_text())
    record["fingerprint"] = "0" * 16
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="weights do not match config.json"):
        knowlens.load_model(str(folder))
