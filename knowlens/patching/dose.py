"""Dose-response of steering: generate under `steer(hook, direction, alpha)` for a grid of ``alpha`` and measure
what the model does.

Definitions:

* **Generation.** Greedy, KV-cached, batched (`knowlens.capture.generate`) under
  ``intervene(model, steer(hook, direction, alpha, unit=unit, positions=positions))``, so the steering acts on the
  prompt pass and on every decoding step. ``alpha = 0`` adds exactly zero: its row equals the unsteered model.
* **Per prompt** (`measure_generations`): ``text``, the generated tokens decoded (special tokens skipped);
  ``refused = is_refusal(text)``; ``entropy_answer`` and ``top1_answer``, the entropy (nats) and top-1
  probability of the model's distribution for the first generated token (at the answer position, temperature 1);
  ``entropy_mean`` / ``top1_mean``, their means over the generated tokens; ``refusal_prob``, the probability mass
  of ``refusal_ids`` (e.g. the first token of each refusal) at the answer position, from a full forward of the
  prompt under the same interventions (only when ``refusal_ids`` is given); with ``refusal_in_slot`` (a world
  that refuses in the value slot, "X works as a unknown ."), the largest mass of ``refusal_ids`` (the slot word)
  over the positions that predicted the generated tokens, from a full forward of prompt and answer under the same
  interventions: the slot comes after the answer's first words; ``n_tokens``; every extra
  ``measure[name](prompt_index, text) -> float`` (e.g. answer accuracy from a grader); and, with ``per_run``, the
  items of ``per_run(interventions)[prompt_index]`` (called once per run with that run's interventions: e.g. token
  labels from `knowlens.labels.label_generation` under the same interventions; the CLI's ablate and steer do so).
* **Rows** (`DoseResponse.rows`): one per (direction, alpha), the per-prompt values averaged over prompts
  (``refusal_rate`` is the mean of ``refused``).
* **Refusal** (`refusal_matcher`): the generated text, whitespace-normalised, starts with one of the refusal
  templates, ``{name}`` matching any non-empty run of words, or (with ``slot_word``, for a world that refuses in
  the value slot) holds ``slot_word`` as a word; the default is the shipped organism's templates and slot word.
* **Control** (``control="random"``): a direction drawn from a standard normal (``torch.Generator`` seeded
  with ``seed``), rescaled to the norm of ``direction``, run over the same alphas; its rows have
  ``direction="random"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from knowlens.errors import KnowlensError
from knowlens.patching.interventions import Intervention, Unit, intervene, steer
from knowlens.patching.positions import Positions
from knowlens.types import Tensor

PerRun = Callable[[tuple[Any, ...]], Sequence[Mapping[str, Any]]]  # interventions -> one dict per prompt
STAT_KEYS = ("refusal_rate", "refusal_prob", "entropy_answer", "top1_answer", "entropy_mean", "top1_mean")


@dataclass(frozen=True, eq=False)
class DoseResponse:
    """`dose_response`'s table: ``rows`` (one dict per direction and alpha), ``per_prompt`` (one dict per
    direction, alpha and prompt, with the text), the directions used (``directions["target"]``, and
    ``["random"]`` with a control), and the settings."""

    rows: list[dict[str, Any]]
    per_prompt: list[dict[str, Any]]
    hook: str
    unit: str
    alphas: tuple[float, ...]
    directions: dict[str, Tensor] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "unit": self.unit, "alphas": list(self.alphas), "rows": self.rows,
                "per_prompt": self.per_prompt, "params": self.params,
                "direction_norms": {k: float(v.norm()) for k, v in self.directions.items()}}  # fmt: skip

    def figure(self, title: str | None = None) -> Any:
        """A plotly figure: refusal rate (and probability), answer-position entropy and top-1 probability
        against alpha, one line per direction."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        panels = [("refusal_rate", "refusal rate"), ("entropy_answer", "entropy at the answer (nats)"),
                  ("top1_answer", "top-1 probability at the answer")]  # fmt: skip
        if any("refusal_prob" in r for r in self.rows):
            panels.insert(1, ("refusal_prob", "refusal probability"))
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels])
        colours = {"target": "#d62728", "random": "#7f7f7f"}
        for name in dict.fromkeys(r["direction"] for r in self.rows):
            rows = [r for r in self.rows if r["direction"] == name]
            for col, (key, _) in enumerate(panels, start=1):
                fig.add_trace(
                    go.Scatter(x=[r["alpha"] for r in rows], y=[r.get(key) for r in rows], mode="lines+markers",
                               name=name, legendgroup=name, showlegend=col == 1,
                               line={"color": colours.get(name)}),
                    row=1, col=col,
                )  # fmt: skip
                fig.update_xaxes(title_text=f"alpha ({self.unit})", row=1, col=col)
        fig.update_layout(title=title or f"steering at {self.hook}", height=360)
        return fig


