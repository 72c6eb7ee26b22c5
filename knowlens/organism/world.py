"""A world: the entities a spec describes, with their names, splits and every fact, drawn from the spec's seed."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from knowlens.organism.spec import SPLITS, TypeSpec, WorldSpec


@dataclass(frozen=True)
class Entity:
    type: str
    name: str  # 2-4 name pieces joined by single spaces
    split: str  # known | partial | refusal | unknown
    facts: Mapping[str, str]  # attribute -> value, for every attribute (the world's truth, seen or not)
    withheld: tuple[str, ...] = ()  # attributes never shown in training (partial entities)
    refused: tuple[str, ...] = ()  # of those, the ones whose questions training answers with a refusal

    @property
    def pieces(self) -> tuple[str, ...]:
        return tuple(self.name.split(" "))

    def trained_attributes(self) -> tuple[str, ...]:
        """Attributes whose facts occur in training (none for refusal and unknown entities)."""
        if self.split in ("refusal", "unknown"):
            return ()
        return tuple(a for a in self.facts if a not in self.withheld)


@dataclass(frozen=True)
class World:
    spec: WorldSpec
    entities: tuple[Entity, ...]

    @cached_property
    def by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}

    @cached_property
    def name_spans(self) -> frozenset[str]:
        """Every run of two or more consecutive pieces of every entity's name."""
        return frozenset(x for e in self.entities for x in spans(e.pieces))

    def of(self, *, type: str | None = None, split: str | None = None) -> list[Entity]:
        return [e for e in self.entities if (type is None or e.type == type) and (split is None or e.split == split)]

    def fact(self, name: str, attribute: str) -> str | None:
        e = self.by_name.get(name)
        return None if e is None else e.facts.get(attribute)


def build_world(spec: WorldSpec) -> World:
    """Draw the entities of `spec`: same spec and seed, same world."""
    rng = random.Random(spec.seed)
    taken: set[str] = set()
    names = {t.name: [_new_name(spec, rng, taken, spec.name_pieces) for _ in range(t.count)] for t in spec.types}
    splits = {t.name: _assign_splits(spec, rng, t.count) for t in spec.types}
    # An unknown entity's name uses only pieces that occur in the names training shows.
    seen = {p for t in spec.types for n, s in zip(names[t.name], splits[t.name]) if s != "unknown" for p in n.split(" ")}
    seen_pieces = tuple(p for p in spec.name_pieces if p in seen)
    # ... and shares no run of two or more pieces with a name training shows (else it was seen, in part).
    shown = {x for t in spec.types for n, s in zip(names[t.name], splits[t.name]) if s != "unknown" for x in spans(n.split(" "))}
    for t in spec.types:
        for i, s in enumerate(splits[t.name]):
            for _ in range(10_000):
                pieces = names[t.name][i].split(" ")
                if s != "unknown" or (set(pieces) <= seen and not spans(pieces) & shown):
                    break
                taken.discard(names[t.name][i])
                names[t.name][i] = _new_name(spec, rng, taken, seen_pieces)
    # Attribute values: reference attributes point at known entities of the referenced type.
    known_names = {t.name: [n for n, s in zip(names[t.name], splits[t.name]) if s == "known"] for t in spec.types}
    entities = []
    for t in spec.types:
        for name, split in zip(names[t.name], splits[t.name]):
            facts = {a.name: _draw_value(spec, t, a.name, name, rng, known_names) for a in t.attributes}
            withheld: tuple[str, ...] = ()
            refused: tuple[str, ...] = ()
            if split == "partial":
                attrs = [a.name for a in t.attributes]
                n_refused = max(0, min(spec.partial_refused, len(attrs) - 1 - spec.partial_withheld))
                drawn = rng.sample(attrs, spec.partial_withheld + n_refused)
                withheld, refused = tuple(sorted(drawn)), tuple(sorted(drawn[spec.partial_withheld :]))
            entities.append(Entity(t.name, name, split, facts, withheld, refused))
    return World(spec, tuple(entities))


def spans(pieces: "list[str] | tuple[str, ...]") -> set[str]:
    """The runs of two or more consecutive pieces of a name, each joined by spaces."""
    return {" ".join(pieces[i:j]) for i in range(len(pieces)) for j in range(i + 2, len(pieces) + 1)}


def _new_name(spec: WorldSpec, rng: random.Random, taken: set[str], pieces: tuple[str, ...]) -> str:
    lo, hi = spec.name_length
    for _ in range(10_000):
        k = rng.randint(lo, hi)
        name = " ".join(rng.sample(pieces, k))
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("could not draw a new unique name: add name_pieces or allow longer names")


def _assign_splits(spec: WorldSpec, rng: random.Random, count: int) -> list[str]:
    sizes = {s: int(round(spec.splits[s] * count)) for s in SPLITS}
    sizes["known"] = max(1, count - sum(v for s, v in sizes.items() if s != "known"))
    labels = [s for s in SPLITS for _ in range(sizes[s])][:count]
    rng.shuffle(labels)
    return labels


def _draw_value(
    spec: WorldSpec, t: TypeSpec, attribute: str, name: str, rng: random.Random, known_names: dict[str, list[str]]
) -> str:
    a = t.attribute(attribute)
    if a.ref is not None:
        pool = known_names[a.ref]
        if not pool:
            raise RuntimeError(f"type {a.ref!r} has no known entities for {t.name}.{attribute} to point at")
        return rng.choice(pool)
    assert a.values is not None
    pieces = name.split(" ")
    cue = next((c for c in spec.cues if c.type == t.name and c.attribute == attribute and c.piece in pieces), None)
    draw = rng.random()
    if cue is not None and draw < cue.strength:
        return cue.value
    return rng.choice(a.values)
