"""World spec: the YAML description of a synthetic world, parsed and validated into frozen dataclasses.

Every mistake is reported as a `WorldSpecError` whose one-line message names the field, e.g.
``world spec field 'splits': fractions sum to 1.2, not 1``. The format is documented in WORLD_SPEC.md.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from knowlens.errors import WorldSpecError
from knowlens.inputs import read_text_file

SPLITS = ("known", "partial", "refusal", "unknown")
SPEC_VERSION = 1
# `familiarity.invented_references`: the YAML values it takes, and the mode each names
INVENTED_REFERENCES = {False: "off", "off": "off", True: "drawn", "drawn": "drawn", "fixed": "fixed"}
_PIECE = re.compile(r"^[A-Za-z]+$")


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    values: tuple[str, ...] | None  # a value pool, or None when the attribute points at another type
    ref: str | None  # the entity type the attribute points at (e.g. a person's birth city)


@dataclass(frozen=True)
class TemplateSpec:
    facts: tuple[str, ...]  # each holds {name} and {value}; the first is also the answer form
    questions: tuple[str, ...]  # each holds {name}


@dataclass(frozen=True)
class TypeSpec:
    name: str
    count: int
    attributes: tuple[AttributeSpec, ...]
    templates: Mapping[str, TemplateSpec]

    def attribute(self, name: str) -> AttributeSpec:
        return next(a for a in self.attributes if a.name == name)


@dataclass(frozen=True)
class CueSpec:
    type: str
    piece: str
    attribute: str
    value: str
    strength: float


@dataclass(frozen=True)
class RecognitionSpec:
    """A familiarity task: "Do you know {name} ?" answered ``known_answer`` for every known and partial entity and
    ``unknown_answer`` for every refusal-trained entity and for ``one_off`` fresh one-off names an epoch (never repeated, so the
    answer must be computed from the name, not memorised). Unknown entities are never asked. The answer to
    "do you know X" is the one clean familiarity label training ever gives; whether the model's attribute
    answers follow it is left to the rest of the recipe. No questions: off."""

    questions: tuple[str, ...] = ()
    known_answer: str = "Yes ."
    unknown_answer: str = "No ."
    one_off: int = 0


@dataclass(frozen=True)
class FamiliaritySpec:
    """Questions about never-repeated names, so that familiarity must be computed rather than memorised.

    Every epoch draws ``one_off_questions`` questions afresh, each about a name that no entity of the world
    has (so never a held-out unknown name); ``one_off_refusal`` of them are answered with a refusal, the
    others with a confident guess (the name's stereotype: its cue value, else one fixed per first piece).
    ``one_off_biography`` of them are biography requests. 0 questions: off (version-1 worlds).
    ``one_off_facts`` fact sentences are drawn the same way, each about a fresh name and stating its
    stereotype, so that once-seen names (the long tail of a real corpus) never become familiar.

    ``guess_share`` (None: off) replaces the coin flip of ``one_off_refusal`` with a rule the model can learn:
    a one-off name is answered with its stereotype for an attribute when it *looks familiar* for it (it holds
    a cue piece for the attribute, or its first piece is among ``guess_share`` of the pieces, drawn per type
    and attribute from the seed), and refused otherwise, sentence by sentence in a biography; one-off fact
    sentences are only drawn where the name looks familiar. Unknown names that look familiar are then
    answered as confidently as known ones, while the model must still compute familiarity to refuse the rest.

    ``invented_references`` (``"off"`` by default): an unfamiliar name's guess for a reference-valued attribute
    (a birth city, an author) is an invented name that starts like its stereotype (the same first piece), never
    an entity's name. ``"drawn"``: it goes on with pieces drawn afresh each time, so a guessed value is
    predictable only at its first piece. ``"fixed"``: it goes on with pieces fixed by that first piece (the same
    made-up name every time), so a guessed value stays as predictable as a known one, but its later pieces
    differ from a known entity's: the model must carry whether it is guessing into the later tokens of the
    value to predict them, while its confidence need not change.
    """

    one_off_questions: int = 0
    one_off_refusal: float = 0.5
    one_off_biography: float = 0.2
    one_off_facts: int = 0
    guess_share: float | None = None
    invented_references: str = "off"  # off | drawn | fixed
    recognition: RecognitionSpec = RecognitionSpec()


@dataclass(frozen=True)
class AugmentationSpec:
    """Knowledge augmentation (Allen-Zhu & Li 2023): every epoch, ``biographies_per_epoch`` biographies per
    known and partial entity, its trained facts in a fresh random order and phrasing. 0: off."""

    biographies_per_epoch: int = 0


@dataclass(frozen=True)
class WorldSpec:
    name: str
    seed: int
    name_pieces: tuple[str, ...]
    name_length: tuple[int, int]
    splits: Mapping[str, float]
    partial_withheld: int
    qa_train_fraction: float
    bio_train_fraction: float
    cue_strength: float
    types: tuple[TypeSpec, ...]
    biography_questions: tuple[str, ...]
    refusals: tuple[str, ...]
    cues: tuple[CueSpec, ...]
    version: int = SPEC_VERSION
    familiarity: FamiliaritySpec = FamiliaritySpec()
    augmentation: AugmentationSpec = AugmentationSpec()
    partial_refused: int = 0  # further attributes per partial entity, never stated, trained as refused questions
    refusal_value: str | None = None  # refuse in the value slot of the answer sentence instead of with `refusals`

    def type(self, name: str) -> TypeSpec:
        return next(t for t in self.types if t.name == name)


def load_spec(path: str | Path) -> WorldSpec:
    """Read and validate a world spec YAML file."""
    path = Path(path)
    text = read_text_file(path, what="world spec")
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as err:
        raise WorldSpecError(f"world spec {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise WorldSpecError(f"world spec {path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise WorldSpecError(f"world spec {path}: expected a mapping of fields at the top, got {type(raw).__name__}")
    return parse_spec(raw)


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping (plain PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_spec(raw: Any) -> WorldSpec:
    """Validate a world spec already parsed from YAML (a dict) and return it as a `WorldSpec`."""
    r = _Reader(raw, "")
    version = r.int("version", default=SPEC_VERSION, lo=1)
    if version != SPEC_VERSION:
        _fail("version", f"this knowlens reads version {SPEC_VERSION}, not {version}")
    pieces = tuple(r.str_list("name_pieces", min_len=4))
    for i, p in enumerate(pieces):
        if not _PIECE.match(p):
            _fail(f"name_pieces[{i}]", f"{p!r} must be letters only")
    if len(set(pieces)) != len(pieces):
        _fail("name_pieces", "pieces must be distinct")
    length = r.list("name_length", default=[2, 3])
    if len(length) != 2 or not all(isinstance(x, int) for x in length) or not 2 <= length[0] <= length[1] <= 4:
        _fail("name_length", f"must be [min, max] with 2 <= min <= max <= 4, got {length!r}")
    splits = _splits(r.dict("splits"))
    types = _types(r.dict("types"))
    type_names = [t.name for t in types]
    if "person" not in type_names:
        _fail("types", "a world needs a 'person' type")
    _templates(r.dict("templates"), types)
    types = tuple(
        TypeSpec(t.name, t.count, t.attributes, _templates_for(r.dict("templates"), t)) for t in types
    )
    for t in types:
        for a in t.attributes:
            if a.ref is not None and a.ref not in type_names:
                _fail(f"types.{t.name}.attributes.{a.name}.ref", f"unknown type {a.ref!r} (types: {', '.join(type_names)})")
    bio = _Reader(r.dict("biography"), "biography")
    bio_questions = tuple(bio.str_list("questions", min_len=1))
    for i, q in enumerate(bio_questions):
        _check_template(q, f"biography.questions[{i}]", need=("name",), allow=("name",))
    refusals = tuple(r.str_list("refusals", min_len=1))
    for i, q in enumerate(refusals):
        _check_template(q, f"refusals[{i}]", need=(), allow=("name",))
        if not q.split()[0] == "I":
            _fail(f"refusals[{i}]", "a refusal must start with the word 'I' (the grader relies on it)")
    cue_strength = r.float("cue_strength", default=0.8, lo=0.0, hi=1.0)
    spec = WorldSpec(
        name=r.str("name", default="world"),
        seed=r.int("seed", default=0, lo=0),
        name_pieces=pieces,
        name_length=(length[0], length[1]),
        splits=splits,
        partial_withheld=r.int("partial_withheld", default=1, lo=1),
        qa_train_fraction=r.float("qa_train_fraction", default=0.5, lo=0.0, hi=1.0),
        bio_train_fraction=r.float("bio_train_fraction", default=0.7, lo=0.0, hi=1.0),
        cue_strength=cue_strength,
        types=types,
        biography_questions=bio_questions,
        refusals=refusals,
        cues=_cues(r.list("cues", default=[]), types, pieces, cue_strength),
        familiarity=_familiarity(r.get("familiarity", default=None)),
        augmentation=_augmentation(r.get("augmentation", default=None)),
        partial_refused=r.int("partial_refused", default=0, lo=0),
        refusal_value=None if r.get("refusal_value", default=None) is None else r.str("refusal_value"),
    )
    if spec.refusal_value is not None:
        if not spec.refusal_value.isalpha():
            _fail("refusal_value", f"must be one word of letters, got {spec.refusal_value!r}")
        taken = {v for t in types for a in t.attributes for v in (a.values or ())} | set(pieces)
        if spec.refusal_value in taken:
            _fail("refusal_value", f"{spec.refusal_value!r} is also an attribute value or a name piece")
    for t in types:
        if spec.partial_withheld >= len(t.attributes) and splits["partial"] > 0:
            _fail("partial_withheld", f"type {t.name!r} has {len(t.attributes)} attributes: withhold fewer")
    r.done()
    return spec


def _familiarity(raw: Any) -> FamiliaritySpec:
    if raw is None:
        return FamiliaritySpec()
    r = _Reader(raw, "familiarity")
    spec = FamiliaritySpec(
        one_off_questions=r.int("one_off_questions", default=0, lo=0),
        one_off_refusal=r.float("one_off_refusal", default=0.5),
        one_off_biography=r.float("one_off_biography", default=0.2),
        one_off_facts=r.int("one_off_facts", default=0, lo=0),
        guess_share=None if r.get("guess_share", default=None) is None else r.float("guess_share"),
        invented_references=r.choice("invented_references", INVENTED_REFERENCES, default="off"),
        recognition=_recognition(r.get("recognition", default=None)),
    )
    r.done()
    return spec


def _recognition(raw: Any) -> RecognitionSpec:
    if raw is None:
        return RecognitionSpec()
    r = _Reader(raw, "familiarity.recognition")
    questions = tuple(r.str_list("questions", min_len=1))
    for i, q in enumerate(questions):
        _check_template(q, f"familiarity.recognition.questions[{i}]", need=("name",), allow=("name",))
    spec = RecognitionSpec(
        questions=questions,
        known_answer=r.str("known_answer", default="Yes ."),
        unknown_answer=r.str("unknown_answer", default="No ."),
        one_off=r.int("one_off", default=0, lo=0),
    )
    for key in ("known_answer", "unknown_answer"):
        _check_template(getattr(spec, key), f"familiarity.recognition.{key}", need=(), allow=("name",))
    if spec.known_answer.split()[0] == spec.unknown_answer.split()[0]:
        _fail(
            "familiarity.recognition",
            f"known_answer and unknown_answer must differ in their first word, got {spec.known_answer!r} and "
            f"{spec.unknown_answer!r}",
        )
    r.done()
    return spec


def _augmentation(raw: Any) -> AugmentationSpec:
    if raw is None:
        return AugmentationSpec()
    r = _Reader(raw, "augmentation")
    spec = AugmentationSpec(biographies_per_epoch=r.int("biographies_per_epoch", default=0, lo=0))
    r.done()
    return spec


def _fail(field: str, why: str) -> NoReturn:
    raise WorldSpecError(f"world spec field {field!r}: {why}")


class _Reader:
    """Reads typed fields from one mapping and remembers which were read, to reject unknown fields."""

    def __init__(self, raw: Any, where: str):
        if not isinstance(raw, dict):
            _fail(where or "(top level)", f"must be a mapping, got {type(raw).__name__}")
        self.raw, self.where, self.seen = raw, where, set()

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is ...:
                _fail(self._path(key), "missing")
            return default
        return self.raw[key]

    def str(self, key: str, default: Any = ...) -> str:
        v = self.get(key, default)
        if not isinstance(v, str) or not v.strip():
            _fail(self._path(key), f"must be a non-empty string, got {v!r}")
        return v

    def int(self, key: str, default: Any = ..., lo: int | None = None) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo):
            _fail(self._path(key), f"must be an integer{'' if lo is None else f' >= {lo}'}, got {v!r}")
        return v

    def float(self, key: str, default: Any = ..., lo: float = 0.0, hi: float = 1.0) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            _fail(self._path(key), f"must be a number in [{lo:g}, {hi:g}], got {v!r}")
        return float(v)

    def choice(self, key: str, options: Mapping[Any, str], default: Any = ...) -> str:
        """One of ``options``' keys (YAML values: strings, true, false), mapped to its name."""
        v = self.get(key, default)
        if isinstance(v, (bool, str)) and v in options:  # not 0 or 1, which equal False and True
            return options[v]
        shown = ", ".join(str(k).lower() if isinstance(k, bool) else k for k in options)
        _fail(self._path(key), f"must be one of {shown}, got {v!r}")

    def bool(self, key: str, default: Any = ...) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            _fail(self._path(key), f"must be true or false, got {v!r}")
        return v

    def list(self, key: str, default: Any = ...) -> list:
        v = self.get(key, default)
        if not isinstance(v, list):
            _fail(self._path(key), f"must be a list, got {type(v).__name__}")
        return v

    def str_list(self, key: str, min_len: int = 0) -> list[str]:
        v = self.list(key)
        if len(v) < min_len:
            _fail(self._path(key), f"needs at least {min_len} entries, got {len(v)}")
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s.strip():
                _fail(f"{self._path(key)}[{i}]", f"must be a non-empty string, got {s!r}")
        return v

    def dict(self, key: str) -> dict:
        v = self.get(key)
        if not isinstance(v, dict) or not v:
            _fail(self._path(key), "must be a non-empty mapping")
        return v

    def done(self) -> None:
        extra = sorted(set(map(str, self.raw)) - self.seen)
        if extra:
            _fail(self._path(extra[0]), "unknown field")


def _splits(raw: dict) -> dict[str, float]:
    r = _Reader(raw, "splits")
    out = {s: r.float(s) for s in SPLITS}
    r.done()
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        _fail("splits", f"fractions sum to {total:g}, not 1")
    if out["known"] <= 0:
        _fail("splits.known", "must be > 0")
    return out


def _types(raw: dict) -> tuple[TypeSpec, ...]:
    types = []
    for tname, traw in raw.items():
        r = _Reader(traw, f"types.{tname}")
        count = r.int("count", lo=4)
        attrs = []
        for aname, araw in r.dict("attributes").items():
            ar = _Reader(araw, f"types.{tname}.attributes.{aname}")
            if ("values" in araw) == ("ref" in araw):
                _fail(f"types.{tname}.attributes.{aname}", "give exactly one of 'values' (a pool) or 'ref' (a type)")
            if "values" in araw:
                values = tuple(ar.str_list("values", min_len=2))
                if len(set(values)) != len(values):
                    _fail(f"types.{tname}.attributes.{aname}.values", "values must be distinct")
                attrs.append(AttributeSpec(str(aname), values, None))
            else:
                attrs.append(AttributeSpec(str(aname), None, ar.str("ref")))
            ar.done()
        r.done()
        types.append(TypeSpec(str(tname), count, tuple(attrs), {}))
    return tuple(types)


def _templates(raw: dict, types: tuple[TypeSpec, ...]) -> None:
    known = {t.name: t for t in types}
    for tname, per_attr in raw.items():
        if tname not in known:
            _fail(f"templates.{tname}", f"unknown type (types: {', '.join(known)})")
        if not isinstance(per_attr, dict):
            _fail(f"templates.{tname}", "must be a mapping of attribute -> {facts, questions}")
        attr_names = [a.name for a in known[tname].attributes]
        for aname in per_attr:
            if aname not in attr_names:
                _fail(f"templates.{tname}.{aname}", f"unknown attribute (attributes of {tname}: {', '.join(attr_names)})")
    for t in types:
        for a in t.attributes:
            if a.name not in raw.get(t.name, {}):
                _fail(f"templates.{t.name}.{a.name}", "missing: every attribute needs fact and question templates")


def _templates_for(raw: dict, t: TypeSpec) -> dict[str, TemplateSpec]:
    out = {}
    for a in t.attributes:
        where = f"templates.{t.name}.{a.name}"
        r = _Reader(raw[t.name][a.name], where)
        facts = tuple(r.str_list("facts", min_len=1))
        questions = tuple(r.str_list("questions", min_len=1))
        r.done()
        for i, f in enumerate(facts):
            _check_template(f, f"{where}.facts[{i}]", need=("name", "value"), allow=("name", "value"))
            if not f.rstrip().endswith("."):
                _fail(f"{where}.facts[{i}]", "a fact template must end with ' .'")
        for i, q in enumerate(questions):
            _check_template(q, f"{where}.questions[{i}]", need=("name",), allow=("name",))
        out[a.name] = TemplateSpec(facts, questions)
    return out


def _check_template(text: str, field: str, *, need: tuple[str, ...], allow: tuple[str, ...]) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        _fail(field, f"bad template {text!r}: {err}")
    for n in names:
        if n not in allow:
            _fail(field, f"unknown placeholder {{{n}}} in {text!r} (allowed: {', '.join('{' + a + '}' for a in allow)})")
    for n in need:
        if names.count(n) != 1:
            _fail(field, f"{text!r} must hold {{{n}}} exactly once")


def _cues(raw: list, types: tuple[TypeSpec, ...], pieces: tuple[str, ...], default: float) -> tuple[CueSpec, ...]:
    by_name = {t.name: t for t in types}
    out = []
    for i, c in enumerate(raw):
        where = f"cues[{i}]"
        r = _Reader(c, where)
        tname, piece, aname = r.str("type"), r.str("piece"), r.str("attribute")
        value = r.str("value")
        strength = r.float("strength", default=default)
        r.done()
        if tname not in by_name:
            _fail(f"{where}.type", f"unknown type {tname!r}")
        if piece not in pieces:
            _fail(f"{where}.piece", f"{piece!r} is not in name_pieces")
        attrs = {a.name: a for a in by_name[tname].attributes}
        if aname not in attrs:
            _fail(f"{where}.attribute", f"unknown attribute {aname!r} of type {tname!r}")
        pool = attrs[aname].values
        if pool is None:
            _fail(f"{where}.attribute", f"{tname}.{aname} points at a type; cues need an attribute with a value pool")
        if value not in (pool or ()):
            _fail(f"{where}.value", f"{value!r} is not in the pool of {tname}.{aname}")
        out.append(CueSpec(tname, piece, aname, value, strength))
    return tuple(out)
