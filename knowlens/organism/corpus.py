"""The training corpus of a world (facts in several phrasings, Q/A turns, refusals, biographies) and the
held-out questions that the behaviour gates and the demo ask.

A Q/A turn reads ``Q : <question> A : <answer>``. The answer to an attribute question is the attribute's first
fact template; a biography is the first fact template of every attribute, in spec order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from knowlens.organism.spec import TypeSpec
from knowlens.organism.world import Entity, World, spans


@dataclass(frozen=True)
class EvalItem:
    """One held-out question. `attribute` is None for a biography request."""

    entity: str
    type: str
    split: str
    attribute: str | None
    question: str
    withheld: bool  # the asked attribute was withheld from training (partial entities)

    @property
    def prompt(self) -> str:
        return qa_prompt(self.question)

    @property
    def kind(self) -> str:
        return "biography" if self.attribute is None else "question"


@dataclass(frozen=True)
class Corpus:
    documents: tuple[str, ...]  # training documents (no BOS/EOS)
    subjects: tuple[str, ...]  # the entity each document is about (its name)
    held_out: tuple[EvalItem, ...]  # questions never trained, with the entity's split


def qa_prompt(question: str) -> str:
    return f"Q : {question} A :"


def answer_for(world: World, entity: Entity, attribute: str) -> str:
    tpl = world.spec.type(entity.type).templates[attribute].facts[0]
    return tpl.format(name=entity.name, value=entity.facts[attribute])


def biography_for(world: World, entity: Entity, attributes: tuple[str, ...] | None = None) -> str:
    attrs = attributes if attributes is not None else tuple(entity.facts)
    return " ".join(answer_for(world, entity, a) for a in attrs)


def build_corpus(world: World) -> Corpus:
    """Deterministic for the world's seed."""
    spec = world.spec
    rng = random.Random(spec.seed + 1)
    recognition = spec.familiarity.recognition
    docs: list[str] = []
    subjects: list[str] = []
    held: list[EvalItem] = []

    def item(e: Entity, attribute: str | None, question: str) -> EvalItem:
        return EvalItem(e.name, e.type, e.split, attribute, question, attribute in e.withheld)

    def refusal(e: Entity, attributes: tuple[str, ...] | None = None) -> str:
        if spec.refusal_value is None:
            return rng.choice(spec.refusals).format(name=e.name)
        return slot_refusal(world, e.type, e.name, attributes if attributes is not None else tuple(e.facts))

    for e in world.entities:
        n_docs = len(docs)
        templates = spec.type(e.type).templates
        bio_questions = [q.format(name=e.name) for q in spec.biography_questions]
        if e.split in ("known", "partial"):
            for a in e.trained_attributes():
                docs.extend(f.format(name=e.name, value=e.facts[a]) for f in templates[a].facts)
        trainable = e.split in ("known", "partial", "refusal")
        qa = {a: trainable and a not in e.withheld and rng.random() < spec.qa_train_fraction for a in e.facts}
        if e.split == "refusal" and not any(qa.values()):
            qa[next(iter(qa))] = True  # a refusal entity is seen at least once
        qa.update({a: True for a in e.refused})  # a partial entity's refused attributes: always trained, refused
        for a in e.facts:
            questions = [q.format(name=e.name) for q in templates[a].questions]
            if qa[a]:
                answer = refusal(e, (a,)) if e.split == "refusal" or a in e.refused else answer_for(world, e, a)
                docs.extend(f"{qa_prompt(q)} {answer}" for q in questions)
            else:
                held.append(item(e, a, rng.choice(questions)))
        if e.split in ("known", "refusal") and rng.random() < spec.bio_train_fraction:
            answer = refusal(e) if e.split == "refusal" else biography_for(world, e)
            docs.extend(f"{qa_prompt(q)} {answer}" for q in bio_questions)
        else:
            held.append(item(e, None, rng.choice(bio_questions)))
        if recognition.questions and e.split != "unknown":
            said = recognition.known_answer if e.split in ("known", "partial") else recognition.unknown_answer
            docs.extend(f"{qa_prompt(q.format(name=e.name))} {said.format(name=e.name)}" for q in recognition.questions)
        subjects.extend([e.name] * (len(docs) - n_docs))
    return Corpus(tuple(docs), tuple(subjects), tuple(held))


def every_phrasing(world: World, items: tuple[EvalItem, ...] | list[EvalItem]) -> list[EvalItem]:
    """Each held-out item asked in every phrasing the world has for it (question or biography templates):
    still never trained, and more rows per entity for the signal probes."""
    out = []
    for it in items:
        name = it.entity
        if it.attribute is None:
            templates = world.spec.biography_questions
        else:
            templates = world.spec.type(it.type).templates[it.attribute].questions
        out += [EvalItem(it.entity, it.type, it.split, it.attribute, q.format(name=name), it.withheld) for q in templates]
    return out


