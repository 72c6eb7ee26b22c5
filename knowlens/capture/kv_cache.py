"""A preallocated key-value cache with the interface of TransformerLens's ``TransformerLensKeyValueCache``.

TransformerLens's cache grows by ``torch.cat`` at every step (copying every cached key and value, and
the attention mask, once per token per layer). This one writes each step into buffers of the final
length and hands the attention layers views of the filled part, so a step costs what its own token
costs. The attention code only uses ``entry.past_keys`` (for its length) and ``entry.append(k, v)``;
the model uses ``cache[0].past_keys.shape``, ``cache.append_attention_mask(mask)`` and ``cache[i]``.
"""

from __future__ import annotations

from typing import Any

import torch

from knowlens.types import Float, Int, Tensor


class StaticKVCacheEntry:
    """Keys and values of one layer: ``(batch, total_len, n_kv_heads, d_head)`` buffers, filled from the left."""

    frozen = False

    def __init__(self, *, batch: int, total_len: int, n_heads: int, d_head: int, dtype: torch.dtype) -> None:
        self.total_len = total_len
        self.length = 0
        self._empty = torch.empty((batch, 0, n_heads, d_head), dtype=dtype)
        self._keys: Tensor | None = None
        self._values: Tensor | None = None

    @property
    def past_keys(self) -> Float[Tensor, "batch pos_so_far n_heads d_head"]:
        return self._empty if self._keys is None else self._keys[:, : self.length]

    @property
    def past_values(self) -> Float[Tensor, "batch pos_so_far n_heads d_head"]:
        return self._empty if self._values is None else self._values[:, : self.length]

    def append(self, new_keys: Tensor, new_values: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``(batch, new, n_heads, d_head)`` keys/values after the cached ones; return all of them."""
        if self._keys is None or self._values is None:
            shape = (new_keys.shape[0], self.total_len, *new_keys.shape[2:])
            self._keys = torch.empty(shape, dtype=new_keys.dtype, device=new_keys.device)
            self._values = torch.empty(shape, dtype=new_values.dtype, device=new_values.device)
        stop = self.length + new_keys.shape[1]
        if stop > self.total_len:
            raise RuntimeError(f"key-value cache overflow: {stop} > {self.total_len} positions")
        self._keys[:, self.length : stop] = new_keys
        self._values[:, self.length : stop] = new_values
        self.length = stop
        return self._keys[:, :stop], self._values[:, :stop]


class StaticKVCache:
    """All layers' entries plus the attention mask of every position seen so far, ``(batch, total_len)``."""

    frozen = False

    def __init__(self, cfg: Any, *, batch: int, total_len: int, device: torch.device) -> None:
        n_heads = (
            cfg.n_key_value_heads if getattr(cfg, "n_key_value_heads", None) is not None else cfg.n_heads
        )
        self.entries = [
            StaticKVCacheEntry(
                batch=batch, total_len=total_len, n_heads=n_heads, d_head=cfg.d_head, dtype=cfg.dtype
            )
            for _ in range(cfg.n_layers)
        ]
        self._mask = torch.zeros((batch, total_len), dtype=torch.long, device=device)
        self._mask_len = 0

    @property
    def previous_attention_mask(self) -> Int[Tensor, "batch pos_so_far"]:
        return self._mask[:, : self._mask_len]

    def append_attention_mask(self, attention_mask: Tensor) -> Tensor:
        """Record the mask of the new positions; return the mask of all positions so far."""
        stop = self._mask_len + attention_mask.shape[1]
        self._mask[:, self._mask_len : stop] = attention_mask.to(self._mask.device)
        self._mask_len = stop
        return self._mask[:, :stop]

    def __getitem__(self, idx: int) -> StaticKVCacheEntry:
        return self.entries[idx]
