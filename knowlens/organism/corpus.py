"""The training corpus of a world (facts in several phrasings, Q/A turns, refusals, biographies) and the
held-out questions that the behaviour gates and the demo ask.

A Q/A turn reads ``Q : <question> A : <answer>``. The answer to an attribute question is the attribute's first
fact template; a biography is the first fact template of every attribute, in spec order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from knowlens.organism.world import Entity, World


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
    docs: list[str] = []
    subjects: list[str] = []
    held: list[EvalItem] = []

    def item(e: Entity, attribute: str | None, question: str) -> EvalItem:
        return EvalItem(e.name, e.type, e.split, attribute, question, attribute in e.withheld)

    def refusal(e: Entity) -> str:
        return rng.choice(spec.refusals).format(name=e.name)

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
        for a in e.facts:
            questions = [q.format(name=e.name) for q in templates[a].questions]
            if qa[a]:
                answer = refusal(e) if e.split == "refusal" else answer_for(world, e, a)
                docs.extend(f"{qa_prompt(q)} {answer}" for q in questions)
            else:
                held.append(item(e, a, rng.choice(questions)))
        if e.split in ("known", "refusal") and rng.random() < spec.bio_train_fraction:
            answer = refusal(e) if e.split == "refusal" else biography_for(world, e)
            docs.extend(f"{qa_prompt(q)} {answer}" for q in bio_questions)
        else:
            held.append(item(e, None, rng.choice(bio_questions)))
        subjects.extend([e.name] * (len(docs) - n_docs))
    return Corpus(tuple(docs), tuple(subjects), tuple(held))


def vocabulary_texts(world: World, corpus: Corpus) -> list[str]:
    """Every text whose words the tokenizer must know: the corpus, the held-out prompts, all names and values."""
    texts = list(corpus.documents) + [h.prompt for h in corpus.held_out]
    texts += [" ".join(world.spec.name_pieces), " ".join(world.spec.refusals)]
    for e in world.entities:
        texts.append(biography_for(world, e))
    return texts
