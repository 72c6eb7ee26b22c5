"""jaxtyping aliases for the tensors that cross stage boundaries."""

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
TokenMask = Bool[Tensor, "batch pos"]
Resid = Float[Tensor, "batch pos d_model"]
Logits = Float[Tensor, "batch pos d_vocab"]
TokenScores = Float[Tensor, "batch pos"]
LatentActs = Float[Tensor, "batch pos d_sae"]

__all__ = ["Tokens", "TokenMask", "Resid", "Logits", "TokenScores", "LatentActs", "Bool", "Float", "Int", "Tensor"]
