"""Ground truth for generated text: every generated token is `correct`, `hallucinated`, `refusal` or `other`.

The answer is cut into sentences at '.' tokens. A sentence starting with 'I' is a refusal (all its tokens), and
so is a fact sentence whose value is the world's `refusal_value` ("X works as a unknown .").
Otherwise it is matched against every fact template of the world; in the best match the value tokens are
`correct` when the world holds exactly that fact about the named entity and `hallucinated` otherwise, and
the template words and the subject name are `other`. When the question was about a given entity and the
sentence names another one, the subject tokens are `hallucinated` too (an invented or substituted entity).
Sentences that match no template are `other` (the end-of-sequence token as well).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from knowlens.organism.world import World

CLASSES = ("correct", "hallucinated", "refusal", "other")
ANSWER_VERDICTS = ("correct", "hallucinated", "refusal", "other")


@dataclass(frozen=True)
class _Template:
    type: str
    attribute: str
    regex: re.Pattern
    literals: int


@dataclass(frozen=True)
class Claim:
    """A fact the answer states: `subject` has `value` for `attribute`; `true` by the world's facts."""

    subject: str
    type: str
    attribute: str
    value: str
    true: bool
    subject_tokens: tuple[int, int]  # [start, end) token indices within the answer
    value_tokens: tuple[int, int]


@dataclass(frozen=True)
class Grade:
    classes: tuple[str, ...]  # one per answer token
    claims: tuple[Claim, ...]
    verdict: str  # correct | hallucinated | refusal | other, for the answer as a whole
    # [start, end) of each refusal's deciding tokens: a refusal sentence's first token, or the value slot
    # holding the world's `refusal_value`
    refusals: tuple[tuple[int, int], ...] = ()

    def first_decision(self) -> int | None:
        """Index of the answer's first token that states a value or refuses (None when there is none)."""
        starts = [c.value_tokens[0] for c in self.claims] + [r[0] for r in self.refusals]
        return min(starts) if starts else None


def grade_answer(world: World, tokens: list[str] | tuple[str, ...], *, entity: str | None = None) -> Grade:
    """Classify every token of a generated answer (the tokens after the prompt, as strings)."""
    classes = ["other"] * len(tokens)
    claims: list[Claim] = []
    refusals: list[tuple[int, int]] = []
    for start, end in _sentences(tokens):
        sent = list(tokens[start:end])
        if sent and sent[0] == "I":
            classes[start:end] = ["refusal"] * (end - start)
            refusals.append((start, start + 1))
            continue
        claim = _match(world, sent, start)
        if claim is None:
            continue
        if claim.value == world.spec.refusal_value:  # a refusal in the value slot ("X works as a unknown .")
            classes[start:end] = ["refusal"] * (end - start)
            refusals.append(claim.value_tokens)
            continue
        claims.append(claim)
        v0, v1 = claim.value_tokens
        classes[v0:v1] = ["correct" if claim.true else "hallucinated"] * (v1 - v0)
        if entity is not None and claim.subject != entity:
            s0, s1 = claim.subject_tokens
            classes[s0:s1] = ["hallucinated"] * (s1 - s0)
    return Grade(tuple(classes), tuple(claims), _verdict(classes), tuple(refusals))


def _verdict(classes: list[str]) -> str:
    if "hallucinated" in classes:
        return "hallucinated"
    if "correct" in classes:
        return "correct"
    if "refusal" in classes:
        return "refusal"
    return "other"


def _sentences(tokens: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
    out, start = [], 0
    for i, t in enumerate(tokens):
        if t == ".":
            out.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        out.append((start, len(tokens)))
    return out


def _match(world: World, sent: list[str], offset: int) -> Claim | None:
    text = " ".join(sent)
    best, best_score = None, -1.0
    for tpl in _templates(world):
        m = tpl.regex.match(text)
        if m is None:
            continue
        subject, value = m.group("name"), m.group("value")
        ent = world.by_name.get(subject)
        attr = world.spec.type(tpl.type).attribute(tpl.attribute)
        valid = value == world.spec.refusal_value or (
            value in attr.values
            if attr.values is not None
            else any(e.name == value and e.type == attr.ref for e in world.entities)
        )
        score = 2 * valid + (ent is not None and ent.type == tpl.type) + tpl.literals / 100
        if score > best_score:
            best, best_score = (tpl, m, subject, value, ent), score
    if best is None:
        return None
    tpl, m, subject, value, ent = best
    true = ent is not None and ent.type == tpl.type and ent.facts.get(tpl.attribute) == value
    return Claim(
        subject=subject,
        type=tpl.type,
        attribute=tpl.attribute,
        value=value,
        true=true,
        subject_tokens=_token_span(text, m.span("name"), offset),
        value_tokens=_token_span(text, m.span("value"), offset),
    )


def _token_span(text: str, span: tuple[int, int], offset: int) -> tuple[int, int]:
    """Character span in the space-joined sentence -> token index span in the answer."""
    start = text[: span[0]].count(" ")
    return offset + start, offset + start + text[span[0] : span[1]].count(" ") + 1


_CACHE: dict[int, tuple[object, tuple[_Template, ...]]] = {}


def _templates(world: World) -> tuple[_Template, ...]:
    hit = _CACHE.get(id(world.spec))
    if hit is None or hit[0] is not world.spec:
        hit = _CACHE[id(world.spec)] = (world.spec, _compile(world.spec))
    return hit[1]


def _compile(spec) -> tuple[_Template, ...]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    slot = r"\S+(?: \S+)*?"
    out = []
    for t in spec.types:
        for aname, tp in t.templates.items():
            for fact in tp.facts:
                parts = []
                literals = 0
                for piece in re.split(r"(\{name\}|\{value\})", fact):
                    if piece == "{name}":
                        parts.append(f"(?P<name>{slot})")
                    elif piece == "{value}":
                        parts.append(f"(?P<value>{slot})")
                    else:
                        words = [w for w, _ in pre.pre_tokenize_str(piece)]
                        literals += len(words)
                        parts.extend(re.escape(w) for w in words)
                out.append(_Template(t.name, aname, re.compile("^" + " ".join(parts) + "$"), literals))
    return tuple(out)
