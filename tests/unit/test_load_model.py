import time

import pytest

import knowlens
from knowlens.errors import ModelLoadError


def test_offline_failure_is_fast_and_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not fetch the weights of 'gpt2-small'"):
        knowlens.load_model("gpt2-small")
    assert time.perf_counter() - start < 5  # no retry loop


def test_unreachable_hub_fails_within_the_probe_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("knowlens.models.load.HUB_HOST", "hub.invalid")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable"):
        knowlens.load_model("pythia-70m", probe_timeout=1.0)
    assert time.perf_counter() - start < 5


def test_a_folder_that_is_not_an_organism(tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        knowlens.load_model(str(tmp_path))
