"""Answer frames (where a model's answers first depend on the entity) and the slot position of
locate_entity_known; self-generated entities keep only names the model states a non-generic fact about."""

from __future__ import annotations

import pytest
import torch

from knowlens.errors import KnowlensError
from knowlens.saes import contrast as contrast_mod
from knowlens.saes import locate_entity_known, self_generated_entities
from knowlens.saes.entity import entity_activations
from knowlens.saes.frames import _frames, answer_frames
from tests.helpers import word_level_model
from tests.unit.test_saes_entity import KNOWN, TEMPLATES, UNKNOWN, hooks_left, planted_sae


@pytest.fixture(scope="module")
def model():
    return word_level_model()


def test_frames_stop_where_the_answers_branch():
    answers = [
        ("Ab Cor", " Ab Cor was born in Ros Wen . Ab Cor plays the harp ."),
        ("Bel Dav", " Bel Dav was born in Tav Pel ."),
        ("Cal Elm", " Cal Elm was born in Mor Ist ."),
        ("Dor Fen", " Dor Fen is a city in Estria ."),
        ("Gal Hal", " Gal Hal is a city in Norland ."),
        ("Ist Jor", " Ist Jor is a city in Sarnia ."),
        ("Kel Lor", " Kel Lor sings {loudly} ."),  # alone: below min_names, never a frame
    ]
    # "{name}" -> was (3) / is (3) / sings (1): the top word has 3 of 7 <= 0.5, so the name itself is the frame
    assert _frames(answers, min_names=2, branch_share=0.5, max_words=12) == (" {name}",)
    # a stricter branch share walks on: "was born in" and "is a city in" are where the values differ
    got = _frames(answers, min_names=2, branch_share=0.4, max_words=12)
    assert got == (" {name} is a city in", " {name} was born in")  # most common first; ties by word
    assert _frames(answers, min_names=4, branch_share=0.4, max_words=12) == ()  # no branch has 4 names
    assert _frames(answers, min_names=2, branch_share=0.4, max_words=2) == ()  # too deep
    # the name inside a frame is replaced too, braces in the model's text are escaped for str.format
    echo = [(n, f" {n} said {n} {{x}} {v} .") for n, v in (("Ab Cor", "yes"), ("Bel Dav", "no"), ("Cal Elm", "ok"))]
    (frame,) = _frames(echo, min_names=2, branch_share=0.5, max_words=12)
    assert frame == " {name} said {name} {{x}}" and frame.format(name="Zed Ab") == " Zed Ab said Zed Ab {x}"


def test_branches_the_unknown_answers_follow_too_are_walked_past():
    # known answers split by kind at the name (as a world of several types does), then by value; the unknown
    # names' answers take one of the same kinds and leave the known answers only at the value
    known = [("Ab Cor", " Ab Cor comes from Ros Wen ."), ("Bel Dav", " Bel Dav comes from Tav ."),
             ("Cal Elm", " Cal Elm comes from Mor ."), ("Dor Fen", " Dor Fen rises from the Amber sea ."),
             ("Gal Hal", " Gal Hal rises from the Grey sea ."), ("Ist Jor", " Ist Jor rises from the Still sea .")]
    unknown = [("Kel Lor", " Kel Lor comes from unrecorded ."), ("Nim Ost", " Nim Ost comes from unrecorded ."),
               ("Pel Quin", " Pel Quin comes from Tav .")]  # fmt: skip
    alone = _frames(known, min_names=2, branch_share=0.5, max_words=12)
    assert alone == (" {name}",)  # comes 3 / rises 3: the name itself
    both = _frames(known, min_names=2, branch_share=0.5, max_words=12, unknown=unknown, min_unknown=2)
    # at the name all 3 unknown answers go on with "comes" (followed by 3 known ones): walked past; at "comes from"
    # 2 of 3 say a word no known answer is followed by: a frame; "rises from the": no unknown answer, a frame
    assert both == (" {name} comes from", " {name} rises from the")
    # too few unknown answers continue a branch to tell (min_unknown): the known side decides, as alone
    assert _frames(known, min_names=2, branch_share=0.5, max_words=12, unknown=unknown, min_unknown=4) == alone
    # unknown answers that stay on the known ones' followed words at "comes from" too (they make up a value known
    # names have): walked past, but no frame below it in the first sentence, so the branch is the frame after all
    echo = [("Kel Lor", " Kel Lor comes from Tav . Kel Lor is a baker ."), ("Nim Ost", " Nim Ost comes from Tav .")]
    twice = [*known[:1], ("Bel Dav", " Bel Dav comes from Tav . Bel Dav is a baker ."), *known[2:],
             ("Sul Tor", " Sul Tor comes from Tav . Sul Tor is a smith ."), ("Ull Vor", " Ull Vor comes from Ist .")]
    got = _frames(twice, min_names=2, branch_share=0.5, max_words=12, unknown=echo, min_unknown=2)
    assert got == (" {name} comes from", " {name} rises from the")  # not " {name} comes from Tav . {name} is a"
    never = _frames(twice, min_names=2, branch_share=0.5, max_words=12, unknown=echo, min_unknown=2, stay_share=1.0)
    assert never == _frames(twice, min_names=2, branch_share=0.5, max_words=12)  # stay_share 1: never "mostly"
    assert never == (" {name} comes from", " {name} rises from the")


