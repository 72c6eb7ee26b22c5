"""The built-in model organism: a synthetic world whose every fact is known, a model trained on it, a grader."""

from pathlib import Path

DEFAULT_WORLD = Path(__file__).parent / "worlds" / "default.yaml"
