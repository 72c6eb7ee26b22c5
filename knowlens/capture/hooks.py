"""Hook-name validation and the layer a forward pass must reach to fire a set of hooks.

Two layouts of captured tensor exist:

* per-token hooks (``blocks.3.hook_resid_post``, ``blocks.1.attn.hook_z``, ``hook_embed`` ...): the hook sees
  ``(batch, pos, ...)``; capture stores ``(batch, pos, ...)``.
* query-key hooks (``attn.hook_pattern``, ``attn.hook_attn_scores``): the hook sees
  ``(batch, head, query_pos, key_pos)``; capture stores ``(batch, head, pos, pos)`` (query, key).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from knowlens.errors import HookNameError

QUERY_KEY_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


def is_query_key_hook(name: str) -> bool:
    """True for hooks whose tensor is ``(batch, head, query_pos, key_pos)`` rather than per-token."""
    return name.endswith(QUERY_KEY_SUFFIXES)


def validate_hook_names(model: Any, names: Iterable[str]) -> tuple[str, ...]:
    """Check every name against ``model.hook_dict`` (and the model config); return them deduplicated, in order.

    Raises HookNameError naming the bad hook and the closest valid names, or why an existing hook
    point cannot be used (e.g. ``attn.hook_result`` needs ``cfg.use_attn_result``).
    """
    if isinstance(names, str):
        names = [names]
    hook_dict = model.hook_dict
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise HookNameError(f"hook names must be strings, got {name!r}")
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else f"; e.g. {next(iter(hook_dict), '?')}"
            raise HookNameError(f"unknown hook name {name!r}{hint}")
        check = getattr(model, "check_hooks_to_add", None)
        if check is not None:
            try:
                check(hook_dict[name], name, _noop_hook)
            except AssertionError as err:
                raise HookNameError(f"hook {name!r} is disabled in this model's config: {err}") from None
        if name not in out:
            out.append(name)
    return tuple(out)


def stop_layer_for(model: Any, names: Iterable[str]) -> int | None:
    """The ``stop_at_layer`` value that still fires every hook in ``names``; None = the full forward.

    ``forward(stop_at_layer=k)`` runs the embedding and blocks ``0..k-1`` then returns the residual,
    so a hook in ``blocks.i`` needs ``k >= i + 1`` and an embedding hook needs ``k >= 0``. Hooks after
    the blocks (``ln_final.*``, ``unembed.*``) need the full forward.
    """
    needed = 0
    for name in names:
        match = _BLOCK_RE.match(name)
        if match is not None:
            needed = max(needed, int(match.group(1)) + 1)
        elif name not in _EMBED_HOOKS:
            return None
    return needed


def _noop_hook(act: Any, hook: Any) -> None:
    return None
