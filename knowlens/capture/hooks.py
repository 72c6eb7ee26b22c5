"""Hook-name validation and the layer a forward pass must reach to fire a set of hooks.

Two layouts of captured tensor exist:

* per-token hooks (``blocks.3.hook_resid_post``, ``blocks.1.attn.hook_z``, ``hook_embed`` ...): the hook sees
  ``(batch, pos, ...)``; capture stores ``(batch, pos, ...)``.
* query-key hooks (``attn.hook_pattern``, ``attn.hook_attn_scores``): the hook sees
  ``(batch, head, query_pos, key_pos)``; capture stores ``(batch, head, pos, pos)`` (query, key).
"""

from __future__ import annotations

import difflib
import functools
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


def check_hook_syntax(names: Iterable[str], *, n_layers: int | None = None) -> tuple[str, ...]:
    """Check hook names before any model is loaded: each must be a TransformerLens hook point name (and,
    when ``n_layers`` is known, name an existing block). Returns them deduplicated, in order.

    The loaded model's `validate_hook_names` still checks the exact set (config-dependent hooks).
    """
    if isinstance(names, str):
        names = [names]
    generic = _generic_hook_names()
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise HookNameError(f"hook names must be strings, got {name!r}")
        match = _BLOCK_RE.match(name)
        layer = int(match.group(1)) if match else None
        shape = _BLOCK_RE.sub("blocks.0.", name)
        if shape not in generic:
            close = difflib.get_close_matches(shape, sorted(generic), n=3, cutoff=0.5)
            if layer is not None:
                close = [c.replace("blocks.0.", f"blocks.{layer}.", 1) for c in close]
            hint = f"; closest: {', '.join(close)}" if close else "; e.g. blocks.0.hook_resid_post"
            raise HookNameError(f"unknown hook name {name!r}{hint}")
        if layer is not None and n_layers is not None and layer >= n_layers:
            raise HookNameError(f"hook {name!r}: the model has {n_layers} blocks (blocks.0 .. blocks.{n_layers - 1})")
        if name not in out:
            out.append(name)
    return tuple(out)


@functools.cache
def _generic_hook_names() -> frozenset[str]:
    """Every hook name a one-block HookedTransformer can have, over the configs that add or rename hooks."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    variants = [
        {"positional_embedding_type": "standard", "normalization_type": "LN"},
        {"positional_embedding_type": "rotary", "normalization_type": "RMS", "gated_mlp": True, "act_fn": "silu"},
    ]
    names: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for extra in variants:
            cfg = {"n_layers": 1, "d_model": 8, "n_heads": 2, "d_head": 4, "d_mlp": 16, "n_ctx": 8, "d_vocab": 10,
                   "act_fn": "gelu", "use_attn_result": True, "use_split_qkv_input": True, "use_hook_mlp_in": True,
                   "device": "cpu", **extra}  # fmt: skip
            names |= set(HookedTransformer(HookedTransformerConfig(**cfg)).hook_dict)
    return frozenset(names | set(_EMBED_HOOKS))


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
