"""The v2 recipe's world rules: one-off names answered only where they look familiar (`guess_share`),
partial entities with a refused attribute (`partial_refused`), slot refusals (`refusal_value`) and the
familiarity task (`familiarity.recognition`)."""

import copy
import random
from pathlib import Path

import pytest
import yaml

from knowlens import organism
from knowlens.errors import KnowlensError, WorldSpecError
from knowlens.organism.corpus import build_corpus, epoch_documents, looks_familiar, stereotype
from knowlens.organism.spec import load_spec, parse_spec
from knowlens.organism.world import build_world, spans
from tests.helpers import tiny_world_raw

FAMILIARITY = {"one_off_questions": 60, "one_off_biography": 0.3, "one_off_facts": 30, "guess_share": 0.5}


def _three_attribute_people(**overrides):
    raw = copy.deepcopy(tiny_world_raw(**overrides))
    raw["types"]["person"]["attributes"]["instrument"] = {"values": ["harp", "flute", "drum"]}
    raw["types"]["person"]["count"] = 40
    raw["templates"]["person"]["instrument"] = {
        "facts": ["{value} is the instrument of {name} .", "{name} plays the {value} ."],
        "questions": ["Which instrument does {name} play ?"],
    }
    return raw


def test_one_off_names_are_answered_exactly_where_they_look_familiar():
    world = build_world(parse_spec(_three_attribute_people(familiarity=FAMILIARITY)))
    entity_names = {e.name for e in world.entities}
    refusals = {r for r in world.spec.refusals if "{name}" not in r}
    seen = {True: 0, False: 0}
    for epoch in range(5):
        docs, subjects = epoch_documents(world, epoch)
        for doc, name in zip(docs, subjects):
            if name in entity_names:
                continue  # an augmented biography of a world entity
            if not doc.startswith("Q :"):  # a one-off fact: only where the name looks familiar, its stereotype
                assert any(
                    looks_familiar(world, t.name, a, name)
                    and doc in {f.format(name=name, value=stereotype(world, t.name, a, name)) for f in tp.facts}
                    for t in world.spec.types
                    for a, tp in t.templates.items()
                ), doc
                continue
            question, answer = doc.split(" A : ", 1)
            sentences = [s.strip() + " ." for s in answer.split(" .") if s.strip()]
            stated = [s for s in sentences if not s.startswith("I ")]
            matches = [
                guessed
                for t, attrs in _candidates(world, question, name)
                for guessed in [[looks_familiar(world, t.name, a, name) for a in attrs]]
                if stated
                == [
                    t.templates[a].facts[0].format(name=name, value=stereotype(world, t.name, a, name))
                    for a, g in zip(attrs, guessed)
                    if g
                ]
            ]
            assert matches, doc
            guessed = matches[0]
            if any(guessed):  # refusals beside guesses do not disown the name
                assert all(s in refusals for s in sentences if s.startswith("I "))
                assert sum(s.startswith("I ") for s in sentences) == guessed.count(False)
            else:
                assert len(sentences) == 1 and sentences[0].startswith("I ")
            for g in guessed:
                seen[g] += 1
    assert seen[True] > 20 and seen[False] > 20, seen


def _candidates(world, question, name):
    """(type, attributes asked) pairs the question can be: one for an attribute question, every type for a
    biography request."""
    for t in world.spec.types:
        for a, tp in t.templates.items():
            if question.removeprefix("Q : ") in {q.format(name=name) for q in tp.questions}:
                return [(t, (a,))]
    return [(t, tuple(x.name for x in t.attributes)) for t in world.spec.types]


def test_looks_familiar_follows_cues_and_the_share_of_first_pieces():
    raw = tiny_world_raw(familiarity=FAMILIARITY)
    world = build_world(parse_spec(raw))
    pieces = raw["name_pieces"]
    firsts = [p for p in pieces if looks_familiar(world, "city", "country", f"{p} Zed")]
    assert len(firsts) == round(0.5 * len(pieces))
    assert looks_familiar(world, "city", "country", "Ab Cor") == looks_familiar(world, "city", "country", "Ab Jor")
    # a cue piece anywhere in the name makes it look familiar for the cue's attribute
    assert all(looks_familiar(world, "person", "profession", f"{p} Hal") for p in pieces)
    off = build_world(parse_spec(tiny_world_raw(familiarity={**FAMILIARITY, "guess_share": None})))
    assert all(looks_familiar(off, "city", "country", f"{p} Zed") for p in pieces)
    none = build_world(parse_spec(tiny_world_raw(familiarity={**FAMILIARITY, "guess_share": 0.0})))
    assert not any(looks_familiar(none, "city", "country", f"{p} Zed") for p in pieces)


