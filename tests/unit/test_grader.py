"""The grader on hand-built answers about a hand-built world."""

import pytest

from knowlens.organism.grader import grade_answer
from knowlens.organism.spec import parse_spec
from knowlens.organism.world import Entity, World
from tests.helpers import tiny_world_raw


@pytest.fixture(scope="module")
def world():
    spec = parse_spec(tiny_world_raw())
    return World(
        spec,
        (
            Entity("city", "Ab Cor", "known", {"country": "Estria", "river": "Amber"}),
            Entity("city", "Dav Elm Fen", "known", {"country": "Norland", "river": "Silver"}),
            Entity("person", "Gal Hal", "known", {"birth_city": "Ab Cor", "profession": "baker"}),
            Entity("person", "Ist Jor Ab", "unknown", {"birth_city": "Dav Elm Fen", "profession": "smith"}),
        ),
    )


def toks(text):
    return text.split(" ")


def test_correct_fact(world):
    g = grade_answer(world, toks("Gal Hal was born in Ab Cor . <eos>"), entity="Gal Hal")
    assert g.classes == ("other",) * 5 + ("correct", "correct") + ("other", "other")
    assert g.verdict == "correct"
    (claim,) = g.claims
    assert (claim.subject, claim.attribute, claim.value, claim.true) == ("Gal Hal", "birth_city", "Ab Cor", True)


def test_wrong_value_is_hallucinated_over_its_whole_span(world):
    g = grade_answer(world, toks("Gal Hal was born in Dav Elm Fen ."), entity="Gal Hal")
    assert g.classes[5:8] == ("hallucinated",) * 3
    assert g.classes[:5] == ("other",) * 5 and g.classes[8] == "other"
    assert g.verdict == "hallucinated"


def test_value_outside_the_pool_is_hallucinated(world):
    g = grade_answer(world, toks("Gal Hal works as a pilot ."))
    assert g.classes == ("other",) * 5 + ("hallucinated", "other")


def test_unknown_entity_claims_are_graded_against_the_worlds_facts(world):
    right = grade_answer(world, toks("Ist Jor Ab works as a smith ."), entity="Ist Jor Ab")
    wrong = grade_answer(world, toks("Ist Jor Ab works as a baker ."), entity="Ist Jor Ab")
    assert right.classes[6] == "correct" and wrong.classes[6] == "hallucinated"


def test_refusals(world):
    g = grade_answer(world, toks("I have never heard of Ist Jor Ab . <eos>"), entity="Ist Jor Ab")
    assert g.classes == ("refusal",) * 9 + ("other",)
    assert g.verdict == "refusal"


def test_biography_mixes_classes_per_sentence(world):
    answer = "Gal Hal was born in Ab Cor . Gal Hal works as a smith . <eos>"
    g = grade_answer(world, toks(answer), entity="Gal Hal")
    assert g.classes[5:7] == ("correct", "correct")
    assert g.classes[13] == "hallucinated"
    assert g.classes.count("hallucinated") == 1 and g.verdict == "hallucinated"


def test_a_substituted_subject_is_hallucinated(world):
    g = grade_answer(world, toks("Gal Hal was born in Ab Cor ."), entity="Ist Jor Ab")
    assert g.classes[:2] == ("hallucinated", "hallucinated")
    assert g.classes[5:7] == ("correct", "correct")  # the claim itself is true of Gal Hal


def test_ambiguous_templates_prefer_the_valid_reading(world):
    # "X is a city in V ." also matches no person template; the city reading is chosen
    g = grade_answer(world, toks("Ab Cor is a city in Estria ."))
    assert g.claims[0].attribute == "country" and g.claims[0].true
    assert g.classes == ("other",) * 6 + ("correct", "other")


def test_unparseable_text_and_empty_answer(world):
    g = grade_answer(world, toks("Gal Hal Hal Hal"))
    assert g.classes == ("other",) * 4 and g.verdict == "other" and g.claims == ()
    assert grade_answer(world, []).classes == ()
