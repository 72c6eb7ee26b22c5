"""Model loading: the built-in organism or any TransformerLens model, with a card for compatibility checks."""

from knowlens.models.devices import check_device
from knowlens.models.load import ModelCard, load_model, model_card, n_layers_hint

__all__ = ["ModelCard", "load_model", "model_card", "check_device", "n_layers_hint"]
