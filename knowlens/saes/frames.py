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
* A frame is kept as the text the model wrote from the end of the prompt to the end of the frame's last word (from
  the first answer, in name order, that has it), the name replaced by ``{name}``: e.g. ``" {name} is a city in"``.
  A *slot template* is a prompt template followed by one of its frames (``{name}`` then occurs twice); its last
  token is the ``slot`` position of `locate_entity_known`.
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
) -> AnswerFrames:
    """The frames of ``model``'s greedy answers to ``templates`` filled with ``names`` (module docstring)."""
    from knowlens.capture.generate import generate
    from knowlens.saes.contrast import _check_template, _tokens

    for what, value in (("max_new_tokens", max_new_tokens), ("max_words", max_words), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KnowlensError(f"{what} must be an integer >= 1, got {value!r}")
    for what, share in (("min_share", min_share), ("branch_share", branch_share)):
        if not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise KnowlensError(f"{what} must be in [0, 1], got {share!r}")
    if len(names) < 2:
        raise KnowlensError(f"answer frames need 2 or more names, got {len(names)}")
    for t in templates:
        _check_template(t)
    frames: dict[str, tuple[str, ...]] = {}
    n_answers: dict[str, int] = {}
    tok = model.tokenizer
    for t in templates:
        rows = [_tokens(model, t.format(name=n)) for n in names]
        texts: list[str] = []
        for i in range(0, len(rows), batch_size):
            rec = generate(model, rows[i : i + batch_size], hooks=[], max_new_tokens=max_new_tokens, temperature=0.0)
            for r in range(rec.batch_size):
                texts.append(_continuation(tok, rows[i + r], rec.tokens[r][rec.generated_mask[r]].tolist()))
        answers = [(name, text) for name, text in zip(names, texts) if text.lstrip().startswith(name)]
        n_answers[t] = len(answers)
        frames[t] = _frames(answers, min_names=max(2, math.ceil(min_share * len(answers))),
                            branch_share=branch_share, max_words=max_words)  # fmt: skip
    params = {"max_new_tokens": max_new_tokens, "min_share": float(min_share), "branch_share": float(branch_share),
              "max_words": max_words, "n_names": len(names), "decoding": "greedy"}  # fmt: skip
    return AnswerFrames(frames, n_answers, params)


def _continuation(tok: Any, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds to ``prompt`` as the tokenizer decodes the two together (keeps the space between)."""
    full = tok.decode(prompt + new, skip_special_tokens=True)
    head = tok.decode(prompt, skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tok.decode(new, skip_special_tokens=True)


def _frames(answers: list[tuple[str, str]], *, min_names: int, branch_share: float, max_words: int) -> tuple[str, ...]:
    words = [tuple(_WORD.findall(_after(name, text))) for name, text in answers]
    found: list[tuple[str, ...]] = []

    def walk(prefix: tuple[str, ...]) -> None:
        mine = [w for w in words if w[: len(prefix)] == prefix]
        if len(mine) < min_names:
            return
        nxt = Counter(w[len(prefix)] for w in mine if len(w) > len(prefix))
        if not nxt:
            return
        if nxt.most_common(1)[0][1] <= branch_share * sum(nxt.values()):
            found.append(prefix)
            return
        if len(prefix) < max_words:
            for word, _count in sorted(nxt.items(), key=lambda x: (-x[1], x[0])):
                walk((*prefix, word))

    walk(())
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