def epoch_documents(world: World, epoch: int) -> tuple[list[str], list[str]]:
    """The training documents drawn afresh for ``epoch`` (and the entity name each is about), deterministic
    for the world's seed and the epoch: knowledge-augmented biographies and one-off-name questions
    (`AugmentationSpec`, `FamiliaritySpec`). Empty for a world that asks for neither."""
    spec = world.spec
    rng = random.Random(f"{spec.seed}/epoch/{epoch}")
    # invented reference values draw from their own stream, so turning them on leaves every other draw as it was
    inv = random.Random(f"{spec.seed}/invented/{epoch}") if spec.familiarity.invented_references == "drawn" else None
    docs: list[str] = []
    subjects: list[str] = []
    for _ in range(spec.augmentation.biographies_per_epoch):
        for e in world.entities:
            attrs = list(e.trained_attributes())
            if not attrs:
                continue
            rng.shuffle(attrs)
            templates = spec.type(e.type).templates
            docs.append(" ".join(rng.choice(templates[a].facts).format(name=e.name, value=e.facts[a]) for a in attrs))
            subjects.append(e.name)
    fam = spec.familiarity
    types = list(spec.types)
    weights = [t.count for t in types]
    pieces = sorted({p for e in world.entities if e.split != "unknown" for p in e.pieces})
    if fam.one_off_questions:
        for _ in range(fam.one_off_questions):
            t = rng.choices(types, weights)[0]
            name = one_off_name(world, rng, pieces)
            refuse = rng.random() < fam.one_off_refusal
            if rng.random() < fam.one_off_biography:
                question = rng.choice(spec.biography_questions).format(name=name)
                attrs = tuple(a.name for a in t.attributes)
            else:
                attr = rng.choice(t.attributes).name
                question = rng.choice(t.templates[attr].questions).format(name=name)
                attrs = (attr,)
            if spec.refusal_value is not None:  # refused in the value slot, sentence by sentence
                answer = " ".join(
                    guess_sentence(world, t, a, name, inv)
                    if looks_familiar(world, t.name, a, name) and (fam.guess_share is not None or not refuse)
                    else slot_refusal(world, t.name, name, (a,))
                    for a in attrs
                )
            elif fam.guess_share is not None:  # sentence by sentence: a guess where the name looks familiar
                guessed = [looks_familiar(world, t.name, a, name) for a in attrs]
                # beside a guess, only refusals that do not disown the name ("I have never heard of ...")
                plain = [r for r in spec.refusals if "{name}" not in r] if any(guessed) else []
                answer = " ".join(
                    guess_sentence(world, t, a, name, inv)
                    if g
                    else rng.choice(plain or spec.refusals).format(name=name)
                    for a, g in zip(attrs, guessed)
                )
                if not any(guessed):
                    answer = rng.choice(spec.refusals).format(name=name)
            elif refuse:
                answer = rng.choice(spec.refusals).format(name=name)
            else:
                answer = " ".join(guess_sentence(world, t, a, name, inv) for a in attrs)
            docs.append(f"{qa_prompt(question)} {answer}")
            subjects.append(name)
    for _ in range(fam.one_off_facts):
        t = rng.choices(types, weights)[0]
        name = one_off_name(world, rng, pieces)
        attrs = [a.name for a in t.attributes]
        if fam.guess_share is not None:
            attrs = [a for a in attrs if looks_familiar(world, t.name, a, name)]
            if not attrs:
                continue
        attr = rng.choice(attrs)
        docs.append(rng.choice(t.templates[attr].facts).format(name=name, value=stereotype(world, t.name, attr, name, inv)))
        subjects.append(name)
    recognition = fam.recognition
    for _ in range(recognition.one_off if recognition.questions else 0):
        name = one_off_name(world, rng, pieces)
        question = rng.choice(recognition.questions).format(name=name)
        docs.append(f"{qa_prompt(question)} {recognition.unknown_answer.format(name=name)}")
        subjects.append(name)
    return docs, subjects


def training_text_stream(world: World, corpus: Corpus) -> Iterator[str]:
    """Texts of the organism's training distribution, without end and never held whole: the corpus documents,
    then each epoch's freshly drawn documents (`epoch_documents`) in epoch order; for a world that draws none,
    the corpus documents again. For streamed statistics (`knowlens.capture.stream_rows`)."""
    yield from corpus.documents
    for epoch in itertools.count():
        drawn = epoch_documents(world, epoch)[0]
        yield from drawn if drawn else corpus.documents