def refusal_matcher(templates: Sequence[str] | None = None, *, slot_word: str | None = None) -> Callable[[str], bool]:
    """``is_refusal(text)``: True when ``text`` starts with one of ``templates`` or holds ``slot_word`` as a word
    (module docstring); default (no templates): the shipped organism's refusal templates and slot word."""
    if templates is None:
        templates = organism_refusals()
        slot_word = slot_word if slot_word is not None else organism_slot_word()
    if slot_word is not None and (not isinstance(slot_word, str) or len(slot_word.split()) != 1):
        raise KnowlensError(f"the refusal slot word must be one word, got {slot_word!r}")
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and t.strip() for t in templates):
        raise KnowlensError(f"refusal templates must be a non-empty list of non-empty strings, got {templates!r}")
    patterns = []
    for tpl in templates:
        parts = [re.escape(p) for p in " ".join(tpl.split()).split("{name}")]
        patterns.append(re.compile(r"\S(?:.*?\S)?".join(parts)))

    def is_refusal(text: str) -> bool:
        words = text.split()
        norm = " ".join(words)
        return any(p.match(norm) for p in patterns) or (slot_word is not None and slot_word in words)

    return is_refusal


def organism_refusals(world_yaml: Any = None) -> tuple[str, ...]:
    """The refusal templates of an organism's world spec (default: the shipped organism's)."""
    from knowlens.organism.spec import load_spec
    from knowlens.organism.store import SHIPPED

    return tuple(load_spec(world_yaml if world_yaml is not None else SHIPPED / "world.yaml").refusals)


def organism_slot_word(world_yaml: Any = None) -> str | None:
    """The word an organism's world refuses with in the value slot (`refusal_value`), or None (default: the
    shipped organism's world)."""
    from knowlens.organism.spec import load_spec
    from knowlens.organism.store import SHIPPED

    return load_spec(world_yaml if world_yaml is not None else SHIPPED / "world.yaml").refusal_value


def refusal_token_ids(model: Any, templates: Sequence[str], *, prompt: str | None = None) -> list[int]:
    """The distinct first tokens of ``templates`` as the model would read them after ``prompt`` (``{name}``
    filled with a placeholder word): the tokens whose probability at the answer position is the refusal
    probability."""
    if getattr(model, "tokenizer", None) is None:
        raise KnowlensError("refusal tokens need a model with a tokenizer")
    ids: list[int] = []
    for tpl in templates:
        text = tpl.replace("{name}", "X")
        if prompt is None:
            row = model.to_tokens(text, prepend_bos=False)[0]
            first = int(row[0]) if row.numel() else None
        else:
            head = model.to_tokens(prompt, prepend_bos=False)[0]
            full = model.to_tokens(f"{prompt} {text}", prepend_bos=False)[0]
            first = int(full[head.numel()]) if full.numel() > head.numel() else None
        if first is None:
            raise KnowlensError(f"refusal template {tpl!r} has no tokens")
        if first not in ids:
            ids.append(first)
    return ids


def measure_generations(
    model: Any,
    prompts: Sequence[Any] | Tensor,
    *interventions: Intervention | tuple[str, Any],
    max_new_tokens: int = 24,
    is_refusal: Callable[[str], bool] | None = None,
    refusal_ids: Sequence[int] | None = None,
    refusal_in_slot: bool = False,
    measure: Mapping[str, Callable[[int, str], float]] | None = None,
    per_run: PerRun | None = None,
) -> list[dict[str, Any]]:
    """Greedy KV-cached generation of ``prompts`` under ``interventions`` (none: the plain model) and the
    per-prompt values of the module docstring, one dict per prompt."""
    from knowlens.capture import generate
    from knowlens.capture.prompts import tokenize_prompts

    is_refusal = is_refusal if is_refusal is not None else refusal_matcher()
    with intervene(model, *interventions):
        rec = generate(model, prompts, hooks=[], max_new_tokens=max_new_tokens, temperature=0.0)
    probs = None
    P = rec.prompt_len
    if refusal_ids:
        rows = tokenize_prompts(model, prompts)
        n_prompt = [int(r.numel()) for r in rows]
        if refusal_in_slot:  # prompt and answer, unpadded
            rows = [torch.cat([r.to(rec.tokens.device), rec.tokens[i][rec.generated_mask[i]]]) for i, r in enumerate(rows)]
        with intervene(model, *interventions):  # anew: position trackers start from a fresh sequence
            probs = _refusal_probs(model, rows, refusal_ids, first=n_prompt if refusal_in_slot else None)
    out = []
    for i in range(rec.batch_size):
        gen = rec.generated_mask[i]
        ids = rec.tokens[i][gen].tolist()
        text = _decode(model, ids)
        n = len(ids)
        row: dict[str, Any] = {
            "prompt": i,
            "text": text,
            "refused": bool(is_refusal(text)),
            "entropy_answer": float(rec.entropy[i, P]) if n else float("nan"),
            "top1_answer": float(rec.top1_prob[i, P]) if n else float("nan"),
            "entropy_mean": float(rec.entropy[i][gen].mean()) if n else float("nan"),
            "top1_mean": float(rec.top1_prob[i][gen].mean()) if n else float("nan"),
            "n_tokens": n,
        }
        if probs is not None:
            row["refusal_prob"] = float(probs[i])
        for name, fn in (measure or {}).items():
            row[name] = float(fn(i, text))
        out.append(row)
    if per_run is not None:
        extra = per_run(tuple(interventions))
        if len(extra) != len(out):
            raise KnowlensError(f"per_run gave {len(extra)} rows for {len(out)} prompts")
        for row, more in zip(out, extra):
            row.update(more)
    return out


