"""load_sae: sae-lens folders of every inference architecture, checks against the model, refusals, offline."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata

import knowlens.saes.load as load_mod
from knowlens.errors import HookNameError, KnowlensError
from knowlens.saes import SaeSpec, load_sae, parse_sae_spec
from tests.helpers import build_model

HOOK_ORG = "blocks.3.hook_resid_post"

ARCHS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 8}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
}
HOOK = "blocks.1.hook_resid_post"  # width d_model = 32 in the helpers' model
RELEASE = "gpt2-small-res-jb:blocks.8.hook_resid_pre"


def build_sae(arch: str = "standard", *, d_in: int = 32, d_sae: int = 64, hook: str = HOOK, seed: int = 0,
              metadata: dict[str, Any] | None = None, **cfg: Any):  # fmt: skip
    """A small sae-lens SAE with random (not initial) weights, so encode is neither all-zero nor dense."""
    cls, cfg_cls, extra = ARCHS[arch]
    sae = cls(
        cfg_cls(
            d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, **(metadata or {})), **extra, **cfg
        )
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
            if name == "threshold":
                p.abs_()
    return sae.eval()


def saved(tmp_path: Path, name: str = "sae", **kw: Any) -> Path:
    build_sae(**kw).save_model(tmp_path / name)
    return tmp_path / name


def hooks_on(model: Any) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp._forward_hooks or hp.fwd_hooks]


@pytest.fixture(scope="module")
def model():
    return build_model()


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("arch", list(ARCHS))
def test_folder_round_trip_encodes_like_the_saved_sae(arch, model, tmp_path):
    sae = build_sae(arch)
    sae.save_model(tmp_path / arch)
    loaded = load_sae(tmp_path / arch, model)
    assert type(loaded) is type(sae) and not loaded.training
    assert loaded.cfg.metadata.hook_name == HOOK and loaded.cfg.d_sae == 64
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        want, got = sae.encode(x), loaded.encode(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(got), sae.decode(want), rtol=0, atol=0)
    active = (got != 0).float().mean().item()
    assert 0.0 < active < 1.0  # a real sparse code, not all-zero nor dense
    if arch == "topk":
        assert int((got != 0).sum(-1).max()) <= 8


def test_loaded_sae_encodes_and_decodes_the_models_own_activations(model, tmp_path):
    sae = load_sae(str(saved(tmp_path)), model)
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 7, 9]]), names_filter=HOOK)
    with torch.no_grad():
        acts = sae.encode(cache[HOOK])
        recon = sae.decode(acts)
    assert acts.shape == (1, 4, 64) and recon.shape == cache[HOOK].shape
    assert torch.isfinite(recon).all()
    assert hooks_on(model) == []


def test_load_goes_to_the_requested_device_and_refuses_an_unknown_one(model, tmp_path):
    folder = saved(tmp_path)
    sae = load_sae(folder, model, device="cpu")
    assert all(p.device.type == "cpu" for p in sae.parameters())
    with pytest.raises(KnowlensError, match="not-a-device"):
        load_sae(folder, model, device="not-a-device")


def test_folder_load_never_unpickles(model, tmp_path, monkeypatch):
    def refuse(*args: Any, **kwargs: Any):
        raise AssertionError("something was unpickled")

    folder = saved(tmp_path, arch="jumprelu")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert isinstance(load_sae(folder, model), JumpReLUSAE)


# ------------------------------------------------------------------------------- checks against the model


def test_d_in_mismatch_is_refused_naming_both_widths(model, tmp_path):
    folder = saved(tmp_path, d_in=768)
    with pytest.raises(KnowlensError) as err:
        load_sae(folder, model)
    msg = str(err.value)
    assert "d_in 768" in msg and f"{HOOK} width 32" in msg and "\n" not in msg
    assert hooks_on(model) == []


def test_hook_the_model_lacks_is_refused_with_the_closest_names(model, tmp_path):
    folder = saved(tmp_path, hook="blocks.7.hook_resid_post")
    with pytest.raises(
        HookNameError, match=r"'blocks\.7\.hook_resid_post'.*closest: blocks\.\d\.hook_resid_post"
    ):
        load_sae(folder, model)


def test_hook_disabled_in_the_models_config_is_refused(model, tmp_path):
    folder = saved(tmp_path, hook="blocks.0.attn.hook_result")
    with pytest.raises(HookNameError, match="disabled"):
        load_sae(folder, model)


@pytest.mark.parametrize(
    ("hook", "d_in", "cfg", "metadata", "width"),
    [
        ("blocks.0.attn.hook_z", 32, {"reshape_activations": "hook_z"}, {}, None),  # 4 heads x 8, flattened
        ("blocks.0.attn.hook_z", 8, {}, {"hook_head_index": 2}, None),  # one head
        ("blocks.0.mlp.hook_post", 64, {}, {}, None),  # d_mlp
        ("blocks.0.attn.hook_z", 32, {}, {}, "width 8"),  # per-head width without reshaping
        ("blocks.0.mlp.hook_post", 32, {}, {}, "width 64"),
    ],
)
def test_width_follows_the_hooks_activation(model, tmp_path, hook, d_in, cfg, metadata, width):
    folder = saved(tmp_path, hook=hook, d_in=d_in, metadata=metadata, **cfg)
    if width is None:
        assert load_sae(folder, model).cfg.d_in == d_in
    else:
        with pytest.raises(KnowlensError, match=f"d_in {d_in} does not match {hook} {width}"):
            load_sae(folder, model)


def test_transcoder_output_side_is_checked_too(model, tmp_path):
    def transcoder(d_out: int, name: str) -> Path:
        meta = SAEMetadata(hook_name="blocks.0.hook_resid_mid", hook_name_out="blocks.0.hook_mlp_out")
        tc = Transcoder(
            TranscoderConfig(d_in=32, d_sae=16, d_out=d_out, apply_b_dec_to_input=False, metadata=meta)
        )
        tc.save_model(tmp_path / name)
        return tmp_path / name

    assert isinstance(load_sae(transcoder(32, "good"), model), Transcoder)
    with pytest.raises(KnowlensError, match="d_out 48 does not match blocks.0.hook_mlp_out width 32"):
        load_sae(transcoder(48, "bad"), model)


def test_a_failing_forward_leaves_no_hook_behind(tmp_path, monkeypatch):
    fresh = build_model()
    folder = saved(tmp_path)

    def boom(*args: Any, **kwargs: Any):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(fresh, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        load_sae(folder, fresh)
    assert hooks_on(fresh) == []


# ------------------------------------------------------------------------------------------ bad folders


def _truncate(folder: Path) -> None:
    w = folder / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _edit_cfg(**changes: Any):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key)
            else:
                cfg[key] = value
        (folder / "cfg.json").write_text(json.dumps(cfg))

    return edit


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda f: (f / "cfg.json").unlink(), r"cfg\.json: missing"),
        (lambda f: (f / "sae_weights.safetensors").unlink(), r"sae_weights\.safetensors: missing"),
        (_truncate, r"sae_weights\.safetensors: not a readable safetensors file \(.*incomplete"),
        (
            lambda f: (f / "sae_weights.safetensors").write_bytes(b"not safetensors" * 8),
            r"sae_weights\.safetensors: not a readable",
        ),
        (
            lambda f: (f / "cfg.json").write_text("{not json"),
            r"cfg\.json: malformed JSON \(.* line 1 column 2\)",
        ),
        (lambda f: (f / "cfg.json").write_text("[1, 2]"), r"cfg\.json: expected a JSON object, got list"),
        (_edit_cfg(architecture="nope"), r"cfg\.json: architecture 'nope' is unknown to sae-lens .*standard"),
        (_edit_cfg(d_in=None), r"cfg\.json: not a config sae-lens .* can read .*d_in"),
        (
            _edit_cfg(d_sae=65),
            r"sae_weights\.safetensors: its tensors do not fit .*cfg\.json .*size mismatch",
        ),
        (_edit_cfg(metadata={"sae_lens_version": "6.54.12"}), r"does not say which hook it reads"),
    ],
    ids=[
        "no-cfg",
        "no-weights",
        "truncated",
        "garbage",
        "bad-json",
        "not-object",
        "architecture",
        "no-d_in",
        "shape",
        "no-hook",
    ],
)
def test_broken_folder_is_refused_naming_the_file(model, tmp_path, break_it, message):
    folder = saved(tmp_path)
    break_it(folder)
    with pytest.raises(KnowlensError, match=message) as err:
        load_sae(folder, model)
    assert "\n" not in str(err.value)


def test_missing_folder_and_file_are_refused(model, tmp_path):
    with pytest.raises(KnowlensError, match="no such SAE folder"):
        load_sae(tmp_path / "nowhere", model)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(KnowlensError, match="a file, not an SAE folder"):
        load_sae(tmp_path / "file.json", model)


# ------------------------------------------------------------------------------------------------ specs


def test_spec_syntax(tmp_path):
    assert parse_sae_spec(RELEASE) == SaeSpec(
        "release", release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre"
    )
    assert parse_sae_spec(("gpt2-small-res-jb", "blocks.8.hook_resid_pre")).label == RELEASE
    assert parse_sae_spec("gpt2-small-res-jb/blocks.8.hook_resid_pre").label == RELEASE
    assert parse_sae_spec("owner/repo:some/folder") == SaeSpec(
        "release", release="owner/repo", sae_id="some/folder"
    )
    (tmp_path / "odd:name").mkdir()
    assert parse_sae_spec(str(tmp_path / "odd:name")).kind == "folder"  # an existing folder wins
    assert parse_sae_spec(tmp_path / "missing").kind == "folder"
    organism = parse_sae_spec("organism:blocks.2.hook_resid_post")
    assert (
        organism.kind == "organism" and organism.path == load_mod.ORGANISM_SAES / "blocks.2.hook_resid_post"
    )
    for bad in ["organism:", "organism:../etc", ":x", "rel:", ("rel", ""), ""]:
        with pytest.raises(KnowlensError, match="SAE spec"):
            parse_sae_spec(bad)


def test_organism_saes_not_shipped_yet(model, tmp_path, monkeypatch):
    monkeypatch.setattr(load_mod, "ORGANISM_SAES", tmp_path / "saes")
    with pytest.raises(KnowlensError, match=r"not shipped yet.*knowlens organism train-saes"):
        load_sae(f"organism:{HOOK}", model)


def test_organism_sae_loads_from_its_folder_and_names_the_shipped_ones(model, tmp_path, monkeypatch):
    monkeypatch.setattr(load_mod, "ORGANISM_SAES", tmp_path / "saes")
    build_sae("topk").save_model(tmp_path / "saes" / HOOK)
    assert isinstance(load_sae(f"organism:{HOOK}", model), TopKSAE)
    with pytest.raises(KnowlensError, match=f"no organism SAE for that hook; shipped: {HOOK}"):
        load_sae("organism:blocks.0.hook_resid_post", model)


def test_the_shipped_organism_saes_load_and_refuse_another_model(tmp_path):
    import shutil

    from knowlens.organism.store import load_organism
    from knowlens.saes.activations import encode_latents

    org = load_organism()
    for layer in range(org.model.cfg.n_layers):
        hook = f"blocks.{layer}.hook_resid_post"
        sae = load_sae(f"organism:{hook}", org.model)
        metrics = json.loads((load_mod.ORGANISM_SAES / hook / "metrics.json").read_text())
        assert sae.cfg.metadata.hook_name == hook and metrics["model_fingerprint"] == org.info["fingerprint"]
        assert metrics["eval"]["loss_recovered"] >= 0.9 and metrics["eval"]["l0"] <= 32  # issue 8's target
    # a model with other weights (same shapes) is refused by the fingerprint its SAEs were trained on
    other = load_organism()
    with torch.no_grad():
        other.model.blocks[0].mlp.W_in[0, 0] += 1.0
    with pytest.raises(KnowlensError, match=r"trained on the model with weights fingerprint \w{16}; this model's is"):
        load_sae(f"organism:{HOOK_ORG}", other.model)
    # a folder copy refuses the same way; a corrupt metrics.json is one line; without one the folder loads
    folder = tmp_path / "copy"
    shutil.copytree(load_mod.ORGANISM_SAES / HOOK_ORG, folder)
    with pytest.raises(KnowlensError, match="weights fingerprint"):
        load_sae(folder, other.model)
    (folder / "metrics.json").write_text('{"model_fingerprint": ')
    with pytest.raises(KnowlensError, match="metrics.json is not a JSON object"):
        load_sae(folder, org.model)
    (folder / "metrics.json").unlink()
    sae = load_sae(folder, other.model)
    assert encode_latents(sae, torch.randn(1, 3, 128)).shape == (1, 3, sae.cfg.d_sae)


# ---------------------------------------------------------------------------------------------- releases


def test_release_offline_fails_fast(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(KnowlensError, match="gpt2-small-res-jb") as err:
        load_sae(RELEASE, model)
    assert time.monotonic() - start < 10
    # not cached here: the offline message; cached: loads and is refused for its d_in 768
    assert "HF_HUB_OFFLINE is set" in str(err.value) or "d_in 768" in str(err.value)


def test_release_with_unreachable_hub_fails_fast_and_restores_online_mode(model, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout: False)
    start = time.monotonic()
    with pytest.raises(KnowlensError, match="gpt2-small-res-jb") as err:
        load_sae(("gpt2-small-res-jb", "blocks.8.hook_resid_pre"), model)
    assert time.monotonic() - start < 10
    assert "huggingface.co is unreachable" in str(err.value) or "d_in 768" in str(err.value)
    assert constants.HF_HUB_OFFLINE is False


def test_unknown_release_and_unknown_id_are_named(model):
    with pytest.raises(
        KnowlensError, match=r"unknown sae-lens release 'gpt2-small-res-j'.*closest: gpt2-small-res-jb"
    ):
        load_sae("gpt2-small-res-j:blocks.8.hook_resid_pre", model)
    with pytest.raises(
        KnowlensError, match=r"release 'gpt2-small-res-jb' has no SAE 'blocks\.88\.hook_resid_pre'"
    ):
        load_sae("gpt2-small-res-jb:blocks.88.hook_resid_pre", model)
