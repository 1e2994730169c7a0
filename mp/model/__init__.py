"""The GPT model built from tensor-parallel layers."""

from mp.model.config import TransformerConfig

__all__ = ["TransformerConfig"]