def dose_response(
    model: Any,
    prompts: Sequence[Any] | Tensor,
    direction: Tensor,
    hook: str,
    alphas: Sequence[float],
    *,
    unit: Unit = "resid_norm",
    positions: Positions = "all",
    max_new_tokens: int = 24,
    is_refusal: Callable[[str], bool] | None = None,
    refusal_ids: Sequence[int] | None = None,
    refusal_in_slot: bool = False,
    measure: Mapping[str, Callable[[int, str], float]] | None = None,
    control: Literal["random"] | None = None,
    seed: int = 0,
    per_run: PerRun | None = None,
) -> DoseResponse:
    """Steer ``hook`` along ``direction`` with each of ``alphas`` (in ``unit``), generate and measure (module
    docstring); with ``control="random"`` the same for a seeded random direction of the same norm."""
    alphas = tuple(float(a) for a in alphas)
    if not alphas:
        raise KnowlensError("dose_response: give at least one alpha")
    if control not in (None, "random"):
        raise KnowlensError(f"dose_response: control must be None or 'random', got {control!r}")
    if not isinstance(direction, Tensor) or not direction.is_floating_point():
        raise KnowlensError(f"dose_response: direction must be a float tensor, got {type(direction).__name__}")
    directions = {"target": direction.detach().cpu()}
    if control == "random":
        directions["random"] = random_direction_like(direction, seed=seed)
    is_refusal = is_refusal if is_refusal is not None else refusal_matcher()
    rows: list[dict[str, Any]] = []
    per_prompt: list[dict[str, Any]] = []
    for name, d in directions.items():
        for alpha in alphas:
            edit = steer(hook, d, alpha, unit=unit, positions=positions)
            got = measure_generations(model, prompts, edit, max_new_tokens=max_new_tokens, is_refusal=is_refusal,
                                      refusal_ids=refusal_ids, refusal_in_slot=refusal_in_slot,
                                      measure=measure, per_run=per_run)  # fmt: skip
            per_prompt += [{"direction": name, "alpha": alpha, **g} for g in got]
            rows.append({"direction": name, "alpha": alpha, **summarise(got)})
    return DoseResponse(rows=rows, per_prompt=per_prompt, hook=hook, unit=unit, alphas=alphas,
                        directions=directions, params={"positions": str(positions), "max_new_tokens": max_new_tokens,
                                                       "control": control, "seed": seed})  # fmt: skip


def random_direction_like(direction: Tensor, *, seed: int = 0) -> Tensor:
    """A standard-normal direction (seeded) of ``direction``'s shape, dtype and L2 norm."""
    gen = torch.Generator().manual_seed(int(seed))
    r = torch.randn(tuple(direction.shape), generator=gen, dtype=torch.float64)
    out = r * (direction.detach().double().norm() / r.norm())
    return out.to(direction.dtype)


def summarise(per_prompt: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over prompts of the per-prompt values (``refused`` -> ``refusal_rate``); ``n_prompts``."""
    out: dict[str, Any] = {"n_prompts": len(per_prompt)}
    if not per_prompt:
        return out
    out["refusal_rate"] = sum(bool(p["refused"]) for p in per_prompt) / len(per_prompt)
    skip = {"prompt", "text", "refused", "direction", "alpha"}
    for key, first in per_prompt[0].items():
        if key not in skip and isinstance(first, (int, float)):  # numbers only (a labelled text is not averaged)
            vals = [float(p[key]) for p in per_prompt if p[key] == p[key]]  # NaN-free
            out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _refusal_probs(model: Any, rows: list[Tensor], ids: Sequence[int], first: list[int] | None = None) -> list[float]:
    """Per row (a full forward each), the probability of ``ids`` as the next token after it; with ``first`` (the
    prompt lengths of rows that go on with the answer), the largest such probability over the positions that
    predicted the answer's tokens (0.0 for an empty answer)."""
    device = next(iter(model.parameters())).device
    wanted = torch.tensor(list(ids), dtype=torch.long, device=device)
    out = []
    with torch.no_grad():
        for i, row in enumerate(rows):
            logits = model(row[None].to(device))[0]
            if first is None:
                out.append(float(torch.softmax(logits[-1].double(), -1)[wanted].sum()))
                continue
            answer = logits[first[i] - 1 : row.numel() - 1]
            mass = torch.softmax(answer.double(), -1)[:, wanted].sum(-1)
            out.append(float(mass.max()) if mass.numel() else 0.0)
    return out


def _decode(model: Any, ids: list[int]) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(str(i) for i in ids)
    return str(tok.decode(ids, skip_special_tokens=True))
