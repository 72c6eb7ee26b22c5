"""Model fingerprints: which weights, and which architecture, an artifact was made with.

* ``weights_fingerprint``: SHA-256 (first 16 hex digits) over every state-dict entry in sorted name order:
  its name, dtype and shape, and a fixed sample of its values (every element when it has at most
  ``SAMPLE`` elements, else ``SAMPLE`` elements at evenly spaced flat indices), as little-endian float64
  (integer and bool tensors as int64). Only the sample leaves the device, so it costs milliseconds even
  for a model of billions of parameters. Two models of one shape trained differently differ.
* ``shape_fingerprint``: SHA-256 (16 hex digits) over the names and shapes only: same architecture, same value.

Every artifact knowlens writes stores both; a resume or a load with a model whose ``fingerprint`` differs
is refused with a message naming both values.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

SAMPLE = 4096
_CACHE: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_SHAPES: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _version_key(model: Any) -> tuple | None:
    """Every parameter's and buffer's name, storage and in-place version counter (cheaper than a state dict), or
    None where a tensor has no version counter (inference tensors) or the model is not a torch module."""
    try:
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return tuple((k, v.data_ptr(), v._version) for k, v in tensors)
    except (AttributeError, RuntimeError):
        return None


def weights_fingerprint(model: Any) -> str:
    """16 hex digits identifying ``model``'s weights (and buffers), from a fixed sample of every tensor.

    Cached per model until a tensor is replaced or changed in place (torch's version counters).
    """
    key = _version_key(model)
    cached = _CACHE.get(model) if key is not None else None
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = _hash_state(model.state_dict())
    if key is not None:
        _CACHE[model] = (key, digest)
    return digest


def _hash_state(state: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        if n > SAMPLE:
            idx = torch.linspace(0, n - 1, SAMPLE, dtype=torch.float64).round().to(torch.long)
            flat = flat[idx.to(flat.device)]
        wide = torch.float64 if (flat.is_floating_point() or flat.is_complex()) else torch.int64
        if flat.is_complex():
            flat = torch.view_as_real(flat)
        h.update(flat.to("cpu", wide).contiguous().numpy().astype("<f8" if wide == torch.float64 else "<i8").tobytes())
    return h.hexdigest()[:16]


def shape_fingerprint(model: Any) -> str:
    """16 hex digits over the state dict's names and shapes: equal for every model of one architecture."""
    key = _version_key(model)
    cached = _SHAPES.get(model) if key is not None else None
    if cached is not None and cached[0] == key:
        return cached[1]
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    digest = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    if key is not None:
        _SHAPES[model] = (key, digest)
    return digest


def model_identity(model: Any, name: str | None = None) -> dict[str, str]:
    """``{"name", "fingerprint", "shape_fingerprint"}``: what an artifact stores about the model that made it."""
    return {
        "name": name if name is not None else str(getattr(getattr(model, "cfg", None), "model_name", "") or ""),
        "fingerprint": weights_fingerprint(model),
        "shape_fingerprint": shape_fingerprint(model),
    }


def check_same_model(
    expected: dict[str, Any], actual: dict[str, Any], *, what: str, error: type[Exception] = ValueError
) -> None:
    """Raise ``error`` naming both sides when ``actual``'s weight fingerprint differs from ``expected``'s.

    Both dicts carry ``fingerprint`` (and ideally ``name``); ``what`` names the artifact in the message.
    """
    want, have = expected.get("fingerprint"), actual.get("fingerprint")
    if want is None:
        raise error(f"{what} has no weight fingerprint (written by an older knowlens); make it again")
    if want != have:
        raise error(
            f"{what} was made with model {expected.get('name', '?')!r} (fingerprint {want}), "
            f"not with this model {actual.get('name', '?')!r} (fingerprint {have})"
        )