def test_answer_frames_on_a_model(model):
    got = answer_frames(model, KNOWN, TEMPLATES, max_new_tokens=4, min_share=0.0, branch_share=1.0)
    assert set(got.frames) == set(TEMPLATES) and all(0 <= n <= len(KNOWN) for n in got.n_answers.values())
    assert got == answer_frames(model, KNOWN, TEMPLATES, max_new_tokens=4, min_share=0.0, branch_share=1.0)
    assert got.slot_templates == tuple(t + f for t in TEMPLATES for f in got.frames[t])
    with pytest.raises(KnowlensError, match="2 or more names"):
        answer_frames(model, KNOWN[:1], TEMPLATES)
    with pytest.raises(KnowlensError, match="branch_share"):
        answer_frames(model, KNOWN, TEMPLATES, branch_share=2.0)
    with pytest.raises(KnowlensError, match="stay_share"):
        answer_frames(model, KNOWN, TEMPLATES, stay_share=-0.1)
    both = answer_frames(model, KNOWN, TEMPLATES, max_new_tokens=4, min_share=0.0, branch_share=1.0,
                         unknown_names=UNKNOWN)  # fmt: skip
    assert set(both.frames) == set(TEMPLATES) and both.params["n_unknown_names"] == len(UNKNOWN)
    assert set(both.params["frames_from_both_sides"]) == set(TEMPLATES)
    for t in TEMPLATES:  # a template where the unknown answers gave no frame keeps the known side's frames
        if not both.params["frames_from_both_sides"][t]:
            assert both.frames[t] == got.frames[t]
    assert "n_unknown_names" not in got.params
    assert hooks_left(model) == []


def test_the_slot_position_reads_the_slot_templates_last_token(model):
    sae = planted_sae(model)  # latent 3 fires on the last token of a known name, 4 on an unknown one's
    slots = ("w5 w6 {name} w7 {name}", "w8 {name} w9 w10")  # the first ends on the name, the second on w10
    found = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, positions=("name", "slot"),
                                slot_templates=slots, top=3, rank_by="separation")  # fmt: skip
    assert set(found) == {("name", "known"), ("name", "unknown"), ("slot", "known"), ("slot", "unknown")}
    fk = found["slot", "known"]
    assert fk.latents[0] == 3 and float(fk.scores[0]) == 0.5  # active on one slot template of two
    by_auroc = locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=TEMPLATES, positions=("slot",),
                                   slot_templates=slots, top=3, holdout=0)  # the default ranking  # fmt: skip
    assert by_auroc["slot", "known"].latents[0] == 3 and float(by_auroc["slot", "known"].scores[0]) == 1.0
    assert fk.params["slot_templates"] == list(slots) and found["name", "known"].params["slot_templates"] is None
    acts = entity_activations(model, sae, KNOWN + UNKNOWN, templates=TEMPLATES, slot_templates=slots)
    assert acts["slot"].shape == (len(KNOWN) + len(UNKNOWN), 2, 12)
    assert torch.equal(acts["slot"][:, 0], acts["name"][:, 0])  # the first slot template ends where the name does
    assert bool((acts["slot"][: len(KNOWN), 1, 3] == 0).all())  # w10 is no name token
    with pytest.raises(KnowlensError, match="exactly once"):
        locate_entity_known(model, sae, KNOWN, UNKNOWN, templates=("{name} {name}",))
    assert hooks_left(model) == []


def test_self_generated_names_need_a_fact_that_is_not_generic(monkeypatch):
    """Three names answered with the same refusal (generic), one with nothing but '.', one with a fact."""
    said = {"Ab Cor": "Ab Cor was born in Ros Wen .", "Dor Fen": ".",
            **{n: f"{n} was born in unknown ." for n in ("Bel Dav", "Cal Elm", "Gal Hal")}}  # fmt: skip

    def fake_tokens(model, text):
        return [text]

    def fake_sample(model, rows, *, max_new_tokens, rng, batch_size):
        out = []
        for (text,) in rows:
            name = next((n for n in said if n in text), None)
            out.append(said[name] if name else "I met " + " and ".join(said) + " .")
        return out

    monkeypatch.setattr(contrast_mod, "_tokens", fake_tokens)
    monkeypatch.setattr(contrast_mod, "_sample", fake_sample)
    got = self_generated_entities(object(), prompt="start", n_samples=2, k=4, rounds=1, generic_share=0.1)
    assert got.names == ("Ab Cor",) and got.scores == (1.0,)
    assert set(got.rejected) == {"Bel Dav", "Cal Elm", "Gal Hal", "Dor Fen"}
    assert got.params["n_generic"] == 3 and got.params["generic_sentences"] == ["{name} was born in unknown ."]
    loose = self_generated_entities(object(), prompt="start", n_samples=2, k=4, rounds=1, generic_share=1.0)
    assert set(loose.names) == {"Ab Cor", "Bel Dav", "Cal Elm", "Gal Hal"}  # "." states nothing: consistency 0
