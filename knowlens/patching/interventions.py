"""Interventions: hook-function factories for ``model.hooks(fwd_hooks=...)``, correct on every generation step.

Each factory returns an `Intervention`: an iterable of ``(hook_name, fn)`` pairs (``fwd_hooks=[*steer(...)]``)
with its parameters spelled out in ``params``. Add them only through ``model.hooks(...)`` or `intervene`
(which also checks the hook names), so nothing is left on the model when a run raises.

Definitions. ``x`` is the activation a hook sees, ``(batch, n, ...)``: ``n`` columns of the token tensor the
model runs on, starting at column ``offset``. A full forward has ``offset = 0``; KV-cached generation (knowlens's
`knowlens.capture.generate`, TransformerLens's ``generate(use_past_kv_cache=True)``) runs the prompt once
(``offset = 0, n = prompt_len``) and then one pass per new token (``n = 1``, ``offset`` = the cache's length),
and every intervention acts on each of those passes, so a generated token is changed exactly as it would be
in a full forward over the whole sequence with the intervention applied at every position.

* **Positions** (``positions=``), in absolute columns of the (left-padded) token tensor, i.e. the columns of
  ``ActivationRecord.tokens`` or of ``model.generate``'s output:

  - ``"all"`` (default): every column of every pass (each prompt token once, then each new token);
  - ``"last"``: the last column of each pass (in a full forward the final token; in cached generation the
    last prompt token and then every new token, "the newest token");
  - an ``int``, a sequence of ints or a 1-D integer tensor: those columns; a ``slice`` (``slice(5, None)``:
    column 5 onwards, also on later generation steps); a boolean mask ``(pos,)`` or ``(batch, pos)``
    (columns past its end are not selected). Negative indices are refused: "from the end" moves as
    generation proceeds (use ``"last"``).

  Absolute positions need ``offset``, which a hook's input does not carry. The intervention adds a companion
  hook on ``blocks.{c}.attn.hook_attn_scores``, whose tensor is ``(batch, head, n, offset + n)``, for the
  last layer ``c`` whose attention runs before the intervention's hook (``c = L - 1`` for
  ``blocks.L.hook_resid_pre`` and the other hooks before block L's attention, ``c = L`` for ``hook_z``,
  ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post`` ...). Hooks before any attention
  (``hook_embed``, ``hook_pos_embed``, block 0 before its attention) take ``offset = 0`` for a pass of
  ``n > 1`` columns and, for a 1-column pass, the key length of the previous pass; block 0's attention then
  checks that guess and raises KnowlensError if it was wrong, so a wrong position is never used silently.
  ``patch_from_cache`` always needs ``offset`` (to read the source's columns), also with ``"all"``.

* `ablate_latents(sae, latents)`, at the SAE's hook (``sae.cfg.metadata.hook_name``):
  ``x -> x + decode(f') - decode(f)`` with ``f = encode(x)`` and ``f'`` = ``f`` with the chosen latents set to
  ``value`` (default 0) or multiplied by ``scale``. This equals ``decode(f') + (x - decode(f))``: the SAE's
  error term is kept, so the rest of the activation is untouched. When ``f' == f`` (no latents, ``scale=1``, a
  latent already at ``value``) the change is exactly zero and ``x`` is returned bit for bit (no latents or
  ``scale=1``: the SAE is not even run).
* `steer(hook, direction, alpha, unit=...)`: ``x_t -> x_t + alpha * ||x_t|| * d / ||d||`` (``unit="resid_norm"``,
  the default: ``alpha = 2`` adds twice the activation's own L2 norm at that position, computed per token on
  the fly from the unmodified ``x_t``, norms over all per-token dimensions), or ``x_t -> x_t + alpha * d``
  (``unit="raw"``). `latent_direction(sae, i)` is the SAE's decoder row ``W_dec[i]``.
* `project_out(hook, directions)`: ``x_t -> x_t - Q Q^T x_t`` with ``Q`` an orthonormal basis of the span of
  the given direction(s), so no component along them is left.
* `patch_from_cache(hook, source)`: ``x[:, t] -> source[:, offset + t]`` at the selected columns, ``source`` a
  TransformerLens ``ActivationCache`` (its entry for the hook) or a tensor ``(batch or 1, pos, ...)``;
  selecting a column the source does not have raises KnowlensError.

Arithmetic is in float32 (float64 for ``float64`` activations) and cast back to the activation's dtype.

TransformerLens quirks (3.9): ``HookedTransformer.generate`` embeds tokens with ``model.embed`` directly, so
``hook_embed`` never fires there (knowlens's loop fires it); it calls ``hook_pos_embed`` on the whole sequence
at every step. Intervene at ``blocks.0.hook_resid_pre`` or later to act on both loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from knowlens.capture.hooks import is_query_key_hook, validate_hook_names
from knowlens.errors import KnowlensError
from knowlens.patching.positions import (
    HookFn,
    PassClock,
    Positions,
    describe_positions,
    int_tensor,
    parse_positions,
)
from knowlens.types import Float, Tensor

Unit = Literal["resid_norm", "raw"]

@dataclass(frozen=True, eq=False)
class Intervention:
    """An edit of one hook point: iterate it for its ``(hook_name, fn)`` pairs (companion hooks first).

    ``params`` holds what the edit does in plain values (kind-specific: ``alpha`` and ``unit`` for steering,
    ``latents`` and ``value``/``scale`` for ablation, ``positions`` always), e.g. for a report.
    """

    kind: str
    hook_name: str
    fwd_hooks: tuple[tuple[str, HookFn], ...]
    params: dict[str, Any]
    _clock: PassClock | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[tuple[str, HookFn]]:
        return iter(self.fwd_hooks)

    def __len__(self) -> int:
        return len(self.fwd_hooks)

    def reset(self) -> None:
        """Forget what earlier passes left in the position tracker (`intervene` calls it on entry)."""
        if self._clock is not None:
            self._clock.reset()


@contextmanager
def intervene(model: Any, *interventions: Intervention | tuple[str, HookFn]) -> Iterator[None]:
    """``with intervene(model, a, b): ...`` runs the block with the interventions' hooks, checked against the
    model first (HookNameError names the closest hooks); they are removed whatever happens."""
    hooks: list[tuple[str, HookFn]] = []
    for item in interventions:
        if isinstance(item, Intervention):
            item.reset()
            hooks.extend(item.fwd_hooks)
        else:
            hooks.append(item)
    validate_hook_names(model, [name for name, _ in hooks])
    with model.hooks(fwd_hooks=hooks):
        yield


# ------------------------------------------------------------------------------------------- factories


def ablate_latents(
    sae: Any,
    latents: int | Sequence[int] | Tensor,
    *,
    value: float | Sequence[float] | None = None,
    scale: float | None = None,
    positions: Positions = "all",
) -> Intervention:
    """Set SAE latents to ``value`` (default 0, or one value per latent) or multiply them by ``scale``, keeping
    the SAE's error term: ``x -> x + decode(f') - decode(f)`` at ``sae.cfg.metadata.hook_name`` (module
    docstring). With nothing to change (no latents, ``scale=1``) the hook returns the activation unchanged."""
    hook_name = _sae_hook(sae)
    d_sae = int(sae.cfg.d_sae)
    idx = _latent_index(latents, d_sae)
    if value is not None and scale is not None:
        raise KnowlensError("ablate_latents: give value or scale, not both")
    params: dict[str, Any] = {"latents": idx.tolist(), "positions": describe_positions(positions)}
    if scale is not None:
        factor = float(scale)
        params["scale"] = factor
        fill = None
    else:
        fill = torch.as_tensor(0.0 if value is None else value, dtype=torch.float64)
        if fill.ndim > 1 or (fill.ndim == 1 and fill.numel() != idx.numel()):
            raise KnowlensError(
                f"ablate_latents: value must be a number or one per latent ({idx.numel()}), got shape {tuple(fill.shape)}"
            )
        params["value"] = fill.tolist()
        factor = 1.0
    unchanged = idx.numel() == 0 or (fill is None and factor == 1.0)

    def edit(x: Tensor, offset: int | None) -> Tensor | None:
        if unchanged:
            return None
        f = sae.encode(x)
        f_new = f.clone()
        i = idx.to(f.device)
        if fill is None:
            f_new[..., i] = f[..., i] * factor
        else:
            f_new[..., i] = fill.to(device=f.device, dtype=f.dtype)
        delta = sae.decode(f_new) - sae.decode(f)
        return x + delta.reshape(x.shape).to(x.dtype)

    return _build("ablate_latents", hook_name, edit, positions, params, needs_offset=False)


def latent_direction(sae: Any, latent: int) -> Float[Tensor, " d_in"]:
    """The SAE's decoder row for ``latent``, ``W_dec[latent]`` (a detached copy): the direction it writes."""
    d_sae = int(sae.W_dec.shape[0])
    if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < d_sae:
        raise KnowlensError(f"latent must be an integer in [0, {d_sae}), got {latent!r}")
    return sae.W_dec[latent].detach().clone()


