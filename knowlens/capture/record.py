"""ActivationRecord: what one `generate` call computed, and its exact safetensors round trip.

Layout of every ``(batch, pos)`` tensor: each row is its prompt, left-padded to the longest prompt
(``prompt_len`` columns), followed by the generated tokens and, after a row's EOS, right padding.
Exactly one of ``prompt_mask``, ``generated_mask``, ``pad_mask`` is True at every position, and a row's
real tokens (prompt + generated) are one contiguous run.

Per-token statistics (``logprobs``, ``entropy``, ``top1_prob``) sit at the position of the generated
token they describe: at column ``t`` they are computed from the model's next-token distribution at
column ``t - 1`` (``softmax(logits)``, temperature 1, no top-p), i.e. the distribution the token at ``t``
was chosen from before any sampling transform. They are 0.0 wherever ``generated_mask`` is False.

``activations[name]`` is ``(batch, pos, ...)`` for per-token hooks and ``(batch, head, pos, pos)``
(query, key) for ``attn.hook_pattern`` / ``attn.hook_attn_scores``; values at pad positions (pad query
rows for query-key hooks) are 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from knowlens.errors import KnowlensError
from knowlens.outputs import atomic_write
from knowlens.types import Float, Int, Tensor, TokenMask, Tokens, TokenScores

FORMAT = "knowlens.activation_record"
FORMAT_VERSION = 1
_ACT_PREFIX = "act."
_TENSOR_FIELDS = ("tokens", "prompt_mask", "generated_mask", "pad_mask", "logprobs", "entropy", "top1_prob")


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class ActivationRecord:
    """Token ids, masks, next-token statistics and captured activations of a batch of generations.

    Shapes: every field below is ``(batch, pos)`` with ``pos = prompt_len + generated columns``;
    ``activations`` maps hook name to ``(batch, pos, ...)`` or ``(batch, head, pos, pos)``.
    """

    tokens: Tokens
    prompt_mask: TokenMask
    generated_mask: TokenMask
    pad_mask: TokenMask
    logprobs: TokenScores
    entropy: TokenScores
    top1_prob: TokenScores
    activations: dict[str, Tensor]
    prompt_len: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)  # name, fingerprint, shape_fingerprint of the model

    @property
    def hook_names(self) -> tuple[str, ...]:
        return tuple(self.activations)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def real_range(self, row: int) -> tuple[int, int]:
        """``(start, stop)`` columns of row ``row``'s real tokens (prompt then generated)."""
        real = (~self.pad_mask[row]).nonzero().flatten()
        return int(real[0]), int(real[-1]) + 1

    def sequence(self, row: int) -> Int[Tensor, " seq"]:
        """Row ``row``'s unpadded token ids: its prompt followed by what was generated."""
        start, stop = self.real_range(row)
        return self.tokens[row, start:stop]

    def activation(self, name: str, row: int) -> Float[Tensor, "..."]:
        """Row ``row``'s unpadded activations for hook ``name``: ``(seq, ...)`` or ``(head, seq, seq)``.

        Equal (up to float error) to ``model.run_with_cache(record.sequence(row))[name][0]``.
        """
        from knowlens.capture.hooks import is_query_key_hook

        if name not in self.activations:
            raise KnowlensError(f"no activations for hook {name!r}; recorded: {', '.join(self.activations)}")
        start, stop = self.real_range(row)
        act = self.activations[name][row]
        if is_query_key_hook(name):
            return act[:, start:stop, start:stop]
        return act[start:stop]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file: tensors plus JSON metadata in the safetensors header. Never pickles."""
        path = Path(path)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSOR_FIELDS}
        for hook, act in self.activations.items():
            tensors[_ACT_PREFIX + hook] = act.contiguous()
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "hook_names": json.dumps(list(self.activations)),
            "prompt_len": str(self.prompt_len),
            "pad_token_id": str(self.pad_token_id),
            "eos_token_ids": json.dumps(list(self.eos_token_ids)),
            "meta": json.dumps(self.meta),
            "model": json.dumps(self.model),
        }
        if path.is_dir():
            raise KnowlensError(f"{path} is a folder; give the record a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        host = {k: v.detach().cpu() for k, v in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(host, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ActivationRecord:
        """Read a file written by `save`; a missing, truncated or foreign file raises KnowlensError."""
        path = Path(path)
        if not path.is_file():
            raise KnowlensError(f"activation record {path} does not exist")
        try:
            tensors = load_file(str(path), device=str(device))
            meta = _read_metadata(path)
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a knowlens activation record (format={meta.get('format')!r})")
            if int(meta["format_version"]) > FORMAT_VERSION:
                raise ValueError(f"format version {meta['format_version']} is newer than this knowlens")
            hooks = json.loads(meta["hook_names"])
            fields = {name: tensors[name] for name in _TENSOR_FIELDS}
            activations = {hook: tensors[_ACT_PREFIX + hook] for hook in hooks}
            return cls(
                **fields,
                activations=activations,
                prompt_len=int(meta["prompt_len"]),
                pad_token_id=int(meta["pad_token_id"]),
                eos_token_ids=tuple(int(t) for t in json.loads(meta["eos_token_ids"])),
                meta={str(k): str(v) for k, v in json.loads(meta["meta"]).items()},
                model={str(k): str(v) for k, v in json.loads(meta.get("model", "{}")).items()},
            )
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise KnowlensError(f"cannot read activation record {path}: {reason}") from None


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def concat_records(records: list[ActivationRecord]) -> ActivationRecord:
    """Stack records along the batch axis, re-padding each to a common layout.

    Every row keeps its prompt flush against the common ``prompt_len`` (the longest of the records) and
    is right-padded to the longest generation, so the result reads exactly like one `generate` call's
    record (same masks, same statistics, the same activations at each row's real tokens).
    """
    from knowlens.capture.hooks import is_query_key_hook

    if not records:
        raise KnowlensError("no activation records to concatenate")
    first = records[0]
    for rec in records[1:]:
        if rec.hook_names != first.hook_names or rec.pad_token_id != first.pad_token_id:
            raise KnowlensError("activation records differ in hooks or pad token; cannot concatenate them")
        if rec.model.get("fingerprint") != first.model.get("fingerprint"):
            raise KnowlensError(
                f"activation records come from different models (fingerprints {first.model.get('fingerprint')} "
                f"and {rec.model.get('fingerprint')}); cannot concatenate them"
            )
    if len(records) == 1:
        return first
    P = max(r.prompt_len for r in records)
    G = max(r.tokens.shape[1] - r.prompt_len for r in records)
    T = P + G
    parts: dict[str, list[Tensor]] = {name: [] for name in _TENSOR_FIELDS}
    acts: dict[str, list[Tensor]] = {name: [] for name in first.hook_names}
    for rec in records:
        off = P - rec.prompt_len
        width = rec.tokens.shape[1]
        for name in _TENSOR_FIELDS:
            x = getattr(rec, name)
            fill = rec.pad_token_id if name == "tokens" else (name == "pad_mask")
            out = torch.full((x.shape[0], T), fill, dtype=x.dtype, device=x.device)
            out[:, off : off + width] = x
            parts[name].append(out)
        pad = parts["pad_mask"][-1]
        for hook, x in rec.activations.items():
            if is_query_key_hook(hook):
                fill = float("-inf") if hook.endswith("hook_attn_scores") else 0.0
                out = torch.full((*x.shape[:2], T, T), fill, dtype=x.dtype, device=x.device)
                out[:, :, off : off + width, off : off + width] = x
                out.masked_fill_(pad.to(out.device)[:, None, :, None], 0)
            else:
                out = torch.zeros((x.shape[0], T, *x.shape[2:]), dtype=x.dtype, device=x.device)
                out[:, off : off + width] = x
            acts[hook].append(out)
    return ActivationRecord(
        **{name: torch.cat(xs) for name, xs in parts.items()},
        activations={hook: torch.cat(xs) for hook, xs in acts.items()},
        prompt_len=P,
        pad_token_id=first.pad_token_id,
        eos_token_ids=first.eos_token_ids,
        meta=dict(first.meta),
        model=dict(first.model),
    )
