"""knowlens's own KV-cached generation loop for a HookedTransformer, capturing hooks at every token.

Unlike ``HookedTransformer.generate``, the loop runs one more (1-token) forward pass after the last
sampling step, so the last generated token's activations exist too, and it stops that pass at the
last layer a requested hook needs. Prompts of different lengths are left-padded; TransformerLens
derives each row's positions (absolute or rotary) from the attention mask, so every real token sees
the same positions and keys as in an unpadded run (the equivalence tests check this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knowlens.capture.buffers import CaptureBuffers
from knowlens.capture.hooks import stop_layer_for, validate_hook_names
from knowlens.capture.kv_cache import StaticKVCache
from knowlens.capture.prompts import PromptsArg, eos_token_ids, left_pad, pad_token_id, tokenize_prompts
from knowlens.capture.record import ActivationRecord
from knowlens.capture.sampling import choose_next, next_token_stats
from knowlens.errors import KnowlensError
from knowlens.fingerprint import model_identity
from knowlens.types import Bool, Float, Int, Tensor


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class StepState:
    """What one generation step produced, handed to ``on_step`` while still on the model's device.

    ``position`` is the column (in the record's ``pos`` axis) of the token chosen at this step.
    ``alive`` is False for rows that had already finished (their ``tokens`` entry is the pad id and their
    statistics are 0). ``activations`` are views into the capture buffers at ``position`` (the new token's
    own activations, already computed): ``(batch, ...)`` per-token, ``(batch, head, position + 1)``
    for query-key hooks. Treat them as read-only; clone what you keep.
    """

    step: int
    position: int
    tokens: Int[Tensor, " batch"]
    alive: Bool[Tensor, " batch"]
    logprobs: Float[Tensor, " batch"]
    entropy: Float[Tensor, " batch"]
    top1_prob: Float[Tensor, " batch"]
    activations: dict[str, Tensor]


def generate(
    model: Any,
    prompts: PromptsArg,
    *,
    hooks: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    on_step: Callable[[StepState], object] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    check_eos_every: int = 8,
) -> ActivationRecord:
    """Generate up to ``max_new_tokens`` per prompt and capture ``hooks`` at every real token.

    Args:
        model: a TransformerLens ``HookedTransformer``.
        prompts: strings (tokenized one by one with ``model.to_tokens(p, prepend_bos=True)``) or token-id
            rows (lists of ints, 1-D tensors, or a 2-D tensor); rows of different lengths are left-padded.
        hooks: hook point names (``blocks.3.hook_resid_post``, ``blocks.1.attn.hook_pattern`` ...).
        temperature: 0 is greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling mass (only with temperature > 0).
        seed: seeds a ``torch.Generator`` on the model's device (same seed, same tokens).
        stop_at_eos: a row stops after it emits an EOS token (``eos_token_id``, else the tokenizer's; with
            neither known, rows run to ``max_new_tokens``). The loop ends once every row has stopped; it
            checks that every ``check_eos_every`` steps (one host sync each), so up to that many extra
            steps may run, their tokens masked as padding.
        on_step: called once per step with a `StepState` after the new token's forward pass; an
            exception it raises propagates and the model is left without hooks.

    Returns:
        An `ActivationRecord` (see `knowlens.capture.record` for the exact layout). Its ``pos`` axis has
        ``prompt_len + n`` columns, where ``n <= max_new_tokens`` is the last step any row was generating.
    """
    names = validate_hook_names(model, hooks)
    _check_options(max_new_tokens, temperature, top_p, check_eos_every)
    rows = tokenize_prompts(model, prompts)
    prompt_len = max(int(r.numel()) for r in rows)
    n_ctx = int(model.cfg.n_ctx)
    if prompt_len + max_new_tokens > n_ctx:
        raise KnowlensError(
            f"longest prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {n_ctx} tokens"
        )
    device = model.embed.W_E.device
    pad_id = pad_token_id(model)
    eos = eos_token_ids(model, eos_token_id) if stop_at_eos else ()
    total_len = prompt_len + max_new_tokens
    tokens, prompt_mask = left_pad(rows, pad_id=pad_id, total_len=total_len, device=device)
    generator = None
    if temperature > 0.0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    buffers = CaptureBuffers(names, batch=len(rows), total_len=total_len)
    loop = _Loop(
        model=model,
        tokens=tokens,
        prompt_mask=prompt_mask,
        prompt_len=prompt_len,
        pad_id=pad_id,
        eos=eos,
        buffers=buffers,
        stop_layer=stop_layer_for(model, names),
    )
    # inference mode for speed; every tensor the record keeps is allocated outside it (see CaptureBuffers)
    with torch.inference_mode(), model.hooks(fwd_hooks=buffers.fwd_hooks()):
        loop.run(
            max_new_tokens,
            temperature=float(temperature),
            top_p=top_p,
            generator=generator,
            on_step=on_step,
            check_eos_every=check_eos_every,
        )
    return loop.to_record(
        meta={
            "max_new_tokens": str(max_new_tokens),
            "temperature": str(float(temperature)),
            "top_p": str(top_p),
            "seed": str(seed),
            "stop_at_eos": str(stop_at_eos),
        },
        model=model_identity(model),
    )


def _check_options(max_new_tokens: int, temperature: float, top_p: float | None, check_every: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KnowlensError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise KnowlensError(f"temperature must be >= 0, got {temperature!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise KnowlensError(f"top_p must be in (0, 1], got {top_p!r}")
    if check_every < 1:
        raise KnowlensError(f"check_eos_every must be >= 1, got {check_every!r}")


class _Loop:
    """State of one generation: device buffers written in place, one column per step."""

    def __init__(
        self,
        *,
        model: Any,
        tokens: Tensor,
        prompt_mask: Tensor,
        prompt_len: int,
        pad_id: int,
        eos: tuple[int, ...],
        buffers: CaptureBuffers,
        stop_layer: int | None,
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.prompt_mask = prompt_mask
        self.prompt_len = prompt_len
        self.pad_id = pad_id
        self.eos = eos
        self.buffers = buffers
        self.stop_layer = stop_layer
        device = tokens.device
        self.generated_mask = torch.zeros_like(prompt_mask)
        # log-prob, entropy, top-1 probability: one buffer, so a step writes them with one copy
        self.stats = torch.zeros((3, *tokens.shape), dtype=torch.float32, device=device)
        self.logprobs, self.entropy, self.top1_prob = self.stats.unbind(0)
        self.n_cols = prompt_len

    def run(
        self,
        max_new_tokens: int,
        *,
        temperature: float,
        top_p: float | None,
        generator: torch.Generator | None,
        on_step: Callable[[StepState], object] | None,
        check_eos_every: int,
    ) -> None:
        model, buffers, P = self.model, self.buffers, self.prompt_len
        batch, total_len = self.tokens.shape
        device = self.tokens.device
        cache = StaticKVCache(model.cfg, batch=batch, total_len=total_len, device=device)
        # attention mask of every column: each row's real prompt, then every generated column. With no
        # padding at all it is left out (None), which TransformerLens computes with fewer operations.
        padded = not bool(self.prompt_mask[:, :P].all())  # one host sync, before the loop
        attn = self.prompt_mask.long()
        attn[:, P:] = 1

        def forward(start: int, stop: int, **kw: Any) -> Any:
            return _forward_tokens(
                model, self.tokens[:, start:stop], pos_offset=start, cache=cache,
                attention_mask=attn[:, :stop] if padded else None, **kw,
            )  # fmt: skip

        buffers.set_window(0, P)
        last = forward(0, P)[:, -1]
        buffers.check_all_fired()
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        eos = torch.tensor(self.eos, dtype=torch.long, device=device) if self.eos else None
        for step in range(max_new_tokens):
            pos = P + step
            alive = ~finished
            chosen = choose_next(last, temperature=temperature, top_p=top_p, generator=generator)
            logp, ent, top1 = next_token_stats(last, chosen)
            chosen = chosen.masked_fill(finished, self.pad_id)
            self.tokens[:, pos] = chosen
            self.generated_mask[:, pos] = alive
            self.stats[:, :, pos] = torch.stack((logp, ent, top1)).masked_fill_(finished, 0.0)
            buffers.set_window(pos, pos + 1)
            self.n_cols = pos + 1
            if step < max_new_tokens - 1:
                last = forward(pos, pos + 1)[:, -1]
            elif buffers.names:  # the last token's own activations (no logits needed)
                forward(pos, pos + 1, stop_at_layer=self.stop_layer)
            if on_step is not None:
                on_step(
                    StepState(
                        step=step,
                        position=pos,
                        tokens=chosen,
                        alive=alive,
                        logprobs=self.logprobs[:, pos],
                        entropy=self.entropy[:, pos],
                        top1_prob=self.top1_prob[:, pos],
                        activations=buffers.step_views(pos),
                    )
                )
            if eos is not None:
                finished |= alive & torch.isin(chosen, eos)
                if (step + 1) % check_eos_every == 0 and bool(finished.all()):
                    break

    def to_record(self, *, meta: dict[str, str], model: dict[str, str]) -> ActivationRecord:
        real = self.prompt_mask | self.generated_mask
        n_cols = self.n_cols
        if n_cols > self.prompt_len + 1:  # drop trailing all-pad columns (steps run after every row stopped)
            used = real[:, self.prompt_len :].any(dim=0).nonzero()
            n_cols = self.prompt_len + int(used.max()) + 1
        pad_mask = ~real[:, :n_cols]
        total = self.tokens.shape[1]

        def trim(x: Tensor) -> Tensor:
            return x[:, :n_cols].clone() if n_cols < total else x

        return ActivationRecord(
            tokens=trim(self.tokens),
            prompt_mask=trim(self.prompt_mask),
            generated_mask=trim(self.generated_mask),
            pad_mask=pad_mask,
            logprobs=self.logprobs[:, :n_cols].clone(),
            entropy=self.entropy[:, :n_cols].clone(),
            top1_prob=self.top1_prob[:, :n_cols].clone(),
            activations=self.buffers.finish(pad_mask),
            prompt_len=self.prompt_len,
            pad_token_id=self.pad_id,
            eos_token_ids=self.eos,
            meta=meta,
            model=model,
        )


def _forward_tokens(
    model: Any,
    tokens: Tensor,
    *,
    pos_offset: int,
    cache: StaticKVCache,
    attention_mask: Tensor | None,
    stop_at_layer: int | None = None,
) -> Tensor:
    """``model(tokens)`` for the columns ``[pos_offset, pos_offset + n)``, through the KV cache.

    The embedding step is ``HookedTransformer.input_to_embed`` (``hook_tokens``, ``hook_embed``,
    ``get_residual``, so the embedding hooks fire) without its attention-mask bookkeeping:
    ``attention_mask`` is the mask of every column so far, ``(batch, pos_offset + n)``, or None when no
    row is padded. Returns the logits, or the residual before block ``stop_at_layer`` if given.
    """
    if model.cfg.use_hook_tokens:
        tokens = model.hook_tokens(tokens)
    embed = model.hook_embed(model.embed(tokens))
    residual, shortformer_pos_embed = model.get_residual(
        embed, pos_offset, attention_mask=attention_mask, tokens=tokens, return_shortformer_pos_embed=True
    )
    return model(
        residual,
        start_at_layer=0,
        stop_at_layer=stop_at_layer,
        shortformer_pos_embed=shortformer_pos_embed,
        attention_mask=attention_mask,
        past_kv_cache=cache,
    )
