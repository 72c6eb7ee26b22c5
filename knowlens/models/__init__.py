"""Model loading: the built-in organism or any TransformerLens model, with a card for compatibility checks."""

from knowlens.models.load import ModelCard, load_model, model_card

__all__ = ["ModelCard", "load_model", "model_card"]