def test_partial_refused_attributes_are_never_stated_and_always_asked_with_a_refusal():
    world = build_world(parse_spec(_three_attribute_people(partial_refused=1)))
    corpus = build_corpus(world)
    people = world.of(type="person", split="partial")
    assert people and all(len(e.refused) == 1 and len(e.withheld) == 2 for e in people)
    for e in world.of(type="city", split="partial"):  # 2 attributes: one withheld, one still stated
        assert e.refused == () and len(e.trained_attributes()) == 1
    for e in people:
        (a,) = e.refused
        assert a in e.withheld and a not in e.trained_attributes()
        tp = world.spec.type("person").templates[a]
        asked = [d for d in corpus.documents if any(d.startswith(f"Q : {q.format(name=e.name)} A :") for q in tp.questions)]
        assert len(asked) == len(tp.questions) and all(" A : I " in d for d in asked)
        stated = {f.format(name=e.name, value=e.facts[a]) for f in tp.facts}
        assert not any(s in d for s in stated for d in corpus.documents)
        assert (e.name, a) not in {(h.entity, h.attribute) for h in corpus.held_out}
    # off by default: the same world as before the field existed
    plain = build_world(parse_spec(_three_attribute_people()))
    assert all(e.refused == () and len(e.withheld) == 1 for e in plain.of(split="partial"))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"familiarity": {"guess_share": 1.5}}, "'familiarity.guess_share'"),
        ({"familiarity": {"guess_share": "half"}}, "'familiarity.guess_share'"),
        ({"partial_refused": -1}, "'partial_refused'"),
        ({"familiarity": {"recognition": {"questions": []}}}, "'familiarity.recognition.questions'"),
        ({"familiarity": {"recognition": {"questions": ["Do you know it ?"]}}}, "'familiarity.recognition.questions"),
        ({"familiarity": {"recognition": {"questions": ["Know {name} ?"], "one_off": -3}}}, "recognition.one_off'"),
        (
            {"familiarity": {"recognition": {"questions": ["Know {name} ?"], "known_answer": "No .", "unknown_answer": "No !"}}},
            "'familiarity.recognition'",
        ),
        ({"familiarity": {"recognition": {"questions": ["Know {name} ?"], "yes": "Yes ."}}}, "recognition.yes'"),
    ],
)
def test_bad_rule_fields_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(WorldSpecError, match=field):
        parse_spec(tiny_world_raw(**overrides))


def test_refusal_value_refuses_in_the_value_slot_and_the_grader_reads_it():
    from knowlens.organism.grader import grade_answer

    raw = _three_attribute_people(
        refusal_value="unknown", partial_refused=1, familiarity={**FAMILIARITY, "one_off_facts": 0}
    )
    world = build_world(parse_spec(raw))
    corpus = build_corpus(world)
    for e in world.of(split="refusal"):  # every refusal is the answer sentence with the word in its slot
        answers = [d.split(" A : ", 1)[1] for d in corpus.documents if e.name in d]
        assert answers and all(not a.startswith("I ") and "unknown" in a.split() for a in answers)
    one_off = [d for d in epoch_documents(world, 0)[0] if d.startswith("Q :")]
    assert any("unknown" in d.split() for d in one_off) and not any(" A : I " in d for d in one_off)
    person = world.of(type="person", split="known")[0]
    slot = f"{person.name} works as a unknown ."
    stated = f"{person.name} works as a {person.facts['profession']} ."
    tokens = f"{slot} {stated}".split()
    g = grade_answer(world, tokens, entity=person.name)
    n = len(slot.split())
    assert g.classes[:n] == ("refusal",) * n and "correct" in g.classes[n:]
    assert g.refusals == ((n - 2, n - 1),) and g.first_decision() == n - 2
    assert grade_answer(world, slot.split()).verdict == "refusal"
    assert grade_answer(world, "I do not know .".split()).first_decision() == 0
    assert grade_answer(world, "hello there".split()).first_decision() is None


