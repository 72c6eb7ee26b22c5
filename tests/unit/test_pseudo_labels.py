"""Pseudo-labels without exemplars (`knowlens.probes.pseudo`): the self-consistency span rule on a constructed case
and recomputed by hand from `generate`; own-vs-injected row counts, alignment and activations; entity-contrast rows;
`fit_pseudo_probes` writes probes whose cards name where their labels came from."""

from __future__ import annotations

import random

import pytest
import torch

from knowlens.capture import generate
from knowlens.errors import KnowlensError
from knowlens.probes import load_probe
from knowlens.probes import pseudo_labels as pl
from knowlens.probes.pseudo import (
    balanced_threshold,
    derangement,
    entity_contrast_labels,
    fit_pseudo_probes,
    own_vs_injected_labels,
    self_consistency_labels,
    span_agreement,
)
from tests.helpers import word_level_model

HOOK = "blocks.1.hook_resid_post"
HOOK0 = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return word_level_model()


def ids(model, text: str) -> list[int]:
    return model.to_tokens(text, prepend_bos=False, move_to_device=False)[0].tolist()


# ------------------------------------------------------------------------------------------ self-consistency


def test_self_consistency_rule_on_a_constructed_case(model, monkeypatch):
    """Greedy answers and samples are given; spans, agreement, labels, rows and groups follow the documented rule."""
    w = {i: ids(model, f"w{i}")[0] for i in range(4, 46)}
    prompts = ["w4 w5", "w6 w7", "w8 w9"]
    greedy = [
        [w[5], w[10], w[11], w[20], w[12]],  # w5: copied from the prompt; w20: in every answer (template word)
        [w[13], w[20]],
        [w[20], w[14], w[15]],
    ]
    samples = [
        [w[10], w[11], w[20]], [w[30], w[10], w[11]], [w[10], w[11], w[12]], [w[10], w[31]],  # (10 11): 3/4, (12): 1/4
        [w[13]], [w[13]], [w[13]], [w[13]],  # (13): 4/4
        [w[14], w[15]], [w[14], w[15]], [w[15]], [w[33]],  # (14 15): 2/4
    ]  # fmt: skip
    acts = [{HOOK: torch.arange(len(a) * 32, dtype=torch.float32).reshape(len(a), 32) + 1000 * i} for i, a in enumerate(greedy)]
    calls = []

    def fake_answers(model, rows, *, hooks, **kw):
        calls.append((len(rows), tuple(hooks), kw.get("temperature", 0.0)))
        return (greedy, acts) if hooks else (samples, [])

    monkeypatch.setattr(pl, "_answers", fake_answers)
    lab = self_consistency_labels(model, prompts, hooks=[HOOK], k=4, threshold=0.75, max_df=0.5, groups=["a", "b", "c"])
    assert calls == [(3, (HOOK,), 0.0), (12, (), 1.0)]  # greedy with hooks, then k samples per prompt without
    # rows: prompt 0 tokens 1,2 (span w10 w11, 3/4 -> 1) and 4 (w12, 1/4 -> 0); prompt 1 token 0 (4/4 -> 1);
    # prompt 2 tokens 1,2 (2/4 -> 0); w20 (df 3/3 > 0.5) and the copied w5 are never labelled
    assert lab.meta["prompt"].tolist() == [0, 0, 0, 1, 2, 2]
    assert lab.meta["index"].tolist() == [1, 2, 4, 0, 1, 2]
    assert lab.meta["agreement"].tolist() == [0.75, 0.75, 0.25, 1.0, 0.5, 0.5]
    assert lab.labels.tolist() == [True, True, False, True, False, False]
    assert lab.groups == ("a", "a", "a", "b", "c", "c")
    expected = torch.stack([acts[p][HOOK][j] for p, j in zip(lab.meta["prompt"].tolist(), lab.meta["index"].tolist())])
    assert torch.equal(lab.activations[HOOK], expected)
    assert lab.position == "before_token" and lab.target == "reliable" and "k=4" in lab.label_source
    assert lab.params["n_spans"] == {"reliable": 2, "unreliable": 2, "left_out": 0}
    # a middle band is left out: 0.5 agreement with unreliable_below=0.5 is neither
    mid = self_consistency_labels(model, prompts, hooks=[HOOK], k=4, threshold=0.75, unreliable_below=0.5, max_df=0.5)
    assert mid.meta["agreement"].tolist() == [0.75, 0.75, 0.25, 1.0] and mid.params["n_spans"]["left_out"] == 1
    # max_df=1 keeps template words: w20 joins the spans
    every = self_consistency_labels(model, prompts, hooks=[HOOK], k=4, max_df=1.0)
    assert every.meta["index"].tolist() == [1, 2, 3, 4, 0, 1, 0, 1, 2]


