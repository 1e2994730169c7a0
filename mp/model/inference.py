"""``InferenceParams``: the key/value cache of incremental decoding (Megatron's name).

Generation runs the prompt through the model once, then one new token per step. With a cache
each layer's attention stores the keys and values of the tokens it has seen, so a step
computes only the new token's and attends over all of them. ``GPTModel.forward(tokens,
inference_params=params)`` takes the tokens that follow the ``params.sequence_len_offset``
cached ones; the caller advances the offset after each call, as in Megatron.

The cache holds this rank's key/value heads (``ng = g / t`` under tensor parallelism), in
buffers ``[max_sequence_length, b, ng, d]`` (``d = kv_channels``, keys after RoPE) allocated
on a layer's first call. Multi-latent attention (`mp.model.mla`) caches each token's latent
``[b, kv_lora_rank]`` and rotated key channels ``[b, qk_pos_emb_head_dim]`` instead, shared by
every head.
"""

from __future__ import annotations

import torch


class InferenceParams:
    def __init__(self, max_sequence_length: int):
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0  # tokens cached so far
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer_number: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k [s, b, ...]`` and ``v [s, b, ...]`` (keys and values ``[s, b, ng, d]``;
        multi-latent attention's latents and rotated key channels) after layer
        ``layer_number``'s cached tokens; return every one cached there, ``[offset + s, b,
        ...]``."""
        start, end = self.sequence_len_offset, self.sequence_len_offset + k.size(0)
        if end > self.max_sequence_length:
            raise ValueError(f"{end} tokens exceed the cache's max_sequence_length="
                             f"{self.max_sequence_length}")
        if layer_number not in self.key_value_memory_dict:
            self.key_value_memory_dict[layer_number] = tuple(
                t.new_empty((self.max_sequence_length, *t.shape[1:])) for t in (k, v))
        keys, values = self.key_value_memory_dict[layer_number]
        keys[start:end], values[start:end] = k, v
        return keys[:end], values[:end]

    def positions(self, length: int, device) -> torch.Tensor:
        """The positions ``[length]`` of the tokens that follow the cached ones."""
        return torch.arange(self.sequence_len_offset, self.sequence_len_offset + length,
                            device=device)

    def causal_mask(self, length: int, device) -> torch.Tensor | None:
        """The attention mask of ``length`` new queries over the cached and new keys,
        ``[1, 1, length, offset + length]``, True where a key comes after its query; None
        while nothing is cached (the attention's own causal mask is the same)."""
        if self.sequence_len_offset == 0:
            return None
        keys = torch.arange(self.sequence_len_offset + length, device=device)
        return (keys[None, :] > self.positions(length, device)[:, None])[None, None]
