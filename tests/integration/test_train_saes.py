"""Training the organism's SAEs with sae-lens's runner on a tiny organism trained here: the folders load, the
metrics are sane and deterministic, splicing leaves no hook behind, the CLI refuses bad input; and the loss-recovered
arithmetic on SAEs whose answer is known (an exact reconstruction: 1.0; a null one: 0.0)."""

import json
import math
from dataclasses import fields

import pytest
import torch

from knowlens.cli.main import main
from knowlens.cli.organism_cmd import SAE_DEFAULTS
from knowlens.organism.spec import parse_spec
from knowlens.organism.store import load_organism
from knowlens.organism.train import TrainConfig, train_organism
from knowlens.saes import SaeTrainConfig, load_sae, sae_metrics, train_organism_saes, train_sae
from knowlens.saes.train import _encode, _pad, held_out_texts
from tests.helpers import build_model, tiny_world_raw

TINY = TrainConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=48, epochs=12, batch_size=16, warmup_steps=5, threads=1)
SAE_TINY = SaeTrainConfig(expansion=4, k=8, steps=40, batch_tokens=256, buffer_batches=4)
HOOK = "blocks.0.hook_resid_post"
PREFIX = "knowlens organism train-saes: error: "


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks]


@pytest.fixture(scope="module")
def organism_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    train_organism(parse_spec(tiny_world_raw()), out, config=TINY, progress=False)
    return out


@pytest.fixture(scope="module")
def organism(organism_dir):
    return load_organism(organism_dir)


@pytest.fixture(scope="module")
def trained(organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("saes")
    return out, train_organism_saes(organism, [HOOK], out_dir=out, config=SAE_TINY, progress=False)


def test_saved_folder_loads_and_metrics_are_sane(organism, trained):
    out, results = trained
    model = organism.model
    assert list(results) == [HOOK]
    assert sorted(p.name for p in out.iterdir()) == [HOOK]  # no temporary folder left behind
    folder = out / HOOK
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "metrics.json", "sae_weights.safetensors"]
    sae = load_sae(folder, model)
    assert sae.cfg.architecture() == "topk" and sae.cfg.d_sae == 4 * TINY.d_model
    assert sae.cfg.metadata.hook_name == HOOK

    record = results[HOOK]
    assert json.loads((folder / "metrics.json").read_text()) == record
    e = record["eval"]
    assert 0 <= e["dead_fraction"] <= 1
    assert 0 < e["l0"] <= SAE_TINY.k
    assert math.isfinite(e["explained_variance"]) and e["explained_variance"] <= 1
    assert e["ce_clean"] < e["ce_ablated"] and math.isfinite(e["ce_spliced"])
    assert e["loss_recovered"] == pytest.approx(
        (e["ce_ablated"] - e["ce_spliced"]) / (e["ce_ablated"] - e["ce_clean"])
    )
    assert e["ablation"] == "zero" and e["n_positions"] > 0 and e["rows"] == len(organism.corpus.held_out)
    assert record["target"]["met"] == (e["loss_recovered"] >= 0.9 and e["l0"] <= 32)
    assert record["training"]["steps"] == SAE_TINY.steps

    # the same figures from the public function on the loaded folder; the model keeps no hook
    tokens, mask = _pad(organism.tokenizer, [_encode(organism.tokenizer, t) for t in held_out_texts(organism)])
    again = sae_metrics(model, sae, tokens, mask=mask)
    assert again.l0 == pytest.approx(e["l0"]) and again.loss_recovered == pytest.approx(e["loss_recovered"])
    assert hooks_left(model) == []