def test_self_consistency_recomputed_from_generate(model):
    """On a real (random) model: the greedy answer's activations come from `generate` at the column before each
    token, and each label is the documented span rule applied to the samples `generate` draws with the same seed."""
    prompts = ["w4 w5 w6", "w7 w8", "w9 w10 w11 w12"]
    k, seed, T = 3, 5, 0.7
    lab = self_consistency_labels(model, prompts, hooks=[HOOK], k=k, seed=seed, temperature=T, threshold=0.6,
                                  max_df=1.0, max_new_tokens=6, batch_size=64)  # fmt: skip
    rec = generate(model, prompts, hooks=[HOOK], max_new_tokens=6)
    eos = model.tokenizer.eos_token_id
    rows = [model.to_tokens(p, move_to_device=False)[0] for p in prompts]
    sampled = generate(model, [r for r in rows for _ in range(k)], hooks=[], max_new_tokens=6, temperature=T,
                       seed=random.Random(seed).randrange(2**31))  # fmt: skip

    def answer(r, record):
        cols = record.generated_mask[r].nonzero().flatten()
        got = record.tokens[r, cols].tolist()
        cut = got.index(eos) if eos in got else len(got)
        return got[:cut], cols[:cut]

    special = set(model.tokenizer.all_special_ids)
    n = 0
    for i in range(len(prompts)):
        greedy, cols = answer(i, rec)
        mine = [answer(i * k + s, sampled)[0] for s in range(k)]
        content = [t not in special and t not in rows[i].tolist() for t in greedy]
        for start, stop in pl._runs(content):
            agree = span_agreement(greedy, mine, start, stop)
            for j in range(start, stop):
                assert lab.meta["prompt"][n] == i and lab.meta["index"][n] == j and lab.meta["token"][n] == greedy[j]
                assert lab.meta["agreement"][n] == agree and bool(lab.labels[n]) == (agree >= 0.6)
                torch.testing.assert_close(lab.activations[HOOK][n], rec.activations[HOOK][i, cols[j] - 1])
                n += 1
    assert n == len(lab) > 0


def test_self_consistency_bad_input(model):
    for kw, match in (({"k": 0}, "k must be"), ({"threshold": 1.5}, "threshold"), ({"temperature": 0.0}, "temperature"),
                      ({"unreliable_below": 0.9}, "unreliable_below"), ({"max_df": 0.0}, "max_df"),
                      ({"hooks": []}, "no hooks"), ({"hooks": ["blocks.0.attn.hook_pattern"]}, "attention pattern"),
                      ({"groups": ["a"]}, "one group per prompt")):  # fmt: skip
        opts = {"hooks": [HOOK], **kw}
        with pytest.raises(KnowlensError, match=match):
            self_consistency_labels(model, ["w4 w5", "w6"], **opts)


# ----------------------------------------------------------------------------------------- own vs injected


def test_own_vs_injected_counts_and_alignment(model):
    prompts = ["w4 w5", "w6 w7 w8", "w9", "w10 w11 w12 w13"]
    lab = own_vs_injected_labels(model, prompts, hooks=[HOOK0, HOOK], max_new_tokens=5, seed=3)
    perm = lab.params["derangement"]
    assert perm == derangement(4, 3) and all(p != i for i, p in enumerate(perm))
    rec = generate(model, prompts, hooks=[], max_new_tokens=5)
    eos = model.tokenizer.eos_token_id
    own = []
    for r in range(4):
        got = rec.tokens[r][rec.generated_mask[r]].tolist()
        own.append(got[: got.index(eos)] if eos in got else got)
    aligned = [min(len(own[i]), len(own[perm[i]])) for i in range(4)]
    assert lab.params["aligned"] == aligned and len(lab) == 2 * sum(aligned)
    assert lab.counts()["label_1"] == lab.counts()["label_0"] == sum(aligned)
    n = 0
    for is_own in (True, False):
        for i in range(4):
            cont = own[i] if is_own else own[perm[i]]
            prompt = model.to_tokens(prompts[i], move_to_device=False)[0]
            seq = torch.cat([prompt, torch.tensor(cont[: aligned[i]], dtype=torch.long)])
            _, cache = model.run_with_cache(seq[None], names_filter=[HOOK0, HOOK])
            for j in range(aligned[i]):
                assert bool(lab.labels[n]) is is_own and lab.groups[n] == i
                assert lab.meta["index"][n] == j and lab.meta["token"][n] == cont[j]
                for h in (HOOK0, HOOK):  # the continuation token's own column
                    torch.testing.assert_close(lab.activations[h][n], cache[h][0, len(prompt) + j], atol=1e-5, rtol=1e-5)
                n += 1
    assert lab.position == "token" and lab.target == "own"
    with pytest.raises(KnowlensError, match="at least two prompts"):
        own_vs_injected_labels(model, ["w4"], hooks=[HOOK])


def test_derangement():
    for n in (2, 3, 7):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
            assert perm == derangement(n, seed)
    with pytest.raises(KnowlensError):
        derangement(1, 0)


# ----------------------------------------------------------------------------------------- entity contrast


