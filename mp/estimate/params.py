"""Parameters per rank, and the bytes of weights, gradients and optimizer state they cost.

A rank holds ``1 / TP`` of each sharded weight (QKV, attention output, MLP, word embedding and
output layer, with Megatron's vocabulary padding) and a full copy of each replicated one
(norms, row-parallel biases, the position table), for the layers of its pipeline stage: the
layers of its ``v`` model chunks (``num_layers / PP``, or as
`TransformerConfig.chunk_layer_counts` splits them unevenly). The first stage adds the
embedding, the last the final norm and, with untied embeddings or with tied embeddings split
over stages (PP > 1), the output layer: Megatron keeps a copy of the word embedding there and
keeps the two in step by all-reducing their gradients.

Bytes per parameter, as ``mp`` keeps them (checked against the built model and optimizer):

| | weights | gradients (`DistributedDataParallel`'s fp32 ``main_grad``) | optimizer |
| --- | --- | --- | --- |
| bf16 / fp16 | 2 | 4 | 12: fp32 master, Adam ``exp_avg`` and ``exp_avg_sq`` |
| fp32 | 4 | 4 | 8: the parameter is its own master |

plus AdamW's ``step`` counter, a 4-byte tensor per parameter tensor. That is 18 bytes per
parameter for bf16 (Megatron's figure), 16 when ``grad_reduce_in_bf16`` (Megatron's
``--grad-reduce-in-bf16``) keeps the gradients in bf16. fp16 costs 18 too: mp accumulates
every precision's gradients in fp32, where Megatron's fp16 path keeps fp16 gradients and an
fp32 copy (20).
With the distributed optimizer (`mp.optim.DistributedOptimizer`) the optimizer column is
divided by DP (by DP x CP with context parallelism: the ranks that reduce gradients
together): ``6 + 12 / DP`` bytes for bf16 (Megatron's table), leaving out each bucket's
padding to a multiple of DP elements and the per-shard step counters
(``tests/test_distrib_optimizer.py`` counts both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mp.estimate.setup import Setup
from mp.model.config import TransformerConfig
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS

FP32 = 4
ADAM_MOMENT_BYTES = 2 * FP32  # exp_avg and exp_avg_sq
STEP_COUNTER_BYTES = FP32  # AdamW's per-tensor ``step``, a float32 scalar tensor


@dataclass(frozen=True)
class RankParams:
    """Parameter elements one TP rank of a pipeline stage holds, by part."""

    embedding: int  # word-embedding shard, plus the position table (learned positions)
    layers: int
    final_norm: int
    output_layer: int  # untied output weight, or the last stage's copy of a tied one
    tensors: int  # how many parameter tensors (AdamW keeps a step counter for each)

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output_layer


def norm_params(cfg: TransformerConfig, size: int | None = None) -> tuple[int, int]:
    """(elements, tensors) of one norm ``size`` wide (default ``hidden_size``): weight and
    bias (LayerNorm) or weight (RMSNorm)."""
    n = 2 if cfg.normalization == "LayerNorm" else 1
    return n * (cfg.hidden_size if size is None else size), n


def _linear(cfg: TransformerConfig, in_size: int, out_size: int, shard_out: bool
            ) -> tuple[int, int]:
    """(elements, tensors) of a column- (``shard_out``) or row-parallel linear on one rank.
    A column-parallel bias is sharded with its outputs; a row-parallel one is replicated."""
    t = cfg.tensor_model_parallel_size
    weight = in_size * out_size // t
    if not cfg.add_bias_linear:
        return weight, 1
    return weight + (out_size // t if shard_out else out_size), 2


def layer_params(cfg: TransformerConfig) -> tuple[int, int]:
    """(elements, tensors) of one transformer layer on one TP rank (the attention output
    projection maps the ``a d`` query width to ``h``; ``qk_layernorm`` adds two norms ``d``
    wide, replicated)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    parts = [norm_params(cfg), _linear(cfg, h, cfg.qkv_size, True),
             _linear(cfg, cfg.query_projection_size, h, False),
             norm_params(cfg), _linear(cfg, h, f, True), _linear(cfg, f, h, False)]
    if cfg.activation == "swiglu":
        parts.append(_linear(cfg, h, f, True))
    if cfg.qk_layernorm:
        parts += [norm_params(cfg, cfg.kv_channels)] * 2
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def rank_params(cfg: TransformerConfig, pp_rank: int = 0) -> RankParams:
    """What one TP rank of pipeline stage ``pp_rank`` holds (all TP ranks hold as much)."""
    pp = cfg.pipeline_model_parallel_size
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, pipeline_model_parallel_size={pp})")
    first, last = pp_rank == 0, pp_rank == pp - 1
    h = cfg.hidden_size
    vocab_shard = cfg.padded_vocab_size // cfg.tensor_model_parallel_size * h
    per_layer, layer_tensors = layer_params(cfg)
    num_layers = cfg.stage_num_layers(pp_rank)
    embedding = tensors = 0
    if first:
        embedding, tensors = vocab_shard, 1
        if cfg.position_embedding_type == "learned_absolute":
            embedding, tensors = embedding + cfg.max_position_embeddings * h, 2
    final_norm, output = (0, 0)
    if last:
        final_norm, norm_tensors = norm_params(cfg)
        tensors += norm_tensors
        if cfg.untie_embeddings_and_output_weights or not first:
            output = vocab_shard
            tensors += 1
    return RankParams(embedding=embedding, layers=num_layers * per_layer, final_norm=final_norm,
                      output_layer=output, tensors=tensors + num_layers * layer_tensors)


def model_params(cfg: TransformerConfig) -> int:
    """The parameters of the whole model, each once (with the vocabulary padded as at this TP
    size; a tied output layer is not a second weight): ``12 l h^2 + 13 l h + (V + s) h + 2 h``
    for GPT-3's shape. It is one rank's count for the same model unsplit."""
    unsplit = dataclasses.replace(
        cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, **UNEVEN_SPLIT_FIELDS,
        sequence_parallel=False,
        recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by
        * cfg.tensor_model_parallel_size)
    return rank_params(unsplit).total


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model state on one rank."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def state_bytes(setup: Setup, params: RankParams) -> StateBytes:
    """Weights, gradient buffer (fp32, or bf16 with ``setup.grad_reduce_in_bf16``) and
    optimizer state for ``params`` (see the module doc)."""
    n = params.total
    master = 0 if setup.model.precision == "fp32" else FP32
    if setup.distributed_optimizer:
        optimizer = n * (master + ADAM_MOMENT_BYTES) / setup.gradient_group_size
    else:
        optimizer = n * (master + ADAM_MOMENT_BYTES) + params.tensors * STEP_COUNTER_BYTES
    return StateBytes(weights=n * setup.activation_bytes, grads=n * setup.grad_bytes,
                      optimizer=optimizer)