def steer(
    hook_name: str,
    direction: Tensor,
    alpha: float,
    *,
    unit: Unit = "resid_norm",
    positions: Positions = "all",
) -> Intervention:
    """Add ``alpha`` along ``direction`` at ``hook_name``, in units of the activation's own norm.

    ``unit="resid_norm"``: ``x_t -> x_t + alpha * ||x_t||_2 * d / ||d||_2`` per selected position ``t`` (so
    ``alpha`` is a multiple of the residual norm there; published steering needed about 2).
    ``unit="raw"``: ``x_t -> x_t + alpha * d`` with ``d`` as given. ``direction`` has the per-token shape of
    the activation (or as many elements, e.g. a flat ``n_heads * d_head`` row for ``hook_z``).
    ``params`` records ``alpha``, ``unit`` and ``direction_norm``.
    """
    if unit not in ("resid_norm", "raw"):
        raise KnowlensError(f"steer: unit must be 'resid_norm' or 'raw', got {unit!r}")
    d = _as_direction(direction, "steer").flatten().double()
    norm = float(d.norm())
    if unit == "resid_norm":
        if norm == 0.0:
            raise KnowlensError(
                "steer: the direction is zero; unit='resid_norm' needs a direction to normalise"
            )
        d = d / norm
    coef = float(alpha)
    params = {"alpha": coef, "unit": unit, "direction_norm": norm, "positions": describe_positions(positions)}

    def edit(x: Tensor, offset: int | None) -> Tensor:
        flat = x.flatten(2)
        _check_width(flat, d.numel(), hook_name, "steer")
        work = _work_dtype(x)
        add = d.to(device=x.device, dtype=work) * coef
        if unit == "resid_norm":
            add = flat.to(work).norm(dim=-1, keepdim=True) * add
        return (flat.to(work) + add).to(x.dtype).view_as(x)

    return _build("steer", hook_name, edit, positions, params, needs_offset=False)


