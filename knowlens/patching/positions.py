"""Absolute token positions for interventions on every pass of KV-cached generation (definitions: the module
docstring of `knowlens.patching.interventions`): which columns a ``positions=`` argument selects, and the
column offset of each pass, read from a companion hook on ``hook_attn_scores``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from knowlens.errors import KnowlensError
from knowlens.types import Tensor

HookFn = Callable[[Tensor, Any], Any]  # (activation, hook=HookPoint) -> new activation or None (unchanged)
Positions = Literal["all", "last"] | int | Sequence[int] | slice | Tensor

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PRE_ATTENTION = frozenset(
    {"hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "hook_attn_in", "hook_q_input", "hook_k_input",
     "hook_v_input", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q"}
)  # fmt: skip
_EMBED_HOOKS = frozenset({"hook_embed", "hook_pos_embed", "hook_tokens"})



@dataclass(frozen=True, eq=False)
class Where:
    """A parsed ``positions`` argument; `select` gives the selected columns of one pass."""

    kind: Literal["all", "last", "cols", "slice", "mask"]
    cols: Tensor | None = None
    slc: tuple[int, int | None, int] | None = None
    mask: Tensor | None = None

    @property
    def absolute(self) -> bool:
        return self.kind in ("cols", "slice", "mask")

    def select(self, x: Tensor, offset: int | None) -> Tensor | None:
        """``(batch or 1, n)`` bool of the selected columns of ``x``; None means every column."""
        batch, n = x.shape[0], x.shape[1]
        if self.kind == "all":
            return None
        if self.kind == "last":
            sel = torch.zeros((1, n), dtype=torch.bool, device=x.device)
            sel[:, -1] = True
            return sel
        assert offset is not None
        cols = torch.arange(offset, offset + n, device=x.device)
        if self.kind == "cols":
            assert self.cols is not None
            return torch.isin(cols, self.cols.to(x.device))[None]
        if self.kind == "slice":
            assert self.slc is not None
            start, stop, step = self.slc
            sel = (cols >= start) & ((cols - start) % step == 0)
            if stop is not None:
                sel &= cols < stop
            return sel[None]
        assert self.mask is not None
        mask = self.mask.to(x.device)
        if mask.shape[0] not in (1, batch):
            raise KnowlensError(f"positions mask has batch {mask.shape[0]}, the activation {batch}")
        out = torch.zeros((mask.shape[0], n), dtype=torch.bool, device=x.device)
        stop = min(offset + n, mask.shape[1])
        if stop > offset:
            out[:, : stop - offset] = mask[:, offset:stop]
        return out


def parse_positions(positions: Positions) -> Where:
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise KnowlensError(
                f"positions must be 'all', 'last', ints, a slice or a mask, got {positions!r}"
            )
        return Where(positions)  # type: ignore[arg-type]
    if isinstance(positions, slice):
        start, stop, step = positions.start, positions.stop, positions.step
        for name, v in (("start", start), ("stop", stop)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise KnowlensError(f"positions slice {name} must be an int >= 0 or None, got {v!r}")
        if step is not None and (not isinstance(step, int) or step < 1):
            raise KnowlensError(f"positions slice step must be an int >= 1, got {step!r}")
        return Where("slice", slc=(start or 0, stop, step or 1))
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.ndim not in (1, 2):
            raise KnowlensError(
                f"a positions mask must be (pos,) or (batch, pos), got shape {tuple(positions.shape)}"
            )
        return Where("mask", mask=positions.detach().reshape(-1, positions.shape[-1]).cpu())
    cols = int_tensor(positions)
    if cols is None:
        raise KnowlensError(
            f"positions must be 'all', 'last', integer columns, a slice or a bool mask, got {positions!r}"
        )
    if cols.numel() and int(cols.min()) < 0:
        raise KnowlensError(
            f"positions must be absolute columns >= 0, got {cols.tolist()} (use 'last' for the newest token)"
        )
    return Where("cols", cols=cols)


def describe_positions(positions: Positions) -> Any:
    if isinstance(positions, str | int):
        return positions
    if isinstance(positions, slice):
        return f"slice({positions.start}, {positions.stop}, {positions.step})"
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return f"mask{tuple(positions.shape)}"
    cols = int_tensor(positions)
    return cols.tolist() if cols is not None else repr(positions)


class PassClock:
    """Where the columns a hook sees start (``offset``), read from an attention layer's score shape."""

    def __init__(self, hook_name: str) -> None:
        self.hook_name = hook_name
        match = _BLOCK_RE.match(hook_name)
        if match is not None:
            layer, rest = int(match.group(1)), match.group(2)
            source = layer - 1 if rest in _PRE_ATTENTION else layer
        elif hook_name in _EMBED_HOOKS:
            source = -1
        else:
            raise KnowlensError(
                f"absolute positions at {hook_name!r}: only blocks.* and embedding hooks can locate their "
                "columns during cached generation; use positions='all' or 'last', or a blocks.* hook"
            )
        self.early = source < 0
        self.source = f"blocks.{max(source, 0)}.attn.hook_attn_scores"
        self.reset()

    def reset(self) -> None:
        self._pending: tuple[int, int] | None = None  # (offset, n) seen by the source this pass
        self._next: int | None = None  # early: key length after the previous pass
        self._assumed: int | None = None  # early: the offset used this pass, checked by block 0

    def fwd_hooks(self) -> tuple[tuple[str, HookFn], ...]:
        return ((self.source, self._record),)

    def _record(self, scores: Tensor, hook: Any) -> None:
        n, keys = int(scores.shape[-2]), int(scores.shape[-1])
        if self.early:
            assumed, self._assumed = self._assumed, None
            self._next = keys
            if assumed is not None and assumed != keys - n:
                raise KnowlensError(
                    f"intervention at {self.hook_name} assumed its pass starts at column {assumed}, but it "
                    f"starts at {keys - n}; a hook before block 0's attention cannot tell a 1-token pass that "
                    "continues a KV cache from a new sequence: intervene at blocks.0.hook_resid_mid or later"
                )
        else:
            self._pending = (keys - n, n)

    def offset(self, n: int) -> int:
        if self.early:
            guess = self._next if n == 1 and self._next is not None else 0
            self._assumed = guess
            return guess
        pending, self._pending = self._pending, None
        if pending is None or pending[1] != n:
            raise KnowlensError(
                f"intervention at {self.hook_name}: cannot tell which columns this pass holds ({self.source} "
                "did not run before it in this pass, e.g. start_at_layer skipped it)"
            )
        return pending[0]


def int_tensor(values: Any) -> Tensor | None:
    """``values`` (an int, ints, or an integer tensor) as a 1-D int64 CPU tensor; None if it is not that."""
    if isinstance(values, Tensor):
        t = values.detach().cpu()
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.ndim > 1:
            return None
        return t.reshape(-1).long()
    items = [values] if isinstance(values, int) else list(values) if isinstance(values, Sequence) else None
    if items is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return None
    return torch.tensor(items, dtype=torch.long)
