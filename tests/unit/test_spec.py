import copy

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from knowlens.errors import WorldSpecError
from knowlens.organism import DEFAULT_WORLD
from knowlens.organism.spec import load_spec, parse_spec
from tests.helpers import tiny_world_raw


def test_default_world_is_valid():
    spec = load_spec(DEFAULT_WORLD)
    assert {t.name for t in spec.types} >= {"person", "city", "work"}
    assert 0.0 <= spec.cue_strength <= 1.0
    assert abs(sum(spec.splits.values()) - 1.0) < 1e-9
    assert spec.cues, "the default world has surface cues"


def test_tiny_world_is_valid():
    spec = parse_spec(tiny_world_raw())
    assert spec.type("person").attribute("birth_city").ref == "city"
    assert spec.cues[0].strength == pytest.approx(0.9)  # defaults to cue_strength


def _broken(mutate):
    raw = copy.deepcopy(tiny_world_raw())
    mutate(raw)
    return raw


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("splits"), "'splits'"),
        (lambda r: r["splits"].update(known=0.9), "'splits'"),
        (lambda r: r["splits"].update(unknown=-0.1), "'splits.unknown'"),
        (lambda r: r["splits"].pop("refusal"), "'splits.refusal'"),
        (lambda r: r.update(cue_strength=1.5), "'cue_strength'"),
        (lambda r: r["templates"]["person"].update(height={"facts": ["{name} is {value} ."], "questions": ["?"]}), "'templates.person.height'"),
        (lambda r: r["templates"]["person"].pop("profession"), "'templates.person.profession'"),
        (lambda r: r["templates"]["person"]["profession"].update(facts=["{name} works ."]), "'templates.person.profession.facts[0]'"),
        (lambda r: r["templates"]["person"]["profession"].update(questions=["What is {nam} ?"]), "'templates.person.profession.questions[0]'"),
        (lambda r: r["types"]["person"]["attributes"]["birth_city"].update(ref="town"), "'types.person.attributes.birth_city.ref'"),
        (lambda r: r["types"]["person"].update(count="many"), "'types.person.count'"),
        (lambda r: r["cues"][0].update(piece="Zzz"), "'cues[0].piece'"),
        (lambda r: r["cues"][0].update(value="pilot"), "'cues[0].value'"),
        (lambda r: r["cues"][0].update(attribute="birth_city", value="x"), "'cues[0].attribute'"),
        (lambda r: r.update(name_length=[1, 3]), "'name_length'"),
        (lambda r: r.update(refusals=["No idea ."]), "'refusals[0]'"),
        (lambda r: r.update(colour="blue"), "'colour'"),
        (lambda r: r.update(name_pieces=["Ab", "Ab", "Cor", "Dav"]), "'name_pieces'"),
        (lambda r: r.update(familiarity={"one_off_facts": -3}), "'familiarity.one_off_facts'"),
        (lambda r: r.update(familiarity={"one_off_refusal": 2}), "'familiarity.one_off_refusal'"),
        (lambda r: r.update(familiarity={"one_off_fact": 3}), "'familiarity.one_off_fact'"),
        (lambda r: r.update(familiarity={"invented_references": 1}), "'familiarity.invented_references'"),
        (lambda r: r.update(augmentation={"biographies_per_epoch": "two"}), "'augmentation.biographies_per_epoch'"),
    ],
)
def test_mistakes_are_rejected_naming_the_field(mutate, field):
    with pytest.raises(WorldSpecError) as err:
        parse_spec(_broken(mutate))
    msg = str(err.value)
    assert field in msg
    assert "\n" not in msg


def test_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("types: [unclosed\n")
    with pytest.raises(WorldSpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(Exception, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_world_raw()))
    assert load_spec(good).name == "tiny"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=4))
def test_split_fractions_must_sum_to_one(fracs):
    raw = tiny_world_raw(splits=dict(zip(("known", "partial", "refusal", "unknown"), fracs)))
    total = sum(fracs)
    if abs(total - 1) > 1e-6 or fracs[0] == 0:
        with pytest.raises(WorldSpecError, match="splits"):
            parse_spec(raw)
    else:
        assert parse_spec(raw).splits["known"] == fracs[0]


def test_every_shipped_world_spec_parses_and_its_unknown_names_never_occur_in_training():
    from pathlib import Path

    from knowlens.organism.corpus import build_corpus, epoch_documents
    from knowlens.organism.spec import load_spec
    from knowlens.organism.world import build_world

    worlds = sorted((Path(__file__).parents[2] / "knowlens" / "organism" / "worlds").glob("*.yaml"))
    assert len(worlds) >= 3
    for path in worlds:
        world = build_world(load_spec(path))
        unknown = {e.name for e in world.entities if e.split == "unknown"}
        texts = list(build_corpus(world).documents) + epoch_documents(world, 0)[0] + epoch_documents(world, 1)[0]
        words = [t.split() for t in texts]
        for name in unknown:
            n = name.split()
            assert not any(w[i : i + len(n)] == n for w in words for i in range(len(w))), (path.name, name)
