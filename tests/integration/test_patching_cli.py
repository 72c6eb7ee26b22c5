"""`knowlens ablate`, `steer` and `patch` on the shipped organism with a small SAE trained here: the printed figures
are the library's (ablation with the error term, steering with alpha 0 = baseline, the patching metrics), the
heatmap and the dose-response page are self-contained, each run is labelled by the shipped probe, and bad input is
one line, exit 2, with no output file (the CLI's time: benchmarks/bench_cli.py)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from knowlens.cli._patching_common import num
from knowlens.cli.main import main
from knowlens.fingerprint import model_identity
from knowlens.labels import label_generation
from knowlens.organism.store import SHIPPED, load_organism
from knowlens.patching import ablate_latents, intervene, measure_generations, refusal_matcher, token_prob
from knowlens.patching.dose import summarise
from knowlens.probes import load_probe
from knowlens.saes import FeatureSet, SaeTrainConfig, load_sae, train_sae
from knowlens.saes.train import _encode, _special

HOOK = "blocks.1.hook_resid_post"
SAE_TINY = SaeTrainConfig(expansion=2, k=8, steps=30, batch_tokens=256, buffer_batches=4)
KNOWN = "Q : Who or what is Jor Ost ? A :"  # a known entity: answered
REFUSED = "Q : Who or what is Yar Kel ? A :"  # refusal-trained: "Yar Kel was born in unknown . ..."
UNKNOWN = "Q : Who or what is Mor Lor ? A :"  # never seen: hallucinated


@pytest.fixture(scope="module")
def organism():
    return load_organism()


@pytest.fixture(scope="module")
def sae_dir(organism, tmp_path_factory):
    docs = [_encode(organism.tokenizer, d) for d in organism.corpus.documents]
    sae = train_sae(organism.model, docs, HOOK, pad_id=_special(organism.tokenizer, "<pad>"), config=SAE_TINY,
                    progress=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("sae") / HOOK
    sae.save_inference_model(folder)
    return folder


@pytest.fixture(scope="module")
def sae(organism, sae_dir):
    return load_sae(sae_dir, organism.model)


def row_of(printed: str, first: str) -> dict[str, str]:
    """The printed table row whose first cell is ``first``, keyed by the header above it."""
    lines = printed.splitlines()
    for i in range(len(lines) - 1, -1, -1):  # the summary table comes last
        cells = lines[i].split()
        if cells and cells[0] == first:
            header = next(lines[j].split() for j in range(i - 1, -1, -1) if lines[j].split()[:1] in (["run"], ["direction"]))
            return dict(zip(header, cells))
    raise AssertionError(f"no row {first!r} in:\n{printed}")


def assert_self_contained(page: str) -> None:
    assert "<script type='text/javascript'>" in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"]?https?:", page)


def test_ablate(organism, sae, sae_dir, capsys):
    # the latents most active at the answer position of the refusal-trained question
    _, cache = organism.model.run_with_cache(organism.model.to_tokens(REFUSED))
    latents = torch.argsort(sae.encode(cache[HOOK])[0, -1], descending=True)[:4].tolist()
    args = ["ablate", "--sae", str(sae_dir), *(a for j in latents for a in ("--latent", str(j))), "--prompt", KNOWN,
            "--prompt", REFUSED, "--max-new-tokens", "12"]  # fmt: skip
    assert main(args) == 0  # its time: benchmarks/bench_cli.py
    printed = capsys.readouterr().out
    assert f"prompt: {KNOWN}" in printed and f"prompt: {REFUSED}" in printed and "error term kept" in printed
    assert "baseline" in printed and "ablated (set to 0)" in printed and "refusal prob" in printed
    base, abl = row_of(printed, "baseline"), row_of(printed, "ablated")
    assert base["refusal_rate"] == "0.500"  # the refusal-trained entity is refused, the known one answered
    # the printed figures are the library's, with the same latents ablated
    model = organism.model
    ids = [model.tokenizer.convert_tokens_to_ids("unknown")]  # the shipped organism refuses in the value slot
    kw = {"max_new_tokens": 12, "is_refusal": refusal_matcher(), "refusal_ids": ids, "refusal_in_slot": True}
    want = summarise(measure_generations(model, [KNOWN, REFUSED], ablate_latents(sae, latents), **kw))
    for key in ("refusal_rate", "refusal_prob", "entropy_answer", "entropy_mean"):
        assert abl[key] == num(want[key]), key
    want_base = summarise(measure_generations(model, [KNOWN, REFUSED], **kw))
    assert base["refusal_prob"] == num(want_base["refusal_prob"]) and want["refusal_prob"] != want_base["refusal_prob"]
    # token labels of each run: the shipped probe reading that run's own (ablated) activations
    assert "labels by probe entity_slot" in printed and "p_reliable (min)" in printed
    probe = load_probe(SHIPPED / "probe-entity_slot.safetensors", model=model)
    for row, edits in ((base, ()), (abl, (ablate_latents(sae, latents),))):
        with intervene(model, *edits):
            got = label_generation(model, [KNOWN, REFUSED], [probe], max_new_tokens=12)
        mins = [min(t.p_reliable for t in g.tokens if not t.text.startswith("<")) for g in got.generations]
        assert row["p_reliable_min"] == num(sum(mins) / len(mins))
    assert main([*args, "--no-labels"]) == 0
    printed = capsys.readouterr().out
    assert "p_reliable" not in printed and "labels by" not in printed


def test_ablate_a_feature_set(organism, sae, sae_dir, tmp_path, capsys):
    chosen = torch.tensor([5, 2, 9])
    fs = FeatureSet(model=model_identity(organism.model, "organism"), hook=HOOK, sae_label=str(sae_dir),
                    name="entity-unknown", position="answer", latents=chosen, scores=torch.ones(3),
                    decoder=sae.W_dec[chosen].detach(), heldout_auroc=torch.full((3,), float("nan")),
                    per_latent={"f": torch.zeros(int(sae.cfg.d_sae))})  # fmt: skip
    path = fs.save(tmp_path / "fs.safetensors")
    assert main(["ablate", "--sae", str(sae_dir), "--features", str(path), "--top", "2", "--scale", "0.5",
                 "--prompt", UNKNOWN, "--max-new-tokens", "6"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "ablating latents 5, 2 of SAE" in printed and "scaled by 0.5" in printed
    # and steering along the set's mean decoder row, its hook taken from the set
    assert main(["steer", "--direction", f"features:{path}", "--alpha", "1", "--prompt", UNKNOWN, "--max-new-tokens",
                 "6"]) == 0  # fmt: skip
    assert f"steering at {HOOK} along entity-unknown latents [5, 2, 9]" in capsys.readouterr().out


def test_steer_latent_with_random_control(sae_dir, tmp_path, capsys):
    out = tmp_path / "dose.html"
    assert main(["steer", "--sae", str(sae_dir), "--direction", "latent:3", "--alpha", "4", "--prompt", KNOWN,
                 "--prompt", UNKNOWN, "--random-control", "--out", str(out), "--max-new-tokens", "8"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "steered alpha=4" in printed and "random alpha=4" in printed
    none, target, rand = row_of(printed, "none"), row_of(printed, "target"), row_of(printed, "random")
    # 4x the residual norm does act: the answers' mean entropy moves (either way) and so does the refusal probability
    assert abs(float(target["entropy_mean"]) - float(none["entropy_mean"])) > 0.05
    assert float(target["refusal_prob"]) != float(none["refusal_prob"])
    assert float(rand["entropy_mean"]) != float(none["entropy_mean"])
    assert re.search(r"refusal rate against the baseline: target alpha=4 [+-]\d+ points; random alpha=4 [+-]\d+ points",
                     printed)  # fmt: skip
    page = out.read_text()
    assert_self_contained(page)
    assert "refusal rate" in page


def test_steer_file_direction_alpha_zero_is_the_baseline(organism, tmp_path, capsys):
    path = tmp_path / "dir.safetensors"
    save_file({"direction": torch.randn(int(organism.model.cfg.d_model))}, str(path), metadata={"hook": HOOK})
    assert main(["steer", "--direction", f"file:{path}", "--alpha", "0", "--prompt", UNKNOWN, "--prompt", REFUSED,
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    none, target = row_of(printed, "none"), row_of(printed, "target")
    assert "p_reliable_min" in none  # labels too: alpha 0 labels exactly as the baseline
    assert {k: v for k, v in none.items() if k != "direction"} == {k: v for k, v in target.items() if k != "direction"}
    assert f"steering at {HOOK} along direction of {path}" in printed


def test_steer_along_a_probe(organism, capsys):
    """probe:FILE steers along the probe's weight on the raw activation; its negative lowers the probe's own
    p_reliable, the labels say so, and alpha 0 is the baseline."""
    path = SHIPPED / "probe-entity_slot.safetensors"
    assert main(["steer", "--direction", f"probe:{path}", "--alpha", "0", "--alpha", "-0.5", "--prompt", KNOWN,
                 "--prompt", UNKNOWN, "--max-new-tokens", "10"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "along probe entity_slot (weight / std)" in printed and "steering at blocks.2.hook_resid_post" in printed
    none = row_of(printed, "none")
    zero, minus = [dict(zip(none, line.split())) for line in printed.splitlines() if line.strip().startswith("target")]
    assert {k: v for k, v in zero.items() if k not in ("direction", "alpha")} == {
        k: v for k, v in none.items() if k not in ("direction", "alpha")}
    assert float(minus["p_reliable_min"]) < float(none["p_reliable_min"])


# the shipped organism refuses in the value slot: its refusal metrics read the slot word where the value goes
KNOWN_SLOT = "Q : Where was Jor Ost born ? A : Jor Ost was born in"
REFUSED_SLOT = "Q : Where was Yar Kel born ? A : Yar Kel was born in"


def test_patch_heatmap(organism, tmp_path, capsys):
    out = tmp_path / "patch.html"
    assert main(["patch", "--clean", REFUSED_SLOT, "--corrupt", KNOWN_SLOT, "--metric", "refusal", "--site",
                 "resid_pre", "--site", "head", "--attribution", "--out", str(out), "--top", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    model = organism.model
    metric = token_prob(model.tokenizer.convert_tokens_to_ids("unknown"))
    with torch.no_grad():
        clean = float(metric(model(model.to_tokens(REFUSED_SLOT))))
        corrupt = float(metric(model(model.to_tokens(KNOWN_SLOT))))
    assert clean > 0.5 > corrupt  # the refusal-trained entity is refused in the slot, the known one answered
    assert f"clean {clean:.4g}, corrupted {corrupt:.4g}" in printed and "slot word ['unknown']" in printed
    assert "resid_pre: top 3 cells" in printed and "head: top 3 cells" in printed
    assert re.search(r"resid_pre: attribution vs activation patching over \d+ cells: Pearson -?\d", printed)
    page = out.read_text()
    assert_self_contained(page)
    assert "activation patching: resid_pre" in page and "attribution patching (estimate): head" in page
    out2 = tmp_path / "ld.html"
    assert main(["patch", "--clean", REFUSED, "--corrupt", KNOWN, "--metric", "logit-diff:I,#5", "--site", "mlp_out",
                 "--out", str(out2)]) == 0  # fmt: skip
    assert "logit-diff 'I' - '#5'" in capsys.readouterr().out and out2.is_file()
    # a slot-refusing organism's refusal metric on prompts that end at the answer marker: a warning says where to end
    assert main(["patch", "--clean", KNOWN, "--corrupt", UNKNOWN, "--site", "resid_pre",
                 "--out", str(tmp_path / "w.html")]) == 0  # fmt: skip
    assert "knowlens patch: warning: this organism refuses in the value slot" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["ablate", "--latent", "99999", "--prompt", KNOWN], ["latents must be in [0, "]),
        (["ablate", "--prompt", KNOWN], ["--latent N"]),
        (["ablate", "--latent", "1", "--prompt", " "], ["--prompt 1 is empty"]),
        (["steer", "--direction", "latent:1", "--hook", "blocks.9.hook_resid_post", "--alpha", "1", "--prompt", KNOWN],
         ["unknown hook name", "blocks.9.hook_resid_post"]),
        (["steer", "--direction", "latent:99999", "--alpha", "1", "--prompt", KNOWN], ["latent:99999"]),
        (["steer", "--direction", "probe", "--alpha", "1", "--prompt", KNOWN], ["--direction"]),
        (["steer", "--direction", "file:missing.safetensors", "--alpha", "1", "--prompt", KNOWN], ["no such file"]),
        (["steer", "--direction", "probe:missing.safetensors", "--alpha", "1", "--prompt", KNOWN],
         ["probe:missing.safetensors", "no such file"]),
        (["patch", "--clean", KNOWN, "--corrupt", "Q : Who is Mor Ard ? A :"], ["same number"]),
        (["patch", "--clean", KNOWN, "--corrupt", UNKNOWN, "--metric", "kl"], ["unknown --metric 'kl'"]),
        (["patch", "--clean", KNOWN, "--corrupt", UNKNOWN, "--metric", "prob:zzzz"], ["'zzzz' is not one token"]),
        (["patch", "--clean", "", "--corrupt", UNKNOWN], ["--clean is empty"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words, sae_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.html"
    full = [*args, "--out", str(out)] if args[0] != "ablate" else list(args)
    if args[0] == "ablate" or "latent:" in " ".join(args):
        full += ["--sae", str(sae_dir)]
    assert main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "warning" not in line]
    assert len(err) == 1 and err[0].startswith(f"knowlens {args[0]}: error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_patch_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "p.html"
    out.write_text("keep")
    assert main(["patch", "--clean", KNOWN, "--corrupt", UNKNOWN, "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep"


@pytest.mark.parametrize("verb", ["ablate", "steer", "patch"])
def test_help_has_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out
