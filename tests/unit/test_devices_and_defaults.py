"""Device checks say what is available; the CLI's training defaults are the shipped organism's recipe."""

import json

import pytest
import torch

from knowlens.cli.organism_cmd import TRAIN_DEFAULTS
from knowlens.errors import KnowlensError
from knowlens.models import check_device
from knowlens.models.devices import available_devices
from knowlens.organism.store import SHIPPED
from knowlens.organism.train import TrainConfig


def test_cpu_is_always_available():
    assert check_device("cpu") == "cpu" and available_devices()[0] == "cpu"


@pytest.mark.parametrize("device", ["bogus", "cuda:x", ""])
def test_a_malformed_device_is_one_line_naming_what_is_available(device):
    with pytest.raises(KnowlensError) as info:
        check_device(device)
    assert "available here: cpu" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so cuda is a valid device here")
def test_cuda_on_a_cpu_torch_says_so():
    with pytest.raises(KnowlensError, match=r"has no CUDA support|finds no CUDA GPU"):
        check_device("cuda")


def test_cli_training_defaults_are_the_shipped_recipe():
    shipped = json.loads((SHIPPED / "config.json").read_text())["training"]["train_config"]
    config = TrainConfig()
    for field, value in TRAIN_DEFAULTS.items():
        assert getattr(config, field) == value, field
    for field, value in shipped.items():
        if field != "threads":  # a run setting, not the recipe (the CLI leaves it to the user)
            assert getattr(config, field) == value, field