def project_out(hook_name: str, direction: Tensor, *, positions: Positions = "all") -> Intervention:
    """Remove the component along ``direction`` (``(d,)``) or the span of several (``(k, d)``):
    ``x_t -> x_t - Q Q^T x_t``, ``Q`` an orthonormal basis of the span (from an SVD; zero rows add nothing)."""
    rows = _as_direction(direction, "project_out").double()
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows.reshape(rows.shape[0], -1)
    u, s, _ = torch.linalg.svd(rows.T, full_matrices=False)
    if s.numel() == 0 or float(s.max()) == 0.0:
        raise KnowlensError("project_out: the direction is zero")
    basis = u[:, s > float(s.max()) * 1e-10]  # (d, rank)
    params = {"rank": int(basis.shape[1]), "positions": describe_positions(positions)}

    def edit(x: Tensor, offset: int | None) -> Tensor:
        flat = x.flatten(2)
        _check_width(flat, basis.shape[0], hook_name, "project_out")
        work = _work_dtype(x)
        q = basis.to(device=x.device, dtype=work)
        v = flat.to(work)
        return (v - (v @ q) @ q.T).to(x.dtype).view_as(x)

    return _build("project_out", hook_name, edit, positions, params, needs_offset=False)


def patch_from_cache(hook_name: str, source: Any, *, positions: Positions = "all") -> Intervention:
    """Replace the activation at the selected columns with the source run's: ``x[:, t] -> src[:, offset + t]``.

    ``source`` is a TransformerLens ``ActivationCache`` (its ``hook_name`` entry is used) or a tensor
    ``(batch, pos, ...)`` with batch equal to the patched run's or 1 (broadcast). A selected column past the
    source's last raises KnowlensError (e.g. ``positions="all"`` on generation steps beyond a prompt cache:
    pass ``positions=slice(0, prompt_len)``).
    """
    if isinstance(source, Tensor):
        src = source.detach()
    elif hasattr(source, "cache_dict"):
        if hook_name not in source.cache_dict:
            raise KnowlensError(f"patch_from_cache: the cache has no activation for {hook_name!r}")
        src = source.cache_dict[hook_name].detach()
    else:
        raise KnowlensError(
            f"patch_from_cache: source must be an ActivationCache or a tensor, got {type(source).__name__}"
        )
    if src.ndim < 3:
        raise KnowlensError(
            f"patch_from_cache: source must be (batch, pos, ...), got shape {tuple(src.shape)}"
        )
    length = int(src.shape[1])
    params = {"source_shape": list(src.shape), "positions": describe_positions(positions)}

    def edit(x: Tensor, offset: int | None) -> Tensor:
        assert offset is not None
        if x.shape[2:] != src.shape[2:] or src.shape[0] not in (1, x.shape[0]):
            raise KnowlensError(
                f"patch_from_cache at {hook_name}: source shape {tuple(src.shape)} does not fit activation "
                f"shape {tuple(x.shape)} (batch must match or be 1; per-token shape must match)"
            )
        n = x.shape[1]
        window = x.clone()
        stop = min(offset + n, length)
        if stop > offset:
            window[:, : stop - offset] = src[:, offset:stop].to(device=x.device, dtype=x.dtype)
        return window

    def check(sel: Tensor | None, n: int, offset: int) -> None:
        cols = torch.arange(offset, offset + n, device=sel.device if sel is not None else None)
        past = cols >= length
        hit = past.any() if sel is None else (sel & past).any()
        if bool(hit):
            raise KnowlensError(
                f"patch_from_cache at {hook_name}: column {int(cols[past][0])} is selected but the source has "
                f"only {length} columns (limit positions, e.g. positions=slice(0, {length}))"
            )

    return _build("patch_from_cache", hook_name, edit, positions, params, needs_offset=True, check=check)


