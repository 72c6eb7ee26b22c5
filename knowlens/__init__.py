"""knowlens: per-token reliability labels from a language model's internal confidence signals.

The public surface only re-exports; importing knowlens does no work (torch loads when a function runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowlens.version import __version__

if TYPE_CHECKING:
    from knowlens.models import ModelCard, load_model

__all__ = ["__version__", "load_model", "ModelCard"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "ModelCard"):
        from knowlens import models

        return getattr(models, name)
    raise AttributeError(f"module 'knowlens' has no attribute {name!r}")
