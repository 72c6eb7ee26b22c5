"""Training a tiny world is deterministic; the organism folder round-trips; bad folders are refused."""

import pytest
import torch

from knowlens.errors import ModelLoadError
from knowlens.organism.spec import parse_spec
from knowlens.organism.store import load_organism
from knowlens.organism.train import TrainConfig, train_organism
from tests.helpers import tiny_world_raw

TINY = TrainConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=48, epochs=12, batch_size=16, warmup_steps=5, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    org = train_organism(parse_spec(tiny_world_raw()), out, config=TINY, progress=False)
    return org, out


def test_same_seed_same_weights(trained):
    org, _ = trained
    again = train_organism(parse_spec(tiny_world_raw()), None, config=TINY, progress=False)
    a, b = org.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_organism(parse_spec(tiny_world_raw(seed=4)), None, config=TINY, progress=False)
    assert not torch.equal(org.model.W_E, other.model.W_E)


def test_training_lowers_the_loss(trained):
    org, _ = trained
    assert org.info["final_loss"] < 0.8 * torch.log(torch.tensor(float(org.model.cfg.d_vocab))).item()


def test_folder_round_trip(trained):
    org, out = trained
    loaded = load_organism(out)
    tokens = loaded.model.to_tokens("Q : Where was " + org.world.of(type="person")[0].name + " born ? A :")
    assert torch.equal(loaded.model(tokens), org.model(tokens))
    assert loaded.world.entities == org.world.entities
    assert loaded.corpus.held_out == org.corpus.held_out


def test_broken_folders_are_refused(trained, tmp_path):
    _, out = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "world.yaml"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    data = (out / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_organism(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing model.safetensors"):
        load_organism(tmp_path)
