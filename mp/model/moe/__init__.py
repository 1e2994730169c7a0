"""Mixture-of-experts layers (Megatron-Core's ``MoELayer``): a router, experts split over
expert-parallel ranks, and the token exchange between them."""

from mp.model.moe.layer import MoELayer

__all__ = ["MoELayer"]
