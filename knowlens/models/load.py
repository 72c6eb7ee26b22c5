"""`load_model("organism" | TransformerLens name | organism folder) -> (HookedTransformer, ModelCard)`."""

from __future__ import annotations

import difflib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowlens.errors import ModelLoadError
from knowlens.fingerprint import shape_fingerprint, weights_fingerprint
from knowlens.models.devices import check_device

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
    fingerprint: str  # the weights: a hash over a fixed sample of every tensor (knowlens.fingerprint)
    shape_fingerprint: str  # the architecture: a hash over parameter names and shapes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "fingerprint": self.fingerprint,
            "shape_fingerprint": self.shape_fingerprint,
            "hook_names": list(self.hook_names),
        }

    def identity(self) -> dict[str, str]:
        """What every artifact stores to say which model made it: name and both fingerprints."""
        return {"name": self.name, "fingerprint": self.fingerprint, "shape_fingerprint": self.shape_fingerprint}


def model_card(model: Any, name: str) -> ModelCard:
    return ModelCard(
        name=name,
        n_layers=model.cfg.n_layers,
        d_model=model.cfg.d_model,
        d_vocab=model.cfg.d_vocab,
        n_ctx=model.cfg.n_ctx,
        hook_names=tuple(model.hook_dict),
        fingerprint=weights_fingerprint(model),
        shape_fingerprint=shape_fingerprint(model),
    )


def load_model(name: str = "organism", *, device: str = "cpu", probe_timeout: float = 3.0) -> tuple[Any, ModelCard]:
    """Load a model for knowlens.

    - ``"organism"``: the built-in model organism shipped with knowlens (CPU, seconds).
    - a folder written by ``knowlens organism train``: that organism.
    - any TransformerLens name (``gpt2-small``, ``pythia-70m``, ...): through ``HookedTransformer.from_pretrained``.
      Without the weights in the local Hugging Face cache and no reachable hub (or HF_HUB_OFFLINE=1) this
      fails within ``probe_timeout`` seconds with a `ModelLoadError`, instead of retrying for ~20 s.
    """
    check_device(device)
    if name == "organism" or Path(name).is_dir():
        from knowlens.organism.store import load_organism, organism_path

        org = load_organism(organism_path(name), device=device)
        org.model.cfg.model_name = name  # what records and indexes name it by
        return org.model, model_card(org.model, name)
    if Path(name).exists():
        raise ModelLoadError(f"{name}: a file, not 'organism', an organism folder or a TransformerLens model name")
    if os.sep in name and not _looks_like_repo_id(name):
        raise ModelLoadError(f"{name}: no such organism folder")
    official = _official_name(name)
    return _load_transformer_lens(name, official, device=device, probe_timeout=probe_timeout)


def n_layers_hint(name: str) -> int | None:
    """The number of blocks of model ``name`` if known without loading it (organisms: their config.json)."""
    if name != "organism" and not Path(name).is_dir():
        return None
    import json

    from knowlens.organism.store import organism_path

    try:
        return int(json.loads((organism_path(name) / "config.json").read_text())["config"]["n_layers"])
    except (OSError, ValueError, KeyError, TypeError, ModelLoadError):
        return None  # load_model will say what is wrong


def _looks_like_repo_id(name: str) -> bool:
    """``owner/model`` as on the Hugging Face Hub (TransformerLens accepts those for its official models)."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith("/")


def _official_name(name: str) -> str:
    """TransformerLens's official name for ``name``, or a ModelLoadError suggesting the closest names."""
    from transformer_lens import loading_from_pretrained as lfp

    try:
        return lfp.get_official_model_name(name)
    except ValueError:
        pass
    official: list[str] = list(getattr(lfp, "OFFICIAL_MODEL_NAMES", []))
    aliases = [a for names in getattr(lfp, "MODEL_ALIASES", {}).values() for a in names]
    candidates = {n.lower(): n for n in [*official, *aliases]}
    close = difflib.get_close_matches(name.lower(), list(candidates), n=3, cutoff=0.6)
    hint = f"; closest TransformerLens names: {', '.join(candidates[c] for c in close)}" if close else ""
    raise ModelLoadError(
        f"unknown model {name!r}: not 'organism', an organism folder or a TransformerLens model name{hint}"
    )


def _load_transformer_lens(name: str, official: str, *, device: str, probe_timeout: float) -> tuple[Any, ModelCard]:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else f"{HUB_HOST} is unreachable"
    reachable = not offline and hub_reachable(probe_timeout)
    from transformer_lens import HookedTransformer

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


def _in_local_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_reachable(timeout: float) -> bool:
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
