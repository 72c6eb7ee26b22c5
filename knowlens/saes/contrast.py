"""Contrast sets of entities for `locate_entity_known`, built without exemplars, or read from a user's list.

Definitions (nothing here reads a world's known/unknown splits):

* **Self-generated (known) entities** (`self_generated_entities`). The model is sampled freely (temperature 1)
  from its BOS token (or a neutral ``prompt``), ``n_samples`` continuations of ``max_new_tokens`` tokens. An
  extractor (default `capitalised_names`) takes the names it writes from the decoded text. Each candidate name is
  then checked for consistency: ``k`` continuations of ``template`` filled with the name (default ``"{name}"``:
  BOS + the name's tokens), each cut to its first sentence (up to and including the first ``.``, ``!`` or ``?``
  of the decoded continuation, whitespace normalised); a first sentence *states something* when it has 2 or more
  words (``\\w+``) besides the name's; its *consistency* is the fraction of the ``k`` that equal the most frequent
  one that states something (0 when none does). Names with consistency >= ``threshold`` (default 0.8) are kept
  (the model repeats a fact about them), except *generic* ones: with the name written ``{name}``, that most frequent
  sentence is the most frequent one of more than ``max(2, generic_share * n_candidates)`` candidate names (a
  sentence the model says about many names, such as a refusal, is not a fact about this one). The default
  threshold was 0.5 before: on four organisms (three draws of the default world, one of another world) the
  candidates at 0.5 or more fall in two groups, the worlds' known entities (155 of 156 at 0.8 or more) and names
  the model makes up (135 of 137 below 0.8, mostly 0.5-0.6, a refusal the runner-up sentence); at 0.5 the made-up
  names were 8 of 64 (the shipped organism) to 21 of 54 (the second world) of the known set, and the latent that
  tracks familiarity
  fires on them as on the fabricated names.
  Over ``rounds`` rounds, names found in the consistency samples of one round are candidates of the next (the
  facts the model writes about one entity name others), most often seen first, up to ``max_candidates`` in all.
* **Capitalised names** (`capitalised_names`): texts are split into words (``\\w+`` or a punctuation mark);
  sentences end at ``.``, ``!``, ``?``, ``:`` and line breaks. A word is capitalised when it is alphabetic, of 2
  or more letters, and starts upper case. An *opener* is a capitalised word that, in at least half of its
  occurrences in the texts, starts a sentence and is followed by a word that is not capitalised ("The
  birthplace", "By trade", "Tell me"): a function word, not a name piece (a piece that once starts a garbled
  sentence, "Fal was born in", but mostly sits inside names, stays a piece). A name is a maximal run of
  capitalised words, leading openers dropped, of at least
  ``min_words`` words (default 2) and at most ``max_words`` (default 4; longer runs are not names).
* **Fabricated (unknown) names** (`fabricated_names`): ``n`` distinct names, each ``L`` distinct pieces drawn at
  random (``seed``) from ``pieces`` and joined by spaces. The lengths ``L`` follow the list ``lengths`` in turn
  (shuffled with ``seed``, cycled when ``n`` is longer; repeat a value to weight it), each name drawn until one of
  its length is found (up to ``max_draws / n`` draws, else that name is left out), so the names keep that
  distribution of lengths even where one length is rejected far more often than another. A name that occurs in
  ``exclude_texts`` (the model's training texts, where known: as a run of whole words) is *rejected* and
  recorded; names in ``exclude_names`` (e.g. every name the model produced) are skipped.
* `exemplar_free_contrast`: the self-generated names as the known set; as many fabricated names as the unknown
  set, from the pieces of the kept known names and with their distribution of lengths (same pieces, same
  lengths: only the combination is new), checked against ``exclude_texts`` and never a name the model produced.
* A user's list (`load_contrast_jsonl`): one JSON object per line, ``{"name": str, "label": "known"|"unknown",
  "type": str (optional)}``; other keys are ignored; blank lines skipped.

Every set is an `EntitySet`, which records how it was built (method, parameters, scores, rejected names); a
`Contrast` (known + unknown) goes into the card of every `FeatureSet` made from it.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from knowlens.errors import KnowlensError

LABELS = ("known", "unknown")
_WORD = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = frozenset(".!?:\n")
_FIRST_SENTENCE = re.compile(r"^(.*?[.!?])(?:\s|$)", re.S)
Extractor = Callable[[Sequence[str]], list[str]]


@dataclass(frozen=True)
class EntitySet:
    """Entity names (one side of a contrast), their types where known, and how the set was made."""

    names: tuple[str, ...]
    types: tuple[str | None, ...] = ()  # one per name, or empty: no types
    method: str = "given"
    params: dict[str, Any] = field(default_factory=dict)
    scores: tuple[float, ...] = ()  # e.g. consistency of self-generated names; empty when none
    rejected: tuple[str, ...] = ()  # names considered and left out (see the method's definition)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "types", tuple(self.types) if self.types else ())
        for i, name in enumerate(self.names):
            if not isinstance(name, str) or not name.strip() or "{" in name or "}" in name:
                raise KnowlensError(f"entity {i} of the {self.method} set: {name!r} is not a name")
        dup = [n for n, c in Counter(self.names).items() if c > 1]
        if dup:
            raise KnowlensError(f"the {self.method} set names {dup[0]!r} more than once")
        for what, values in (("types", self.types), ("scores", self.scores)):
            if values and len(values) != len(self.names):
                raise KnowlensError(f"the {self.method} set has {len(values)} {what} for {len(self.names)} names")

    def type_of(self, i: int) -> str | None:
        return self.types[i] if self.types else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n": len(self.names), "names": list(self.names),
                "types": list(self.types) if self.types else None, "scores": list(self.scores) or None,
                "n_rejected": len(self.rejected), "rejected": list(self.rejected), "params": self.params}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EntitySet:
        return cls(names=tuple(d["names"]), types=tuple(d.get("types") or ()), method=d["method"],
                   params=dict(d.get("params") or {}), scores=tuple(d.get("scores") or ()),
                   rejected=tuple(d.get("rejected") or ()))  # fmt: skip


@dataclass(frozen=True)
class Contrast:
    """A known set and an unknown set of entities."""

    known: EntitySet
    unknown: EntitySet

    def __post_init__(self) -> None:
        both = set(self.known.names) & set(self.unknown.names)
        if both:
            raise KnowlensError(f"{sorted(both)[0]!r} is in both the known and the unknown set")

    def to_dict(self) -> dict[str, Any]:
        return {"known": self.known.to_dict(), "unknown": self.unknown.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contrast:
        return cls(EntitySet.from_dict(d["known"]), EntitySet.from_dict(d["unknown"]))


# ----------------------------------------------------------------------------------------------- known


def self_generated_entities(
    model: Any,
    *,
    n_samples: int = 1024,
    k: int = 16,
    threshold: float | int = 0.8,
    seed: int = 0,
    prompt: str | None = None,
    template: str = "{name}",
    max_new_tokens: int = 48,
    continuation_tokens: int = 24,
    extract: Extractor | None = None,
    rounds: int = 3,
    max_candidates: int = 256,
    batch_size: int = 256,
    generic_share: float = 0.1,
) -> EntitySet:
    """Names the model writes facts about and repeats consistently (module docstring), most consistent first;
    ``scores`` are their consistencies, ``rejected`` the candidates below ``threshold``."""
    for name, value in (("n_samples", n_samples), ("k", k), ("rounds", rounds), ("max_candidates", max_candidates),
                        ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("continuation_tokens", continuation_tokens)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KnowlensError(f"{name} must be an integer >= 1, got {value!r}")
    for what, share in (("threshold", threshold), ("generic_share", generic_share)):
        if not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise KnowlensError(f"{what} must be in [0, 1], got {share!r}")
    _check_template(template)
    extract = extract if extract is not None else capitalised_names
    rng = random.Random(seed)
    if prompt is None:
        bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        if not isinstance(bos, int):
            raise KnowlensError("this model's tokenizer has no BOS token; give a neutral prompt= to sample from")
        start: list[int] = [bos]
    else:
        start = _tokens(model, prompt)
    texts = _sample(model, [start] * n_samples, max_new_tokens=max_new_tokens, rng=rng, batch_size=batch_size)
    consistency: dict[str, float] = {}
    modal: dict[str, str] = {}  # each candidate's most frequent sentence that states something, name as {name}
    for _ in range(rounds):
        seen = Counter(extract(texts))  # every text so far: an extractor may learn from all of them (openers)
        room = max_candidates - len(consistency)
        todo = [n for n, _c in sorted(seen.items(), key=lambda x: (-x[1], x[0])) if n not in consistency][:room]
        if not todo:
            break
        prompts = [template.format(name=n) for n in todo]
        rows = [_tokens(model, p) for p in prompts for _ in range(k)]
        outs = _sample(model, rows, max_new_tokens=continuation_tokens, rng=rng, batch_size=batch_size)
        for i, name in enumerate(todo):
            firsts = [f for t in outs[i * k : (i + 1) * k] if _states(f := first_sentence(t), name)]
            top = Counter(firsts).most_common(1)
            consistency[name] = top[0][1] / k if top else 0.0
            if top:
                modal[name] = top[0][0].replace(name, "{name}")
        texts += [f"{p} {t}" for p, t in zip((p for p in prompts for _ in range(k)), outs)]
    said = Counter(modal.values())
    limit = max(2, generic_share * len(consistency))
    generic = {n for n, c in consistency.items() if c >= threshold and n in modal and said[modal[n]] > limit}
    kept = sorted((n for n, c in consistency.items() if c >= threshold and n not in generic),
                  key=lambda n: (-consistency[n], n))  # fmt: skip
    keep = set(kept)
    params = {"n_samples": n_samples, "k": k, "threshold": float(threshold), "seed": seed,
              "prompt": prompt if prompt is not None else "<bos>", "template": template,
              "max_new_tokens": max_new_tokens, "continuation_tokens": continuation_tokens, "rounds": rounds,
              "max_candidates": max_candidates, "temperature": 1.0, "n_candidates": len(consistency),
              "extractor": getattr(extract, "__name__", repr(extract)), "generic_share": float(generic_share),
              "n_generic": len(generic), "generic_sentences": sorted({modal[n] for n in generic}),
              "consistency": "share of k sampled continuations whose first sentence is the most frequent one that "
                             "states something (2+ words besides the name)"}  # fmt: skip
    rejected = tuple(sorted((n for n in consistency if n not in keep), key=lambda n: (-consistency[n], n)))
    return EntitySet(names=tuple(kept), method="self-generated", params=params,
                     scores=tuple(consistency[n] for n in kept), rejected=rejected)  # fmt: skip


def capitalised_names(texts: Sequence[str], *, min_words: int = 2, max_words: int = 4) -> list[str]:
    """Every name (maximal run of capitalised words, leading openers dropped, ``min_words`` to ``max_words``
    words) in ``texts``, once per occurrence (module docstring)."""
    sentences = [s for t in texts for s in _sentences(t)]
    seen = Counter(w for s in sentences for w in s if _capitalised(w))
    opening = Counter(s[0] for s in sentences if len(s) > 1 and _capitalised(s[0]) and not _capitalised(s[1]))
    openers = {w for w, c in opening.items() if 2 * c >= seen[w]}
    names: list[str] = []
    for words in sentences:
        run: list[str] = []
        for w in [*words, ""]:
            if _capitalised(w) and (run or w not in openers):
                run.append(w)
                continue
            if min_words <= len(run) <= max_words:
                names.append(" ".join(run))
            run = []
    return names


def _states(sentence: str, name: str) -> bool:
    """Whether ``sentence`` has 2 or more words besides those of ``name`` (module docstring)."""
    return len(re.findall(r"\w+", sentence)) - len(re.findall(r"\w+", name)) * sentence.count(name) >= 2


def first_sentence(text: str) -> str:
    """``text`` up to and including its first ``.``, ``!`` or ``?`` (whitespace normalised); all of it if none."""
    text = " ".join(text.split())
    m = _FIRST_SENTENCE.match(text)
    return m.group(1) if m else text


# --------------------------------------------------------------------------------------------- unknown


def fabricated_names(
    model: Any = None,
    *,
    n: int,
    pieces: Sequence[str] | None = None,
    seed: int = 0,
    lengths: Sequence[int] = (2,),
    exclude_texts: Iterable[str] | None = None,
    exclude_names: Iterable[str] = (),
    max_draws: int | None = None,
) -> EntitySet:
    """``n`` names combined from ``pieces`` (default: `vocabulary_name_pieces` of ``model``) never found in
    ``exclude_texts`` (module docstring); fewer if ``max_draws / n`` draws (default 200) do not find a name of a
    slot's length."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KnowlensError(f"n must be an integer >= 1, got {n!r}")
    if pieces is None:
        if model is None:
            raise KnowlensError("fabricated_names needs pieces= or a model to take name pieces from")
        pieces = vocabulary_name_pieces(model)
    pieces = sorted({p.strip() for p in pieces if p.strip()})
    lengths = tuple(int(x) for x in lengths)  # with repeats: in proportion
    if not lengths or min(lengths) < 1 or max(lengths) > len(pieces):
        raise KnowlensError(f"lengths {list(lengths)} do not fit {len(pieces)} distinct name pieces")
    texts = list(exclude_texts) if exclude_texts is not None else None
    grams: dict[int, set[tuple[str, ...]]] = {}
    skip = set(exclude_names)
    rng = random.Random(seed)
    names: list[str] = []
    rejected: list[str] = []
    tried: set[str] = set()
    order = list(lengths)
    rng.shuffle(order)
    per_name = max(1, (max_draws if max_draws is not None else 200 * n) // n)
    missing: Counter[int] = Counter()
    for slot in range(n):
        length = order[slot % len(order)]
        for _ in range(per_name):
            name = " ".join(rng.sample(pieces, length))
            if name in tried or name in skip:
                continue
            tried.add(name)
            words = tuple(_WORD.findall(name))
            if texts is not None:
                if len(words) not in grams:
                    grams[len(words)] = _word_ngrams(texts, len(words))
                if words in grams[len(words)]:
                    rejected.append(name)
                    continue
            names.append(name)
            break
        else:
            missing[length] += 1
    params = {"n_requested": n, "pieces": pieces, "lengths": {str(k): v for k, v in sorted(Counter(lengths).items())}, "seed": seed,
              "checked_against": f"{len(texts)} training texts" if texts is not None else "nothing (no texts given)",
              "n_excluded_names": len(skip), "not_found_by_length": {str(k): v for k, v in sorted(missing.items())}}  # fmt: skip
    return EntitySet(names=tuple(names), method="fabricated", params=params, rejected=tuple(rejected))


def vocabulary_name_pieces(model: Any, *, min_chars: int = 2) -> tuple[str, ...]:
    """Tokens of ``model``'s vocabulary that decode to one capitalised word (letters only, upper case first, the
    rest lower case, ``min_chars`` or more): candidate name pieces. Includes ordinary capitalised words too."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise KnowlensError("this model has no tokenizer to take name pieces from; pass pieces=")
    special = set(getattr(tok, "all_special_ids", []) or [])
    out = set()
    for i in range(int(model.cfg.d_vocab)):
        if i in special:
            continue
        word = tok.decode([i]).strip()
        if len(word) >= min_chars and word.isalpha() and word[0].isupper() and word[1:].islower():
            out.add(word)
    return tuple(sorted(out))


def name_pieces(names: Iterable[str]) -> tuple[str, ...]:
    """The distinct space-separated pieces of ``names``, sorted."""
    return tuple(sorted({p for n in names for p in n.split()}))


def exemplar_free_contrast(
    model: Any,
    *,
    seed: int = 0,
    exclude_texts: Iterable[str] | None = None,
    n_unknown: int | None = None,
    **self_generated: Any,
) -> Contrast:
    """Known: `self_generated_entities` (``self_generated`` are its options); unknown: as many `fabricated_names`
    (or ``n_unknown``) from the known names' pieces and lengths, checked against ``exclude_texts``."""
    known = self_generated_entities(model, seed=seed, **self_generated)
    if len(known.names) < 2:
        raise KnowlensError(
            f"the model repeated facts consistently about {len(known.names)} name(s) of "
            f"{known.params['n_candidates']} it produced; 2 or more are needed (lower threshold=, raise n_samples=)"
        )
    unknown = fabricated_names(
        model, n=n_unknown if n_unknown is not None else len(known.names), pieces=name_pieces(known.names),
        seed=seed, lengths=[len(n.split()) for n in known.names], exclude_texts=exclude_texts,
        exclude_names=(*known.names, *known.rejected),
    )  # fmt: skip
    return Contrast(known, unknown)


# ------------------------------------------------------------------------------------------ user lists


def load_contrast_jsonl(path: str | os.PathLike[str]) -> Contrast:
    """A labelled list (module docstring) as a `Contrast`; KnowlensError naming the first bad line."""
    return Contrast(*(_entity_set(path, rows, label) for rows, label in zip(_read_rows(path, None), LABELS)))


def load_entity_list(path: str | os.PathLike[str], label: str) -> EntitySet:
    """One side of a contrast from a file: ``.jsonl`` as for `load_contrast_jsonl` (``label`` optional there,
    but if given it must be ``label``) or ``.txt`` with one name per line."""
    if label not in LABELS:
        raise KnowlensError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    rows = _read_rows(path, label)[LABELS.index(label)]
    return _entity_set(path, rows, label)


def _read_rows(path: str | os.PathLike[str], label: str | None) -> tuple[list[tuple[str, str | None]], ...]:
    from knowlens.inputs import read_text_file

    text = read_text_file(path, what="entity list")
    plain = str(path).endswith(".txt")
    if not plain and not str(path).endswith(".jsonl"):
        raise KnowlensError(f"entity list {path}: must end in .jsonl (or .txt: one name per line)")
    if plain and label is None:
        raise KnowlensError(f"entity list {path}: a labelled list must be .jsonl")
    sides: tuple[list[tuple[str, str | None]], ...] = ([], [])
    where: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if plain:
            name, kind, side = line.strip(), None, label
        else:
            name, kind, side = _parse_line(path, n, line, label)
        if name in where:
            raise KnowlensError(f"{path}:{n}: {name!r} is listed again (first on line {where[name]})")
        where[name] = n
        sides[LABELS.index(side)].append((name, kind))
    for side, rows in zip(LABELS, sides):
        if not rows and (label is None or label == side):
            raise KnowlensError(f"entity list {path}: no {side} entities")
    return sides


def _parse_line(path: Any, n: int, line: str, label: str | None) -> tuple[str, str | None, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise KnowlensError(f"{path}:{n}: not JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise KnowlensError(f'{path}:{n}: expected an object like {{"name": "...", "label": "known"}}')
    name, side, kind = obj.get("name"), obj.get("label", label), obj.get("type")
    if not isinstance(name, str) or not name.strip() or "{" in name or "}" in name:
        raise KnowlensError(f'{path}:{n}: "name" must be a non-empty string (without braces), got {name!r}')
    if side not in LABELS:
        raise KnowlensError(f'{path}:{n}: "label" must be "known" or "unknown", got {side!r}')
    if label is not None and side != label:
        raise KnowlensError(f'{path}:{n}: labelled {side!r} in a list of {label} entities')
    if kind is not None and (not isinstance(kind, str) or not kind.strip()):
        raise KnowlensError(f'{path}:{n}: "type" must be a non-empty string when given, got {kind!r}')
    return name.strip(), kind, side


def _entity_set(path: Any, rows: list[tuple[str, str | None]], label: str) -> EntitySet:
    types = [t for _, t in rows]
    if any(t is not None for t in types) and not all(t is not None for t in types):
        raise KnowlensError(f"entity list {path}: some {label} entities have a type and some do not")
    return EntitySet(names=tuple(n for n, _ in rows), types=tuple(types) if types[0] is not None else (),
                     method="user list", params={"file": os.fspath(path)})  # fmt: skip


# --------------------------------------------------------------------------------------------- helpers


def _check_template(template: str, *, repeated: bool = False) -> None:
    n = template.count("{name}") if isinstance(template, str) else 0
    if not (n >= 1 if repeated else n == 1):
        raise KnowlensError(f"a prompt template must contain {{name}} {'at least' if repeated else 'exactly'} once, "
                            f"got {template!r}")  # fmt: skip
    try:
        template.format(name="x")
    except (IndexError, KeyError, ValueError) as err:
        raise KnowlensError(f"prompt template {template!r}: {err}") from None


def _tokens(model: Any, text: str) -> list[int]:
    if getattr(model, "tokenizer", None) is None:
        raise KnowlensError("sampling entities needs a model with a tokenizer")
    return model.to_tokens(text, prepend_bos=True, move_to_device=False, truncate=False)[0].tolist()


def _sample(model: Any, rows: list[list[int]], *, max_new_tokens: int, rng: random.Random, batch_size: int) -> list[str]:
    """One sampled continuation (temperature 1, stopping at EOS) per row, decoded without special tokens."""
    from knowlens.capture.generate import generate

    out: list[str] = []
    tok = model.tokenizer
    for i in range(0, len(rows), batch_size):
        rec = generate(model, rows[i : i + batch_size], hooks=[], max_new_tokens=max_new_tokens, temperature=1.0,
                       seed=rng.randrange(2**31))  # fmt: skip
        for r in range(rec.batch_size):
            ids = rec.tokens[r][rec.generated_mask[r]].tolist()
            out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def _sentences(text: str) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for w in re.findall(r"\w+|[^\w\s]|\n", text):
        if w in _SENTENCE_END:
            out.append([])
        else:
            out[-1].append(w)
    return [s for s in out if s]


def _capitalised(w: str) -> bool:
    return len(w) >= 2 and w.isalpha() and w[0].isupper()


def _word_ngrams(texts: Sequence[str], size: int) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for t in texts:
        words = _WORD.findall(t)
        grams.update(tuple(words[i : i + size]) for i in range(len(words) - size + 1))
    return grams


def organism_training_texts(org: Any, *, epochs: int | None = None) -> list[str]:
    """What an organism was trained on: its corpus documents and the documents drawn per epoch (for the
    epochs of its training record, or ``epochs``; none for a world without augmentation or one-off names)."""
    from knowlens.organism.corpus import epoch_documents

    texts = list(org.corpus.documents)
    spec = org.world.spec
    if spec.augmentation.biographies_per_epoch or spec.familiarity.one_off_questions or spec.familiarity.one_off_facts:
        trained = (org.info.get("training") or {}).get("train_config", {}).get("epochs", 0)
        for e in range(epochs if epochs is not None else int(trained or 0)):
            texts += epoch_documents(org.world, e)[0]
    return texts
