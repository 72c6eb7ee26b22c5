"""Preallocated capture buffers and the hook functions that copy into them.

One buffer per hook, ``(batch, total_len, ...)`` (per-token hooks) or ``(batch, head, total_len,
total_len)`` (query-key hooks), allocated on the device of the first activation the hook sees (the
prompt pass) with its dtype. Each forward pass writes the columns ``[start, stop)`` of the current
window; nothing else is kept per step.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from knowlens.capture.hooks import is_query_key_hook
from knowlens.errors import HookNameError
from knowlens.types import Bool, Tensor


class CaptureBuffers:
    """Mutable recorder used inside one `generate` call (not part of the public API)."""

    def __init__(self, names: tuple[str, ...], *, batch: int, total_len: int) -> None:
        self.names = names
        self.batch = batch
        self.total_len = total_len
        self.buffers: dict[str, Tensor] = {}
        self.start = 0
        self.stop = 0

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """``(name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``."""
        return [(name, partial(self._record, name=name)) for name in self.names]

    def set_window(self, start: int, stop: int) -> None:
        """The columns the next forward pass computes."""
        self.start, self.stop = start, stop

    def _record(self, act: Tensor, hook: Any, *, name: str) -> None:
        buf = self.buffers.get(name)
        if buf is None:
            buf = self._allocate(name, act)
        if is_query_key_hook(name):
            buf[:, :, self.start : self.stop, : self.stop].copy_(act)
        else:
            buf[:, self.start : self.stop].copy_(act)

    def _allocate(self, name: str, act: Tensor) -> Tensor:
        # allocated outside inference mode so the record's tensors work with autograd later
        with torch.inference_mode(False):
            return self._allocate_normal(name, act)

    def _allocate_normal(self, name: str, act: Tensor) -> Tensor:
        width = self.stop - self.start
        if is_query_key_hook(name):
            if act.ndim != 4 or act.shape[0] != self.batch or act.shape[2:] != (width, self.stop):
                raise HookNameError(
                    f"hook {name!r} gave shape {tuple(act.shape)}, not (batch, head, query, key)"
                )
            shape = (self.batch, act.shape[1], self.total_len, self.total_len)
            # future keys hold what the model itself puts there: -inf scores, 0 pattern
            fill = float("-inf") if name.endswith("hook_attn_scores") else 0.0
            buf = torch.full(shape, fill, dtype=act.dtype, device=act.device)
        else:
            if act.ndim < 2 or act.shape[0] != self.batch or act.shape[1] != width:
                raise HookNameError(
                    f"hook {name!r} gave shape {tuple(act.shape)}, not per-token (batch={self.batch}, "
                    f"pos={width}, ...); it cannot be captured during generation"
                )
            buf = torch.zeros(
                (self.batch, self.total_len, *act.shape[2:]), dtype=act.dtype, device=act.device
            )
        self.buffers[name] = buf
        return buf

    def check_all_fired(self) -> None:
        missing = [name for name in self.names if name not in self.buffers]
        if missing:
            raise HookNameError(f"hook(s) {', '.join(missing)} did not fire in a forward pass of this model")

    def step_views(self, pos: int) -> dict[str, Tensor]:
        """Views of column ``pos``: ``(batch, ...)``, or ``(batch, head, key)`` for query-key hooks."""
        return {
            name: (buf[:, :, pos, : pos + 1] if is_query_key_hook(name) else buf[:, pos])
            for name, buf in self.buffers.items()
        }

    def finish(self, pad_mask: Bool[Tensor, "batch pos"]) -> dict[str, Tensor]:
        """Zero the pad positions and trim to ``pad_mask.shape[1]`` columns (copying only if trimmed)."""
        n_cols = int(pad_mask.shape[1])
        out: dict[str, Tensor] = {}
        for name in self.names:
            buf = self.buffers[name]
            if is_query_key_hook(name):
                if n_cols < self.total_len:
                    buf = buf[:, :, :n_cols, :n_cols].clone()
                mask = pad_mask.to(buf.device)[:, None, :, None]
            else:
                if n_cols < self.total_len:
                    buf = buf[:, :n_cols].clone()
                mask = pad_mask.to(buf.device).view(*pad_mask.shape, *([1] * (buf.ndim - 2)))
            out[name] = buf.masked_fill_(mask, 0)
        return out