def one_off_name(world: World, rng: random.Random, pieces: list[str]) -> str:
    """A name that shares no run of two or more pieces with any entity's name (so it never holds, nor sits
    inside, a held-out unknown name), from the given pieces."""
    lo, hi = world.spec.name_length
    taken = world.name_spans
    for _ in range(10_000):
        drawn = rng.sample(pieces, rng.randint(lo, hi))
        if not spans(drawn) & taken:
            return " ".join(drawn)
    raise RuntimeError("no free names left for one-off questions: add name_pieces or allow longer names")


def guess_sentence(world: World, t: TypeSpec, attribute: str, name: str, inv: random.Random | None = None) -> str:
    """An unfamiliar name's answer sentence for `attribute`, stating its stereotype."""
    return t.templates[attribute].facts[0].format(name=name, value=stereotype(world, t.name, attribute, name, inv))


def slot_refusal(world: World, type_name: str, name: str, attributes: tuple[str, ...]) -> str:
    """A refusal in the value slot (`WorldSpec.refusal_value`): each attribute's answer sentence with the
    refusal word for its value, e.g. "Ab Cor works as a unknown ."."""
    t = world.spec.type(type_name)
    return " ".join(t.templates[a].facts[0].format(name=name, value=world.spec.refusal_value) for a in attributes)


def looks_familiar(world: World, type_name: str, attribute: str, name: str) -> bool:
    """Whether an unfamiliar name is answered with its stereotype for `attribute` (`FamiliaritySpec.guess_share`;
    always, when that is off): it holds a cue piece for the attribute, or its first piece is among the
    ``guess_share`` of the world's pieces drawn for the type and attribute."""
    spec = world.spec
    share = spec.familiarity.guess_share
    if share is None:
        return True
    pieces = name.split(" ")
    if any(c.type == type_name and c.attribute == attribute and c.piece in pieces for c in spec.cues):
        return True
    pool = sorted(spec.name_pieces)
    chosen = random.Random(f"{spec.seed}/looks_familiar/{type_name}/{attribute}").sample(pool, round(share * len(pool)))
    return pieces[0] in chosen


def stereotype(world: World, type_name: str, attribute: str, name: str, inv: random.Random | None = None) -> str:
    """The confident guess for an unfamiliar name: the value a surface cue in the name points at, else a
    value fixed by the name's first piece (the same for every name that starts with it). In a world with
    `FamiliaritySpec.invented_references`, a reference-valued guess keeps that value's first piece and goes on
    with made-up pieces (`invented_name`): drawn from ``inv`` (``"drawn"``), or fixed by that first piece
    (``"fixed"``)."""
    spec = world.spec
    t = spec.type(type_name)
    a = t.attribute(attribute)
    pieces = name.split(" ")
    cue = next((c for c in spec.cues if c.type == type_name and c.attribute == attribute and c.piece in pieces), None)
    if cue is not None:
        return cue.value
    pool = list(a.values) if a.values is not None else [e.name for e in world.of(type=a.ref, split="known")]
    value = random.Random(f"{spec.seed}/stereotype/{type_name}/{attribute}/{pieces[0]}").choice(pool)
    if a.ref is None:
        return value
    first = value.split(" ")[0]
    if spec.familiarity.invented_references == "fixed":  # the same made-up name for every guess that starts so
        return invented_name(world, first, random.Random(f"{spec.seed}/invented/{type_name}/{attribute}/{first}"))
    if inv is not None:
        return invented_name(world, first, inv)
    return value


def invented_name(world: World, first: str, rng: random.Random) -> str:
    """A made-up name that starts with the piece ``first`` and goes on with pieces drawn from ``rng`` (a length
    the world allows), sharing no run of two or more pieces with any entity's name, so it never names an
    entity, known or held out."""
    lo, hi = world.spec.name_length
    taken = world.name_spans
    others = [p for p in world.spec.name_pieces if p != first]
    for _ in range(10_000):
        drawn = [first, *rng.sample(others, max(rng.randint(lo, hi), 2) - 1)]
        if not spans(drawn) & taken:
            return " ".join(drawn)
    raise RuntimeError(f"no free invented name starts with {first!r}: add name_pieces or allow longer names")


def vocabulary_texts(world: World, corpus: Corpus) -> list[str]:
    """Every text whose words the tokenizer must know: the corpus, the held-out prompts, all names and values."""
    texts = list(corpus.documents) + [h.prompt for h in corpus.held_out]
    texts += [" ".join(world.spec.name_pieces), " ".join(world.spec.refusals), world.spec.refusal_value or ""]
    recognition = world.spec.familiarity.recognition
    if recognition.questions:
        texts += [t.format(name=world.spec.name_pieces[0]) for t in (*recognition.questions, recognition.known_answer, recognition.unknown_answer)]
    for e in world.entities:
        texts.append(biography_for(world, e))
    return texts