def test_same_seed_same_sae(organism):
    tok = organism.tokenizer
    docs = [_encode(tok, d) for d in organism.corpus.documents]
    config = SaeTrainConfig(expansion=2, k=4, steps=8, batch_tokens=128, buffer_batches=2)
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("<eos>")

    def weights(cfg):
        sae = train_sae(organism.model, docs, HOOK, pad_id=pad, exclude_ids=(eos,), config=cfg, progress=False)
        return {k: v.detach().clone() for k, v in sae.state_dict().items()}

    a, b = weights(config), weights(config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = weights(SaeTrainConfig(**{**config.__dict__, "seed": 1}))
    assert not torch.equal(a["W_enc"], c["W_enc"])
    assert hooks_left(organism.model) == []


def test_a_failing_splice_leaves_no_hook(organism, trained, monkeypatch):
    out, _ = trained
    sae = load_sae(out / HOOK, organism.model)
    tokens = torch.tensor([_encode(organism.tokenizer, organism.corpus.documents[0])])

    def broken(feats):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(sae, "decode", broken)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        sae_metrics(organism.model, sae, tokens)
    assert hooks_left(organism.model) == []


def _identity_like_sae(d_in: int, hook: str, *, null: bool = False):
    """A StandardSAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, an exact reconstruction
    (or, with ``null``, W_dec = 0: a reconstruction of zeros, the zero ablation itself)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, metadata=SAEMetadata(hook_name=hook)))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.zeros(2 * d_in, d_in) if null else torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_loss_recovered_is_one_for_an_exact_sae_and_zero_for_a_null_one():
    model = build_model(n_layers=2)
    hook = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 12), generator=torch.Generator().manual_seed(0))
    exact = sae_metrics(model, _identity_like_sae(model.cfg.d_model, hook), tokens)
    assert abs(exact.ce_ablated - exact.ce_clean) > 0.01  # the ablation matters, so the ratio means something
    assert exact.loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert exact.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert exact.dead_fraction == 0.0 and exact.n_positions == 6 * 11
    assert exact.l0 == pytest.approx(model.cfg.d_model)  # one of each (x_i, -x_i) pair is positive
    null = sae_metrics(model, _identity_like_sae(model.cfg.d_model, hook, null=True), tokens)
    assert null.loss_recovered == 0.0 and null.ce_spliced == null.ce_ablated
    mean = sae_metrics(model, _identity_like_sae(model.cfg.d_model, hook), tokens, ablation="mean")
    assert mean.loss_recovered == pytest.approx(1.0, abs=1e-5) and mean.ce_ablated != exact.ce_ablated
    assert hooks_left(model) == []


def _refused(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(PREFIX) and "\n" not in err and match in err, err


def test_cli_refuses_bad_input(organism_dir, tmp_path, capsys):
    base = ["organism", "train-saes", "--model", str(organism_dir), "--no-progress"]
    out = ["--out", str(tmp_path / "saes")]
    _refused(capsys, [*base, *out, "--hooks", "blocks.0.hook_resid_pots"], "unknown hook name 'blocks.0.hook_resid_pots'")
    _refused(capsys, [*base, *out, "--k", "0"], "--k must be >= 1, got 0")
    _refused(capsys, [*base, *out, "--steps", "0"], "--steps must be >= 1")
    _refused(capsys, base, "--out is required")
    (tmp_path / "saes" / HOOK).mkdir(parents=True)
    _refused(capsys, [*base, *out, "--hooks", HOOK], "pass --overwrite")
    assert [p.name for p in (tmp_path / "saes").iterdir()] == [HOOK]  # nothing trained, nothing written


def test_cli_trains_and_prints_the_table(organism_dir, tmp_path, capsys):
    out = tmp_path / "saes"
    argv = ["organism", "train-saes", "--model", str(organism_dir), "--hooks", HOOK, "--out", str(out),
            "--steps", "10", "--k", "4", "--d-sae", "64", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    header, row = text.splitlines()[:2]
    assert header.split()[:4] == ["hook", "L0", "expl.", "var."] and "loss recovered" in header
    assert row.startswith(HOOK) and "target loss recovered >= 0.90 at L0 <= 32" in text
    record = json.loads((out / HOOK / "metrics.json").read_text())
    assert record["sae"]["d_sae"] == 64 and record["eval"]["l0"] <= 4
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err


def test_cli_help_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["organism", "train-saes", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "sae-lens" in text and "loss recovered" in text and "--overwrite" in text
    config = SaeTrainConfig()
    assert {k: getattr(config, k) for k in SAE_DEFAULTS} == SAE_DEFAULTS
    assert set(SAE_DEFAULTS) <= {f.name for f in fields(SaeTrainConfig)}
