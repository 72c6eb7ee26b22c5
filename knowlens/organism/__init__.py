"""The built-in model organism: a synthetic world whose every fact is known, a model trained on it, a grader.

Public API (re-exports only; the modules load on first use):

* `load_organism(path=SHIPPED, *, device="cpu") -> Organism`: an organism folder (default: the shipped one);
  `organism_path(name)`: the folder of ``"organism"`` (the shipped one) or of a folder a user names
* `Organism`: ``.model`` (a ``HookedTransformer``), ``.tokenizer``, ``.spec``, ``.world`` (entities, splits,
  facts), ``.corpus`` (training documents, ``held_out`` questions), ``.info``
* `grade_answer(world, tokens, *, entity=None) -> Grade`: every generated token ``correct``, ``hallucinated``,
  ``refusal`` or ``other`` (``.classes``, ``.claims``, ``.verdict``; `knowlens.organism.grader`)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from knowlens.organism.grader import Grade, grade_answer
    from knowlens.organism.store import Organism, load_organism, organism_path

DEFAULT_WORLD = Path(__file__).parent / "worlds" / "default.yaml"

__all__ = ["DEFAULT_WORLD", "load_organism", "organism_path", "Organism", "grade_answer", "Grade"]

_LAZY = {
    "load_organism": "store",
    "organism_path": "store",
    "Organism": "store",
    "grade_answer": "grader",
    "Grade": "grader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # keep `import knowlens.organism` light: the store and grader load when asked for
        import importlib

        return getattr(importlib.import_module(f"knowlens.organism.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'knowlens.organism' has no attribute {name!r}")
