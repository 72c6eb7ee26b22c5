"""`load_model("organism" | TransformerLens name | organism folder) -> (HookedTransformer, ModelCard)`."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowlens.errors import ModelLoadError

HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class ModelCard:
    """What a downstream file (probe, SAE, activations) must agree with to be used on this model."""

    name: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_ctx: int
    hook_names: tuple[str, ...]
    fingerprint: str  # sha256 over the parameter names and shapes: same architecture, same fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "fingerprint": self.fingerprint,
            "hook_names": list(self.hook_names),
        }


def model_card(model: Any, name: str) -> ModelCard:
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return ModelCard(
        name=name,
        n_layers=model.cfg.n_layers,
        d_model=model.cfg.d_model,
        d_vocab=model.cfg.d_vocab,
        n_ctx=model.cfg.n_ctx,
        hook_names=tuple(model.hook_dict),
        fingerprint=hashlib.sha256(shapes.encode()).hexdigest()[:16],
    )


def load_model(name: str = "organism", *, device: str = "cpu", probe_timeout: float = 3.0) -> tuple[Any, ModelCard]:
    """Load a model for knowlens.

    - ``"organism"``: the built-in model organism shipped with knowlens (CPU, seconds).
    - a folder written by ``knowlens organism train``: that organism.
    - any TransformerLens name (``gpt2-small``, ``pythia-70m``, ...): through ``HookedTransformer.from_pretrained``.
      Without the weights in the local Hugging Face cache and no reachable hub (or HF_HUB_OFFLINE=1) this
      fails within ``probe_timeout`` seconds with a `ModelLoadError`, instead of retrying for ~20 s.
    """
    if name == "organism" or Path(name).is_dir():
        from knowlens.organism.store import load_organism, organism_path

        org = load_organism(organism_path(name), device=device)
        return org.model, model_card(org.model, name)
    return _load_transformer_lens(name, device=device, probe_timeout=probe_timeout)


def _load_transformer_lens(name: str, *, device: str, probe_timeout: float) -> tuple[Any, ModelCard]:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else f"{HUB_HOST} is unreachable"
    reachable = not offline and _hub_reachable(probe_timeout)
    if not reachable and not _maybe_cached(name):  # fail before the slow TransformerLens import
        raise ModelLoadError(f"could not fetch the weights of {name!r}: {why} and they are not in the local Hugging Face cache")

    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"unknown model {name!r}: give 'organism', an organism folder or a TransformerLens model name"
        ) from None
    if not reachable and not _in_local_cache(official):
        raise ModelLoadError(
            f"could not fetch the weights of {name!r} ({official}): {why} and they are not in the local Hugging Face cache"
        )
    try:
        model = HookedTransformer.from_pretrained(name, device=device)
    except OSError as err:
        raise ModelLoadError(f"could not fetch the weights of {name!r} ({official}): {err}") from None
    model.eval()
    return model, model_card(model, name)


def _maybe_cached(name: str) -> bool:
    """Whether the Hugging Face cache holds any model whose repo name could be `name`'s (cheap, no TL import)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    cache = Path(HF_HUB_CACHE)
    if not cache.is_dir():
        return False
    want = name.lower().split("/")[-1]
    for d in cache.glob("models--*"):
        repo = d.name.split("--")[-1].lower()
        if repo and (repo in want or want in repo):
            return True
    return False


def _in_local_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float) -> bool:
    """A TCP connection to the hub within `timeout` seconds (DNS included, run in a daemon thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])
