"""Token (vocab-parallel) plus learned position embeddings, in Megatron's ``[s, b, h]`` layout."""

from __future__ import annotations

import torch
from torch import nn

from mp import parallel_state
from mp.device import get_device
from mp.model.config import TransformerConfig
from mp.model.dropout import hidden_dropout
from mp.model.init import embedding_init_method
from mp.tensor_parallel import VocabParallelEmbedding, scatter_to_sequence_parallel_region


class LanguageModelEmbedding(nn.Module):
    """``input_ids [b, s] -> [s, b, h]``, or ``[s / t, b, h]`` with sequence parallelism.

    The word table is split over TP ranks by vocabulary; the position table (learned absolute
    positions) is replicated. Under sequence parallelism without a position table (RoPE), the
    word lookup's partial sums are reduce-scattered straight to ``[s / t, b, h]`` instead of
    all-reduced and then split. Dropout on sequence-parallel activations uses the TP-specific
    RNG stream, since each rank then holds different tokens.

    With ``fp32_residual_connection`` the output is cast to fp32, the residual stream's
    dtype, after the lookup's all-reduce or reduce-scatter (in the parameters' dtype, as in
    Megatron) and, unlike Megatron, also after the sequence-parallel split: the values are the
    same, but the split's backward all-gathers the gradient in the parameters' dtype, half of
    Megatron's fp32 bytes.
    """

    def __init__(self, config: TransformerConfig, group=None):
        super().__init__()
        self.config = config
        init = embedding_init_method(config)
        self.add_position_embedding = config.position_embedding_type == "learned_absolute"
        self.reduce_scatter = config.sequence_parallel and not self.add_position_embedding
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size, init_method=init,
            reduce_scatter_embeddings=self.reduce_scatter, params_dtype=config.params_dtype,
            group=group)
        if self.add_position_embedding:
            table = torch.empty(config.max_position_embeddings, config.hidden_size,
                                device=get_device())
            self.position_embeddings = nn.Embedding.from_pretrained(
                init(table).to(config.params_dtype), freeze=False)
        self.group = parallel_state.get_tensor_model_parallel_group() if group is None else group

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        embeddings = self.word_embeddings(input_ids)  # [b, s, h], or [s/t, b, h] reduce-scattered
        if self.add_position_embedding:
            if position_ids is None:
                position_ids = torch.arange(input_ids.size(1), device=input_ids.device)
            embeddings = embeddings + self.position_embeddings(position_ids)
        if not self.reduce_scatter:
            embeddings = embeddings.transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                embeddings = scatter_to_sequence_parallel_region(embeddings, group=self.group)
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        return hidden_dropout(embeddings, self.config.hidden_dropout, self.training,
                              self.config.sequence_parallel)