# --------------------------------------------------------------------------------------------- helpers


def _build(
    kind: str,
    hook_name: str,
    edit: Callable[[Tensor, int | None], Tensor | None],
    positions: Positions,
    params: dict[str, Any],
    *,
    needs_offset: bool,
    check: Callable[[Tensor | None, int, int], None] | None = None,
) -> Intervention:
    """Wrap ``edit`` (the new activation at every column) into a hook that keeps the unselected columns."""
    if not isinstance(hook_name, str) or not hook_name:
        raise KnowlensError(f"{kind}: hook_name must be a hook point name, got {hook_name!r}")
    if is_query_key_hook(hook_name) or hook_name.endswith("attn.hook_rot_k"):
        raise KnowlensError(
            f"{kind}: {hook_name!r} is not a per-token activation (its columns are keys); use e.g. attn.hook_z"
        )
    where = parse_positions(positions)
    clock = PassClock(hook_name) if (where.absolute or needs_offset) else None

    def hook_fn(x: Tensor, hook: Any) -> Tensor | None:
        offset = clock.offset(int(x.shape[1])) if clock is not None else None
        sel = where.select(x, offset)
        if check is not None:
            assert offset is not None
            check(sel, int(x.shape[1]), offset)
        if sel is not None and not bool(sel.any()):
            return None
        new = edit(x, offset)
        if new is None or sel is None:
            return new
        shape = (*sel.shape, *([1] * (x.ndim - 2)))
        return torch.where(sel.reshape(shape), new, x)

    hooks = (*(clock.fwd_hooks() if clock is not None else ()), (hook_name, hook_fn))
    return Intervention(kind=kind, hook_name=hook_name, fwd_hooks=hooks, params=params, _clock=clock)


def _sae_hook(sae: Any) -> str:
    meta = sae.cfg.metadata
    hook = meta.get("hook_name") if hasattr(meta, "get") else getattr(meta, "hook_name", None)
    if not isinstance(hook, str) or not hook:
        raise KnowlensError("the SAE does not say which hook it reads (no cfg.metadata.hook_name)")
    head = meta.get("hook_head_index") if hasattr(meta, "get") else getattr(meta, "hook_head_index", None)
    if head is not None:
        raise KnowlensError(f"SAEs reading one attention head (hook_head_index={head}) are not supported")
    return hook


def _latent_index(latents: int | Sequence[int] | Tensor, d_sae: int) -> Tensor:
    idx = int_tensor(latents)
    if idx is None:
        raise KnowlensError(f"latents must be integer ids (0-D or 1-D), got {latents!r}")
    if idx.unique().numel() != idx.numel():
        raise KnowlensError(f"latents must not repeat, got {idx.tolist()}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_sae):
        raise KnowlensError(f"latents must be in [0, {d_sae}), got {idx.tolist()}")
    return idx


def _as_direction(direction: Tensor, kind: str) -> Tensor:
    if not isinstance(direction, Tensor) or not direction.is_floating_point():
        raise KnowlensError(f"{kind}: direction must be a float tensor, got {type(direction).__name__}")
    if not bool(torch.isfinite(direction).all()):
        raise KnowlensError(f"{kind}: the direction has NaN or infinite entries")
    return direction.detach().cpu()


def _check_width(flat: Tensor, width: int, hook_name: str, kind: str) -> None:
    if flat.shape[-1] != width:
        raise KnowlensError(
            f"{kind} at {hook_name}: the direction has {width} elements, the activation {flat.shape[-1]} per token"
        )


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
