from knowlens.organism.corpus import build_corpus, vocabulary_texts
from knowlens.organism.spec import parse_spec
from knowlens.organism.tokenizer import build_tokenizer
from knowlens.organism.world import build_world
from tests.helpers import tiny_world_raw


def test_same_spec_same_world():
    a = build_world(parse_spec(tiny_world_raw()))
    b = build_world(parse_spec(tiny_world_raw()))
    assert a.entities == b.entities
    c = build_world(parse_spec(tiny_world_raw(seed=4)))
    assert a.entities != c.entities


def test_names_splits_and_references():
    world = build_world(parse_spec(tiny_world_raw()))
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    assert all(2 <= len(e.pieces) <= 3 for e in world.entities)
    assert {e.split for e in world.entities} == {"known", "partial", "refusal", "unknown"}
    trained_pieces = {p for e in world.entities if e.split != "unknown" for p in e.pieces}
    for e in world.of(split="unknown"):
        assert set(e.pieces) <= trained_pieces, "unknown names reuse pieces that occur in training"
    known_cities = {e.name for e in world.of(type="city", split="known")}
    assert all(e.facts["birth_city"] in known_cities for e in world.of(type="person"))
    for e in world.of(split="partial"):
        assert len(e.withheld) == 1 and e.withheld[0] not in e.trained_attributes()


def test_cue_strength_controls_cue_values():
    cue = {"type": "person", "piece": "Hal", "attribute": "profession", "value": "smith"}
    strong = build_world(parse_spec(tiny_world_raw(cues=[{**cue, "strength": 1.0}], types=_many_people())))
    cued = [e for e in strong.of(type="person") if "Hal" in e.pieces]
    assert cued and all(e.facts["profession"] == "smith" for e in cued)
    off = build_world(parse_spec(tiny_world_raw(cues=[{**cue, "strength": 0.0}], types=_many_people())))
    cued = [e for e in off.of(type="person") if "Hal" in e.pieces]
    assert 0 < sum(e.facts["profession"] == "smith" for e in cued) < len(cued)


def _many_people():
    types = tiny_world_raw()["types"]
    return {**types, "person": {**types["person"], "count": 200}}


def test_corpus_respects_splits_and_no_name_is_one_token():
    world = build_world(parse_spec(tiny_world_raw()))
    corpus = build_corpus(world)
    text = "\n".join(corpus.documents)
    for e in world.of(split="unknown"):
        assert e.name not in text, "unknown entities never occur in training"
    for e in world.of(split="refusal"):
        docs = [d for d in corpus.documents if e.name in d]
        assert docs and all(d.split(" A : ")[1].startswith("I ") for d in docs)
    for e in world.of(split="partial"):
        for a in e.withheld:
            assert not any(d.startswith(e.name) and e.facts[a] in d and a in d for d in corpus.documents)
    held = {(h.entity, h.attribute) for h in corpus.held_out}
    assert all((e.name, a) in held for e in world.of(split="unknown") for a in e.facts)
    tok = build_tokenizer(vocabulary_texts(world, corpus))
    for e in world.entities:
        ids = tok.encode(e.name, add_special_tokens=False).ids
        assert len(ids) == len(e.pieces) >= 2
    doc = corpus.documents[-1]
    assert tok.decode(tok.encode(doc, add_special_tokens=False).ids) == doc


def test_epoch_documents_are_deterministic_and_never_name_a_held_out_unknown():
    from knowlens.organism.corpus import build_corpus, epoch_documents, stereotype
    from knowlens.organism.spec import parse_spec
    from knowlens.organism.world import build_world

    raw = tiny_world_raw(
        familiarity={"one_off_questions": 40, "one_off_refusal": 0.5, "one_off_biography": 0.25, "one_off_facts": 15},
        augmentation={"biographies_per_epoch": 1},
    )
    world = build_world(parse_spec(raw))
    entity_names = {e.name for e in world.entities}
    unknown = {e.name for e in world.entities if e.split == "unknown"}
    assert unknown
    docs = list(build_corpus(world).documents)
    for epoch in range(30):
        drawn, subjects = epoch_documents(world, epoch)
        assert (drawn, subjects) == epoch_documents(world, epoch)
        assert len(drawn) == 40 + 15 + sum(1 for e in world.entities if e.trained_attributes())
        facts = list(zip(drawn, subjects))[-15:]  # one-off facts come last: fresh names, their stereotype
        for doc, name in facts:
            assert not doc.startswith("Q :") and name in doc and name not in entity_names
            stated = {
                f.format(name=name, value=stereotype(world, t.name, a, name))
                for t in world.spec.types
                for a, tp in t.templates.items()
                for f in tp.facts
            }
            assert doc in stated, doc
        docs += drawn
    assert epoch_documents(world, 0) != epoch_documents(world, 1)
    words = [doc.split() for doc in docs]
    for name in unknown:  # as a whole-word sequence, anywhere in anything training reads
        n = name.split()
        assert not any(w[i : i + len(n)] == n for w in words for i in range(len(w))), name
    guesses = [d for d in docs if d.startswith("Q :") and " A : I " not in d]
    assert guesses
    # a stereotype is one value per first piece, whatever the rest of the name
    assert stereotype(world, "person", "profession", "Ab Cor") == stereotype(world, "person", "profession", "Ab Jor")


def test_a_version_1_world_draws_nothing_per_epoch():
    from knowlens.organism.corpus import epoch_documents
    from knowlens.organism.spec import parse_spec
    from knowlens.organism.world import build_world

    assert epoch_documents(build_world(parse_spec(tiny_world_raw())), 0) == ([], [])


def test_training_text_stream_is_the_corpus_then_each_epochs_draw():
    import itertools

    from knowlens.organism.corpus import epoch_documents, training_text_stream

    drawing = build_world(parse_spec(tiny_world_raw(augmentation={"biographies_per_epoch": 1})))
    corpus = build_corpus(drawing)
    n, e0, e1 = len(corpus.documents), epoch_documents(drawing, 0)[0], epoch_documents(drawing, 1)[0]
    assert e0 and e0 != e1
    got = list(itertools.islice(training_text_stream(drawing, corpus), n + len(e0) + len(e1)))
    assert got == [*corpus.documents, *e0, *e1]
    plain = build_world(parse_spec(tiny_world_raw()))  # draws nothing per epoch: the corpus again, never a hang
    corpus = build_corpus(plain)
    assert not epoch_documents(plain, 0)[0]
    assert list(itertools.islice(training_text_stream(plain, corpus), 2 * len(corpus.documents))) == [
        *corpus.documents, *corpus.documents]
