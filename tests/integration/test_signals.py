"""Signal gates on a tiny organism trained here: well-formed figures; and a planted signal is found, noise is not."""

import json
from dataclasses import replace

import pytest
import torch

from knowlens.analyses.answers import Answer, answer_items
from knowlens.analyses.signals import SIGNAL_GATES, signal_figures, signal_hooks
from knowlens.errors import KnowlensError
from knowlens.organism.spec import parse_spec
from knowlens.organism.store import load_organism
from knowlens.organism.train import TrainConfig, train_organism
from tests.helpers import tiny_world_raw

TINY = TrainConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=48, epochs=20, batch_size=32, warmup_steps=5, threads=1)
HOOKS = signal_hooks(TINY.n_layers)
FAST = dict(n_boot=200)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    raw = tiny_world_raw()
    raw["types"]["person"]["count"] = 60  # enough entities per split for 5 grouped folds
    raw["types"]["city"]["count"] = 12
    out = tmp_path_factory.mktemp("organism")
    train_organism(parse_spec(raw), out, config=TINY, progress=False)
    return load_organism(out)


@pytest.fixture(scope="module")
def answers(organism) -> list[Answer]:
    return answer_items(organism.model, organism.world, organism.corpus.held_out, hooks=HOOKS)


def test_hooks_keep_the_answers_and_align_positions(organism, answers):
    plain = answer_items(organism.model, organism.world, organism.corpus.held_out)
    assert [(a.tokens, a.grade) for a in plain] == [(a.tokens, a.grade) for a in answers]
    assert all(a.activations is None and a.prompt_tokens == () for a in plain)
    model = organism.model
    last = HOOKS[-1]
    for a in answers[:20]:
        assert a.prompt_tokens[0] == "<bos>" and a.prompt_tokens[-1] == ":"
        acts = a.activations
        assert acts is not None and set(acts) == set(HOOKS)
        assert acts[last].shape == (len(a.prompt_tokens) + len(a.tokens), TINY.d_model)
        # the residual at the position before generated token j predicts token j (greedy)
        logits = model.unembed(model.ln_final(acts[last][None]))[0]
        predicted = logits[len(a.prompt_tokens) - 1 : -1].argmax(-1)
        assert model.tokenizer.convert_ids_to_tokens(predicted.tolist()) == list(a.tokens)


def _check_gate(name, g):
    assert set(g) >= {"value", "ci95", "op", "threshold", "passed", "where", "n"}
    assert g["threshold"] == SIGNAL_GATES[name][1]
    if g["value"] is None:
        assert g["passed"] is False and g["reason"]
        return
    lo, hi = g["ci95"]
    assert lo <= g["value"] <= hi
    if name != "token_hallucination_margin":
        assert 0 <= lo and hi <= 1 and g["folds"] >= 2
        assert g["where"]["hook"] in HOOKS and g["where"]["position"] in ("entity", "answer", "decision", "before_token")
        assert len(g["chosen_per_fold"]) == len(g["l2_per_fold"]) == g["folds"]
    assert all(v > 0 for v in g["n"].values())
    assert g["passed"] == (g["value"] >= g["threshold"])


def test_signal_figures_are_well_formed(answers):
    fig = signal_figures(answers, **FAST)
    json.dumps(fig)  # JSON-ready
    assert set(fig["gates"]) == set(SIGNAL_GATES)
    for name, g in fig["gates"].items():
        _check_gate(name, g)
    assert fig["all_passed"] == all(g["passed"] for g in fig["gates"].values())
    known_q = sum(a.item.split == "known" and a.item.kind == "question" for a in answers)
    assert fig["gates"]["entity_known"]["n"]["known"] == known_q
    tok = fig["gates"]["token_hallucination"]
    if tok["value"] is not None:
        for base in ("top1", "entropy"):
            lo, hi = tok["baselines"][base]["ci95"]
            assert 0 <= lo <= tok["baselines"][base]["value"] <= hi <= 1
        best_baseline = max(tok["baselines"][b]["value"] for b in ("top1", "entropy"))
        margin = fig["gates"]["token_hallucination_margin"]["value"]
        assert margin == pytest.approx(tok["value"] - best_baseline, abs=2e-4)
    with pytest.raises(KnowlensError, match="activations"):
        signal_figures([replace(a, activations=None) for a in answers[:3]])


def _synthetic(answers, *, plant_entity: bool, plant_token: bool, seed: int = 0) -> list[Answer]:
    """Noise activations; optionally a shift along one direction at the entity's last name token of known
    entities (blocks.1.hook_resid_post) and before hallucinated value tokens (blocks.0.hook_resid_post)."""
    from knowlens.analyses.signals import _name_end

    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(TINY.d_model, generator=g), dim=0)
    out = []
    for a in answers:
        seq = len(a.prompt_tokens) + len(a.tokens)
        acts = {h: torch.randn(seq, TINY.d_model, generator=g) for h in HOOKS}
        if plant_entity and a.item.split == "known":
            acts["blocks.1.hook_resid_post"][_name_end(a)] += 6 * direction
        if plant_token:
            for j, c in enumerate(a.grade.classes):
                if c == "hallucinated":
                    acts["blocks.0.hook_resid_post"][len(a.prompt_tokens) + j - 1] += 6 * direction
        out.append(replace(a, activations=acts))
    return out


def test_a_planted_signal_is_found_and_noise_is_not(answers):
    planted = signal_figures(_synthetic(answers, plant_entity=True, plant_token=True), **FAST)["gates"]
    known = planted["entity_known"]
    assert known["value"] > 0.95 and known["passed"]
    assert known["where"]["name"] == "blocks.1.hook_resid_post@entity"
    assert known["best_single"]["where"]["name"] == "blocks.1.hook_resid_post@entity"
    token = planted["token_hallucination"]
    assert token["value"] > 0.95 and token["where"]["name"] == "blocks.0.hook_resid_post@before_token"
    assert planted["entity_known_when_hallucinating"]["value"] > 0.9
    # pure noise: near 0.5 (with ~40 entities, grouped out-of-fold AUROCs of noise spread about +-0.2)
    noise = signal_figures(_synthetic(answers, plant_entity=False, plant_token=False, seed=1), **FAST)["gates"]
    for name in ("entity_known", "entity_known_when_hallucinating", "token_hallucination"):
        assert abs(noise[name]["value"] - 0.5) < 0.25, (name, noise[name])
        assert not noise[name]["passed"]