def test_entity_contrast_rows(model):
    from knowlens.saes.contrast import Contrast, EntitySet

    contrast = Contrast(EntitySet(("w10 w11", "w12 w13 w14")), EntitySet(("w20 w21", "w22 w23"), method="fabricated"))
    templates = ("w4 {name} w5", "{name} w6 w7")
    lab = entity_contrast_labels(model, hooks=[HOOK], contrast=contrast, templates=templates)
    assert len(lab) == 8 and lab.labels.tolist() == [True] * 4 + [False] * 4
    assert lab.groups == ("w10 w11",) * 2 + ("w12 w13 w14",) * 2 + ("w20 w21",) * 2 + ("w22 w23",) * 2
    assert lab.position == "entity_last_token" and lab.target == "known entity"
    seq = model.to_tokens("w12 w13 w14 w6 w7", move_to_device=False)[0]  # entity 1, template 1: last name token at 3
    _, cache = model.run_with_cache(seq[None], names_filter=[HOOK])
    assert lab.meta["index"][3] == 3 and lab.meta["token"][3] == seq[3]
    torch.testing.assert_close(lab.activations[HOOK][3], cache[HOOK][0, 3], atol=1e-5, rtol=1e-5)
    answer = entity_contrast_labels(model, hooks=[HOOK], contrast=contrast, templates=templates, position="answer")
    assert answer.position == "prompt_last_token" and answer.meta["index"][3] == len(seq) - 1


# ---------------------------------------------------------------------------------------- fit_pseudo_probes


def test_fit_pseudo_probes_writes_cards_with_provenance(model, tmp_path):
    prompts = [f"w{4 + i} w{10 + (i * 7) % 30}" for i in range(12)]
    seen = []
    fits = fit_pseudo_probes(model, prompts, hooks=[HOOK0, HOOK], out_dir=tmp_path, sources=["own_vs_injected"],
                             folds=3, n_boot=50, model_name="tiny", on_labels=seen.append,
                             options={"own_vs_injected": {"max_new_tokens": 4}})  # fmt: skip
    assert list(fits) == ["own_text"] and [s.source for s in seen] == ["own_vs_injected"]
    fit = fits["own_text"]
    pseudo = fit.training["pseudo"]
    assert set(pseudo["hook_oof_auroc"]) == {HOOK0, HOOK}
    assert pseudo["hook"] == max(pseudo["hook_oof_auroc"], key=lambda h: pseudo["hook_oof_auroc"][h])
    probe = load_probe(tmp_path / "own_text.safetensors", model=model)
    assert probe.hook == pseudo["hook"] and probe.position == "token" and probe.card["target"] == "own"
    assert probe.card["label_source"].startswith("own vs injected") and probe.card["model"]["name"] == "tiny"
    assert probe.card["training"]["pseudo"]["counts"]["n"] == len(seen[0])
    assert probe.threshold == pseudo["threshold"] == balanced_threshold(fit.oof_prob, seen[0].labels)
    with pytest.raises(KnowlensError, match="sources must be among"):
        fit_pseudo_probes(model, prompts, hooks=[HOOK], sources=["truth"])


def test_balanced_threshold():
    y = torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)
    assert balanced_threshold(torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9]), y) == pytest.approx(0.25)  # TPR 1, FPR 0
    # rare class 0 among high probabilities: the cut moves up to where it separates them, not to 0.5
    p = torch.tensor([0.80, 0.82, 0.90, 0.91, 0.93, 0.95])
    y = torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert balanced_threshold(p, y) == pytest.approx(0.86)
    assert balanced_threshold(p, torch.ones(6, dtype=torch.bool)) == 0.5


def test_entity_slot_probe_keeps_its_own_consistency_threshold(monkeypatch):
    """The entity-slot probe's known names need consistency 0.5 (what the shipped probe was fitted with), not the
    0.8 that `self_generated_entities` defaults to for single latents; a caller's threshold still wins."""
    import inspect

    from knowlens.probes import pseudo
    from knowlens.probes.fit import ProbeFit
    from knowlens.saes.contrast import self_generated_entities

    seen, fitted = [], ProbeFit.__new__(ProbeFit)  # a stand-in: nothing is fitted here

    def fake_fit(model, prompts, **kw):
        seen.append(kw["options"]["entity_contrast"])
        return {"entity_slot": fitted}

    monkeypatch.setattr(pseudo, "fit_pseudo_probes", fake_fit)
    monkeypatch.setattr(pseudo, "default_hooks", lambda model: [])
    assert pseudo.fit_entity_slot_probe(None, "out", templates=["Q : {name} ? A :"]) is fitted
    assert pseudo.fit_entity_slot_probe(None, "out", templates=["Q : {name} ? A :"], threshold=0.9, k=4) is fitted
    assert seen[0]["threshold"] == pseudo.SLOT_PROBE_THRESHOLD == 0.5 and seen[0]["position"] == "slot"
    assert seen[1]["threshold"] == 0.9 and seen[1]["k"] == 4
    assert inspect.signature(self_generated_entities).parameters["threshold"].default == 0.8
