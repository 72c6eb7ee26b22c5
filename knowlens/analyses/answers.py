"""Answer held-out questions with the organism and grade every generated token against the world."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from knowlens.capture import generate
from knowlens.organism.corpus import EvalItem
from knowlens.organism.grader import Grade, grade_answer
from knowlens.organism.world import World
from knowlens.types import Tensor


@dataclass(frozen=True)
class Answer:
    """One generated answer: its tokens with their grader class and next-token statistics."""

    item: EvalItem
    tokens: tuple[str, ...]  # generated tokens (EOS included when emitted)
    grade: Grade
    logprob: tuple[float, ...]  # log-probability of each generated token
    entropy: tuple[float, ...]  # entropy (nats) of the distribution it was drawn from
    top1: tuple[float, ...]  # top-1 probability of that distribution
    truth: str | None = None  # the world's value of the asked attribute (None for a biography)
    # With `answer_items(..., hooks=...)`: the prompt's tokens (BOS first), and per hook the activations at
    # every real token, prompt then generated: (len(prompt_tokens) + len(tokens), ...). Generated token j
    # was predicted at row len(prompt_tokens) + j - 1 and its own activations are at row len(prompt_tokens) + j.
    prompt_tokens: tuple[str, ...] = ()
    activations: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def text(self) -> str:
        return " ".join(t for t in self.tokens if not t.startswith("<"))

    def asked_claim_true(self) -> bool:
        """Whether the answer states the asked attribute of the asked entity, correctly."""
        return any(
            c.subject == self.item.entity and c.attribute == self.item.attribute and c.true for c in self.grade.claims
        )


def answer_items(
    model: Any,
    world: World,
    items: Sequence[EvalItem],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 48,
    progress: bool = False,
    hooks: Sequence[str] = (),
) -> list[Answer]:
    """Greedy answers to `items` (batched, KV-cached), each token graded.

    With ``hooks``, every answer also keeps its prompt tokens and its activations at those hook points
    (`Answer.activations`, on the model's device); the answers themselves are the same.
    """
    tok = model.tokenizer
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))  # similar lengths, little padding
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    results: dict[int, Answer] = {}
    for batch in tqdm(batches, desc="answering", unit="batch", disable=not progress):
        prompts = [items[i].prompt for i in batch]
        limit = min(max_new_tokens, model.cfg.n_ctx - max(len(model.to_tokens(p)[0]) for p in prompts))
        rec = generate(model, prompts, hooks=tuple(hooks), max_new_tokens=limit)
        for row, i in enumerate(batch):
            kept: dict[str, Any] = {}
            if hooks:
                start = rec.real_range(row)[0]
                kept["prompt_tokens"] = tuple(tok.convert_ids_to_tokens(rec.tokens[row, start : rec.prompt_len].tolist()))
                kept["activations"] = {h: rec.activation(h, row).clone() for h in hooks}
            cols = rec.generated_mask[row].nonzero().flatten()
            ids = rec.tokens[row, cols].tolist()
            tokens = tuple(tok.convert_ids_to_tokens(ids))
            results[i] = Answer(
                item=items[i],
                tokens=tokens,
                grade=grade_answer(world, tokens, entity=items[i].entity),
                logprob=tuple(rec.logprobs[row, cols].tolist()),
                entropy=tuple(rec.entropy[row, cols].tolist()),
                top1=tuple(rec.top1_prob[row, cols].tolist()),
                truth=_truth(world, items[i]),
                **kept,
            )
    return [results[i] for i in range(len(items))]


def _truth(world: World, item: EvalItem) -> str | None:
    return None if item.attribute is None else world.fact(item.entity, item.attribute)