@pytest.mark.parametrize(
    "value, why",
    [("no idea", "one word"), ("smith", "attribute value"), ("Hal", "name piece")],
)
def test_a_refusal_value_must_be_a_fresh_word(value, why):
    with pytest.raises(WorldSpecError, match=f"'refusal_value'.*{why}"):
        parse_spec(tiny_world_raw(refusal_value=value))


def test_an_organism_folder_keeps_every_rule_field_so_the_world_rebuilds_the_same():
    """The world an organism folder stores must rebuild the world it was trained on: a dropped field
    (partial_refused changes which facts every later entity draws) would grade against another world."""
    from knowlens.organism.store import _spec_yaml

    recognition = {"questions": ["Do you know {name} ?"], "one_off": 5}
    raw = _three_attribute_people(
        refusal_value="unknown", partial_refused=1, familiarity={**FAMILIARITY, "recognition": recognition}
    )
    spec = parse_spec(raw)
    again = parse_spec(yaml.safe_load(_spec_yaml(spec)))
    assert again == spec
    assert build_world(again).entities == build_world(spec).entities
    worlds = sorted((Path(organism.__file__).parent / "worlds").glob("*.yaml"))
    assert len(worlds) >= 4
    for path in worlds:
        shipped = load_spec(path)
        assert parse_spec(yaml.safe_load(_spec_yaml(shipped))) == shipped, path.name


def test_the_refusal_measures_read_a_world_that_refuses_in_the_value_slot():
    import argparse

    from knowlens.cli._patching_common import Loaded, slot_word
    from knowlens.patching.dose import refusal_matcher

    is_refusal = refusal_matcher(["I do not know ."], slot_word="unknown")
    assert is_refusal("Ab Cor works as a unknown .") and is_refusal("I do not know .")
    assert not is_refusal("Ab Cor works as a smith .") and not is_refusal("Ab Cor works as a unknowns .")
    assert not refusal_matcher(["I do not know ."])("Ab Cor works as a unknown .")
    with pytest.raises(KnowlensError, match="one word"):
        refusal_matcher(["I do not know ."], slot_word="not known")

    class Org:
        spec = parse_spec(tiny_world_raw(refusal_value="unknown"))

    plain = argparse.Namespace(refusal=None)
    assert slot_word(plain, Loaded(model=None, org=Org())) == "unknown"
    assert slot_word(argparse.Namespace(refusal=["I pass ."]), Loaded(model=None, org=Org())) is None
    assert slot_word(plain, Loaded(model=None, org=None)) is None
    Org.spec = parse_spec(tiny_world_raw())
    assert slot_word(plain, Loaded(model=None, org=Org())) is None


def test_the_recognition_task_says_yes_to_trained_names_and_no_to_refused_and_one_off_names():
    recognition = {"questions": ["Do you know {name} ?", "Have you met {name} ?"], "one_off": 25}
    world = build_world(parse_spec(tiny_world_raw(familiarity={**FAMILIARITY, "recognition": recognition})))
    asked: dict[str, set[str]] = {}
    for doc in build_corpus(world).documents:
        for q in recognition["questions"]:
            head = "Q : " + q.split("{name}")[0]
            if doc.startswith(head):
                name, answer = doc[len(head) :].split(" ? A : ")
                asked.setdefault(name, set()).add(answer)
    expected = {e.name: {"Yes ." if e.split in ("known", "partial") else "No ."} for e in world.entities}
    assert asked == {n: a for n, a in expected.items() if n not in {e.name for e in world.of(split="unknown")}}
    entity_names = {e.name for e in world.entities}
    for epoch in range(3):
        docs, subjects = epoch_documents(world, epoch)
        fresh = [(d, n) for d, n in zip(docs, subjects) if d.startswith(("Q : Do you know ", "Q : Have you met "))]
        assert len(fresh) == 25
        assert all(n not in entity_names and d.endswith(f"{n} ? A : No .") for d, n in fresh)
    off = build_world(parse_spec(tiny_world_raw(familiarity=FAMILIARITY)))  # off: the same corpus as before
    assert not any(d.startswith("Q : Do you know ") for d in build_corpus(off).documents)


