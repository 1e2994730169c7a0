"""mp: Megatron-style model-parallel training of GPT models (tensor, sequence, pipeline, data)."""

__version__ = "0.1.0"
