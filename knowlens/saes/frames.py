"""Answer frames: where a model's own answers about entities first depend on the entity, found without exemplars.

Some models decide whether they know an entity not at its name but where their answer needs a fact: the organism
v2 answers "Q : Tell me about Rud Nim . A :" with "Rud Nim is a city in Ketheria ." and refuses an unfamiliar name
in the same slot ("... is a city in unknown ."); its familiarity signal sits at the token before the value ("in"),
not at the name or at "A :". `answer_frames` finds such slots from the model's own greedy answers, with no labels:

* For every name of a set (the *known* side of a contrast: names the model itself writes facts about) and every
  prompt template, the model's greedy continuation (``max_new_tokens``, stopping at EOS), decoded. Answers that do
  not begin with the name (after leading whitespace) are left out. An answer's *words* are those after the name
  (``\\w+`` or one punctuation mark each; a later mention of the name is one word, the same in every answer).
* Per template, the answers' words form a prefix tree. The *support* of a prefix is the number of names whose
  answer begins with it; a prefix is *followed* when ``min_names`` or more names support it (``min_names`` =
  ``max(2, ceil(min_share * n))``, ``n`` the template's answers that begin with their name).
* Walking the tree from the empty prefix (the name itself): a followed prefix whose most common next word is taken
  by at most ``branch_share`` of the answers continuing it is a **frame** (the answers branch there: what comes
  next depends on the entity); otherwise every followed one-word extension is walked, up to ``max_words`` words.
* With ``unknown_names`` (the *unknown* side of the contrast: names the model cannot know), their answers are taken
  the same way and a branch is a frame only where the unknown names' answers leave the known ones: a branch at
  which more than ``stay_share`` of the unknown answers continuing it (``min_names`` of the unknown side or more;
  fewer: no evidence, a frame as above) go on with a followed next word of the known side is a branch into
  *kinds* of answer that known and unknown names share (the organisms' "{name} comes from" / "{name} rises from
  the": an entity's type), not into what only a known entity's answer holds, and is walked past; below it a walk
  ends at the end of the answer's first sentence (``.``, ``!``, ``?``), and a branch walked past with no frame
  below it is a frame itself (the unknown names' answers follow the known ones there: the model makes up a value
  that known entities have). A template on which this finds no frame keeps the frames found from the known side
  alone. Measured (organisms, TopK SAEs at the last block, README): on a world of three types whose known answers
  split at the name, the known side alone put the slot at the name in the answer, where a probe still reads
  familiarity (0.98) but the top exemplar-free latents did not (0.36 / 0.55, one SAE); walking past that branch
  put the slots before the values, where the top latent reached 0.99 on four of five SAEs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from knowlens.errors import KnowlensError

_WORD = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = frozenset(".!?")
_NAME = "\x00"  # a mention of the name inside an answer: one word of its own (not \\w, not a space)


@dataclass(frozen=True)
class AnswerFrames:
    """Frames per template (module docstring), how many answers began with their name, and the parameters."""

    frames: dict[str, tuple[str, ...]]
    n_answers: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def slot_templates(self) -> tuple[str, ...]:
        """Every template followed by each of its frames, template-major."""
        return tuple(t + f for t, fs in self.frames.items() for f in fs)

    def to_dict(self) -> dict[str, Any]:
        return {"frames": {t: list(f) for t, f in self.frames.items()}, "n_answers": dict(self.n_answers),
                "params": dict(self.params)}  # fmt: skip


def answer_frames(
    model: Any,
    names: Sequence[str],
    templates: Sequence[str],
    *,
    max_new_tokens: int = 24,
    min_share: float = 0.1,
    branch_share: float = 0.5,
    max_words: int = 12,
    batch_size: int = 64,
    unknown_names: Sequence[str] = (),
    stay_share: float = 0.5,
) -> AnswerFrames:
    """The frames of ``model``'s greedy answers to ``templates`` filled with ``names`` (module docstring); with
    ``unknown_names``, branches that the unknown names' answers follow too are walked past."""
    from knowlens.capture.generate import generate
    from knowlens.saes.contrast import _check_template, _tokens

    for what, value in (("max_new_tokens", max_new_tokens), ("max_words", max_words), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KnowlensError(f"{what} must be an integer >= 1, got {value!r}")
    for what, share in (("min_share", min_share), ("branch_share", branch_share), ("stay_share", stay_share)):
        if not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise KnowlensError(f"{what} must be in [0, 1], got {share!r}")
    if len(names) < 2:
        raise KnowlensError(f"answer frames need 2 or more names, got {len(names)}")
    for t in templates:
        _check_template(t)
    frames: dict[str, tuple[str, ...]] = {}
    n_answers: dict[str, int] = {}
    n_unknown_answers: dict[str, int] = {}
    walked_past: dict[str, bool] = {}
    tok = model.tokenizer

    def answers_to(t: str, who: Sequence[str]) -> list[tuple[str, str]]:
        rows = [_tokens(model, t.format(name=n)) for n in who]
        texts: list[str] = []
        for i in range(0, len(rows), batch_size):
            rec = generate(model, rows[i : i + batch_size], hooks=[], max_new_tokens=max_new_tokens, temperature=0.0)
            for r in range(rec.batch_size):
                texts.append(_continuation(tok, rows[i + r], rec.tokens[r][rec.generated_mask[r]].tolist()))
        return [(name, text) for name, text in zip(who, texts) if text.lstrip().startswith(name)]

    for t in templates:
        answers = answers_to(t, names)
        n_answers[t] = len(answers)
        min_names = max(2, math.ceil(min_share * len(answers)))
        both: tuple[str, ...] = ()
        if unknown_names:
            others = answers_to(t, unknown_names)
            n_unknown_answers[t] = len(others)
            both = _frames(answers, min_names=min_names, branch_share=branch_share, max_words=max_words,
                           unknown=others, min_unknown=max(2, math.ceil(min_share * len(others))),
                           stay_share=stay_share)  # fmt: skip
        walked_past[t] = bool(both)
        frames[t] = both or _frames(answers, min_names=min_names, branch_share=branch_share, max_words=max_words)
    params = {"max_new_tokens": max_new_tokens, "min_share": float(min_share), "branch_share": float(branch_share),
              "max_words": max_words, "n_names": len(names), "decoding": "greedy"}  # fmt: skip
    if unknown_names:
        params.update(n_unknown_names=len(unknown_names), stay_share=float(stay_share),
                      n_unknown_answers=n_unknown_answers, frames_from_both_sides=walked_past)
    return AnswerFrames(frames, n_answers, params)


def _continuation(tok: Any, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds to ``prompt`` as the tokenizer decodes the two together (keeps the space between)."""
    full = tok.decode(prompt + new, skip_special_tokens=True)
    head = tok.decode(prompt, skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tok.decode(new, skip_special_tokens=True)


def _frames(
    answers: list[tuple[str, str]], *, min_names: int, branch_share: float, max_words: int,
    unknown: list[tuple[str, str]] | None = None, min_unknown: int = 2, stay_share: float = 0.5,
) -> tuple[str, ...]:
    words = [tuple(_WORD.findall(_after(name, text))) for name, text in answers]
    others = [tuple(_WORD.findall(_after(name, text))) for name, text in unknown or ()]

    def shared_branch(prefix: tuple[str, ...], nxt: Counter[str]) -> bool:
        """The unknown answers continuing ``prefix`` mostly go on with a followed next word of the known ones."""
        theirs = Counter(w[len(prefix)] for w in others if w[: len(prefix)] == prefix and len(w) > len(prefix))
        n = sum(theirs.values())
        stay = sum(c for word, c in theirs.items() if nxt[word] >= min_names)
        return n >= min_unknown and stay > stay_share * n

    def walk(prefix: tuple[str, ...], past: bool = False) -> list[tuple[str, ...]]:
        """The frames at or below ``prefix``; ``past``: below a branch walked past, where a walk ends at the end of
        the answer's first sentence."""
        mine = [w for w in words if w[: len(prefix)] == prefix]
        if len(mine) < min_names or (past and prefix and prefix[-1] in _SENTENCE_END):
            return []
        nxt = Counter(w[len(prefix)] for w in mine if len(w) > len(prefix))
        if not nxt:
            return []
        branch = nxt.most_common(1)[0][1] <= branch_share * sum(nxt.values())
        if branch and not (others and shared_branch(prefix, nxt)):
            return [prefix]
        below: list[tuple[str, ...]] = []
        if len(prefix) < max_words:
            for word, _count in sorted(nxt.items(), key=lambda x: (-x[1], x[0])):
                below += walk((*prefix, word), past or branch)
        return below or ([prefix] if branch else [])  # a branch walked past with no frame below is one itself

    found = walk(())
    return tuple(_frame_text(answers, words, p) for p in found)


def _frame_text(answers: list[tuple[str, str]], words: list[tuple[str, ...]], prefix: tuple[str, ...]) -> str:
    """The first answer with ``prefix``, cut after the prefix's last word, its name replaced by ``{name}``."""
    name, text = next((a for a, w in zip(answers, words) if w[: len(prefix)] == prefix))
    lead = text[: len(text) - len(text.lstrip())]
    rest = _after(name, text)
    end = 0
    for m, _ in zip(_WORD.finditer(rest), prefix):
        end = m.end()

    def esc(x: str) -> str:
        return x.replace("{", "{{").replace("}", "}}")

    return esc(lead) + "{name}" + esc(rest[:end]).replace(_NAME, "{name}")


def _after(name: str, text: str) -> str:
    """The answer after its leading name, the name's other mentions written as one placeholder word."""
    return text.lstrip()[len(name) :].replace(name, _NAME)