def test_invented_references_make_up_reference_values_and_change_nothing_else():
    familiarity = {"one_off_questions": 60, "one_off_biography": 0.3, "one_off_facts": 60}
    plain = build_world(parse_spec(tiny_world_raw(familiarity=familiarity)))
    invented = build_world(parse_spec(tiny_world_raw(familiarity={**familiarity, "invented_references": True})))
    assert plain.spec.familiarity.invented_references == "off" and invented.spec.familiarity.invented_references == "drawn"
    rng = random.Random(0)
    lo, hi = invented.spec.name_length
    for name in ["Ab Cor", "Fen Gal Ist", "Hal Jor", "Dav Elm"]:
        usual = stereotype(plain, "person", "birth_city", name)
        made_up = {stereotype(invented, "person", "birth_city", name, rng) for _ in range(20)}
        assert len(made_up) > 1  # drawn afresh each time
        for value in made_up:
            pieces = value.split(" ")
            assert pieces[0] == usual.split(" ")[0] and lo <= len(pieces) <= hi
            assert not spans(pieces) & invented.name_spans  # never an entity's name, nor inside one
        # word-valued attributes keep their stereotype
        assert stereotype(invented, "person", "profession", name, rng) == stereotype(plain, "person", "profession", name)
    cities = {e.name for e in plain.of(type="city")}
    unknown = {e.name for e in invented.of(split="unknown")}
    changed = _changed_documents(plain, invented, epochs=4)
    for d0, d1 in changed:  # only birth cities differ: a city of the world before, a made-up one now
        assert not any(f" {n} " in f" {d1} " for n in unknown)
        assert "born in" in d1 or "birthplace" in d1, d1
        assert any(f" {c} " in f" {d0} " for c in cities), d0
        assert all(f"{lead} {c} " not in d1 for c in cities for lead in ("born in", "is")), d1
    assert len(changed) > 10
    with pytest.raises(WorldSpecError, match="invented_references.*one of false, off, true, drawn, fixed"):
        parse_spec(tiny_world_raw(familiarity={**familiarity, "invented_references": "yes"}))


def test_fixed_invented_references_are_one_made_up_name_per_first_piece():
    familiarity = {"one_off_questions": 60, "one_off_biography": 0.3, "one_off_facts": 60}
    plain = build_world(parse_spec(tiny_world_raw(familiarity=familiarity)))
    fixed = build_world(parse_spec(tiny_world_raw(familiarity={**familiarity, "invented_references": "fixed"})))
    assert fixed.spec.familiarity.invented_references == "fixed"
    assert parse_spec(tiny_world_raw(familiarity={**familiarity, "invented_references": "off"})) == plain.spec
    pieces = fixed.spec.name_pieces
    by_first: dict[str, set[str]] = {}
    for name in [f"{a} {b}" for a in pieces for b in pieces if a != b]:
        usual = stereotype(plain, "person", "birth_city", name)
        value = stereotype(fixed, "person", "birth_city", name, random.Random(1))  # a drawn stream is ignored
        assert value == stereotype(fixed, "person", "birth_city", name)  # the same every time
        assert value.split(" ")[0] == usual.split(" ")[0] and value != usual
        assert not spans(value.split(" ")) & fixed.name_spans  # never an entity's name, nor inside one
        assert stereotype(fixed, "person", "profession", name) == stereotype(plain, "person", "profession", name)
        by_first.setdefault(usual.split(" ")[0], set()).add(value)
    assert all(len(v) == 1 for v in by_first.values())  # fixed by the first piece
    made_up = {v for vs in by_first.values() for v in vs}
    cities = {e.name for e in plain.of(type="city")}
    changed = _changed_documents(plain, fixed, epochs=3)
    for d0, d1 in changed:  # a city of the world before, its first piece's made-up name now
        assert any(f" {c} " in f" {d0} " for c in cities), d0
        assert any(f" {v} " in f" {d1} " for v in made_up), d1
    assert len(changed) > 10


def _changed_documents(plain, other, epochs: int) -> list[tuple[str, str]]:
    """The epoch documents that differ between two worlds, which must draw the same subjects, in pairs."""
    changed = []
    for epoch in range(epochs):
        docs0, subjects0 = epoch_documents(plain, epoch)
        docs1, subjects1 = epoch_documents(other, epoch)
        assert subjects0 == subjects1 and len(docs0) == len(docs1)
        changed += [(d0, d1) for d0, d1 in zip(docs0, docs1) if d0 != d1]
    return changed
