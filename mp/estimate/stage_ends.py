"""What the ends of the model save for backward: the first stage's embedding, and the last
stage's final norm, output layer and loss (and the loss's working memory).

The embedding keeps the token ids (and, under TP, the out-of-range flags and shifted ids), the
position ids with learned positions, and its dropout mask (fp32 on the CPU with
``fp32_residual_connection``: the embedding's output is the residual stream). The final norm
keeps its input and statistics (and weights, `mp.estimate.storage.norm_weight_terms`), the
output layer its input, and the cross-entropy the logits ``[s, b, V / t]`` in the activation
dtype, one fp32 normalizer per row and the target ids. The loss's working
memory is the largest transient of a step for GPT-3's vocabulary: compiled (`mp.jit`, CUDA),
only the logits' gradient, ``e s b V / t`` bytes; eagerly, an fp32 copy of the logits, a bool
one-hot and the gradient, ``(5 + e) s b V / t``. Multi-token prediction (`mp.estimate.mtp`)
runs an embedding lookup and an output layer with its loss once more for each depth.
"""

from __future__ import annotations

from mp.estimate.storage import (
    CUDA,
    FP32,
    INT64,
    Kernels,
    activation_bytes,
    dropout_mask_bytes,
    local_tokens,
    norm_terms,
    norm_weight_terms,
    sequence_rows,
)
from mp.model.config import TransformerConfig


def embedding_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA
                    ) -> dict[str, float]:
    """What the embedding saves for one micro-batch on one TP rank."""
    tokens = local_tokens(cfg, micro_batch)
    terms = {"token ids": INT64 * tokens}
    if cfg.tensor_model_parallel_size > 1:
        terms["out-of-range token flags"] = tokens
    if cfg.position_embedding_type == "learned_absolute":
        terms["position ids"] = INT64 * local_tokens(cfg, 1)
    if cfg.hidden_dropout > 0:
        terms["embedding dropout mask"] = (dropout_mask_bytes(cfg, kernels, residual=True)
                                           * sequence_rows(cfg, micro_batch) * cfg.hidden_size)
    return terms


def output_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA
                 ) -> dict[str, float]:
    """What the final norm, the output layer and the loss save for one micro-batch."""
    e, h = activation_bytes(cfg), cfg.hidden_size
    tokens = local_tokens(cfg, micro_batch)
    local = sequence_rows(cfg, micro_batch)
    terms = {
        **{f"final norm {name}": size
           for name, size in norm_terms(cfg, kernels, local, residual=True).items()},
        **{f"final norm {name}": size for name, size in norm_weight_terms(cfg, kernels).items()},
        "output layer input": e * local * h,
        "cross-entropy logits": e * tokens * _vocab_shard(cfg),
        "cross-entropy normalizers (fp32)": FP32 * tokens,
        "cross-entropy target ids": INT64 * tokens,
    }
    return terms


def loss_transient(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA) -> float:
    """Bytes the cross-entropy needs beside what it saves, at its worst moment (the backward,
    which writes the logits' gradient; see the module doc)."""
    e = activation_bytes(cfg)
    logits = local_tokens(cfg, micro_batch) * _vocab_shard(cfg)
    compiled = kernels.jit_compiled and cfg.cross_entropy_loss_fusion
    return logits * (e if compiled else FP32 + 1 + e)


def _vocab_shard(cfg: TransformerConfig) -> int:
    return cfg.padded_vocab_size // cfg.tensor_model_parallel_size
