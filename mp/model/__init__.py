"""The GPT model built from tensor-parallel layers."""

from mp.model.config import TransformerConfig
from mp.model.gpt import GPTModel

__all__ = ["GPTModel", "TransformerConfig"]
