"""`TokenLabels`: what `label_generation` produced, per generation and per generated token, and its JSONL export.

JSONL (``to_jsonl``): one JSON object per generation (prompt order)::

    {"row": 0, "prompt": "Q : ... A :", "generated": "Zed Nim is a city in Quin . <eos>",
     "model": {"name", "fingerprint", "shape_fingerprint"}, "probes": ["self_consistency", ...],
     "combine": "first", "threshold": 0.5,
     "tokens": [{"index": 0, "id": 57, "text": "Zed", "p_reliable": 0.93, "label": "reliable",
                 "signals": {"probe:self_consistency": 0.93, "entity_known": 0.88, "input_surprise": 0.01,
                             "top1_prob": 0.99, "entropy": 0.05}, "class": "other"}, ...]}

``signals`` hold every probe's score (``probe:<name>``: its calibrated probability), ``entity_known`` (the entity
probe's score carried from the last entity name's last token; null before any name, or with no entity probe),
``input_surprise`` (``-log p`` of the token under the model, nats), ``top1_prob`` and ``entropy`` (nats) of the
distribution the token was chosen from. ``class`` (the grader's ground truth) appears only when known
(`TokenLabels.with_classes`). ``explanation`` appears only on tokens labelled unreliable and only with
``label_generation(..., explain=True)``: the primary probe, its hook, the read position and token, its decision,
and the top entries by |attribution| at residual positions (``positions``) and, with an SAE, at SAE latents
(``latents``; ``latent: "error"`` / ``"bias"`` for the SAE's error term / decoder bias), each ``{"position", "token", "value", "share", "sign"}``
(`knowlens.labels.explain`). Floats are rounded to 6 decimals; NaN is written as null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowlens.errors import KnowlensError
from knowlens.outputs import atomic_write_text

if TYPE_CHECKING:
    from knowlens.labels.explain import Explanation

LABELS = ("reliable", "unreliable")


@dataclass(frozen=True)
class TokenLabel:
    """One generated token: ``index`` (0-based within its generation), its id and text, ``p_reliable``, the label
    and the signals behind it (module docstring)."""

    row: int
    index: int
    token_id: int
    text: str
    p_reliable: float
    label: str
    signals: dict[str, float | None] = field(default_factory=dict)
    explanation: Explanation | None = None  # with explain=True, on unreliable tokens (knowlens.labels.explain)

    def to_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "id": self.token_id, "text": self.text, "p_reliable": _num(self.p_reliable),
               "label": self.label, "signals": {k: _num(v) for k, v in self.signals.items()}}  # fmt: skip
        if self.explanation is not None:
            out["explanation"] = self.explanation.to_dict()
        return out


@dataclass(frozen=True)
class GenerationLabels:
    """One prompt's generation: the prompt (text, or token ids), its tokens as text, and each generated token."""

    row: int
    prompt: str | tuple[int, ...]
    prompt_tokens: tuple[str, ...]
    tokens: tuple[TokenLabel, ...]
    classes: tuple[str, ...] | None = None  # ground truth per generated token, when known

    @property
    def token_texts(self) -> tuple[str, ...]:
        return tuple(t.text for t in self.tokens)

    @property
    def text(self) -> str:
        return " ".join(self.token_texts)

    def to_dict(self) -> dict[str, Any]:
        tokens = [t.to_dict() for t in self.tokens]
        if self.classes is not None:
            for t, c in zip(tokens, self.classes):
                t["class"] = c
        prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        return {"row": self.row, "prompt": prompt, "generated": self.text, "tokens": tokens}


@dataclass(frozen=True)
class TokenLabels:
    """Every generation's labels, the probes that made them (name, hook, position, target, label source, role) and
    the rule (``combine``, ``threshold``); ``to_jsonl`` / ``to_html`` write them atomically."""

    generations: tuple[GenerationLabels, ...]
    probes: tuple[dict[str, Any], ...]
    threshold: float
    combine: str
    model: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.generations)

    def __iter__(self):
        return iter(self.generations)

    def __getitem__(self, i: int) -> GenerationLabels:
        return self.generations[i]

    @property
    def n_tokens(self) -> int:
        return sum(len(g.tokens) for g in self.generations)

    def with_classes(self, classes: Sequence[Sequence[str]]) -> TokenLabels:
        """A copy with the ground-truth class of every generated token (one sequence per generation)."""
        if len(classes) != len(self.generations):
            raise KnowlensError(f"{len(classes)} class lists for {len(self.generations)} generations")
        gens = []
        for g, c in zip(self.generations, classes):
            if len(c) != len(g.tokens):
                raise KnowlensError(f"generation {g.row}: {len(c)} classes for {len(g.tokens)} tokens")
            gens.append(replace(g, classes=tuple(str(x) for x in c)))
        return replace(self, generations=tuple(gens))

    def records(self) -> list[dict[str, Any]]:
        """The JSONL objects (module docstring), one per generation."""
        head = {"model": dict(self.model), "probes": [p["name"] for p in self.probes], "combine": self.combine,
                "threshold": self.threshold}  # fmt: skip
        return [{**g.to_dict(), **head} for g in self.generations]

    def to_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write one JSON object per generation to ``path`` atomically (module docstring)."""
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records())
        return atomic_write_text(Path(path), text)

    def to_html(self, path: str | os.PathLike[str], *, title: str = "knowlens labels") -> Path:
        """A self-contained HTML report (`knowlens.labels.report`), written atomically."""
        from knowlens.labels.report import write_html

        return write_html(self, path, title=title)


def _num(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), 6) + 0.0
