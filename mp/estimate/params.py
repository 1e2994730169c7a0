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

plus AdamW's ``step`` counter, a 4-byte tensor per parameter tensor. With SGD
(``Setup.optimizer="sgd"``) one fp32 momentum buffer replaces the two moments (4 bytes, no step
counter); with Muon (``"muon"``, `mp.optim.muon`) so it does for the layers' matrices
(``RankParams.matrices``: each linear layer's weight, the router's, each expert's), and the
rest (embeddings, output layer, norms, biases, sinks) keeps AdamW's. That is 18 bytes per
parameter for bf16 (Megatron's figure), 16 when ``grad_reduce_in_bf16`` (Megatron's
``--grad-reduce-in-bf16``) keeps the gradients in bf16. fp16 costs 18 too: mp accumulates
every precision's gradients in fp32, where Megatron's fp16 path keeps fp16 gradients and an
fp32 copy (20).
With the distributed optimizer (`mp.optim.DistributedOptimizer`) the optimizer column is
divided by DP (by DP x CP with context parallelism: the ranks that reduce gradients
together): ``6 + 12 / DP`` bytes for bf16 (Megatron's table), leaving out each bucket's
padding to a multiple of DP elements and the per-shard step counters
(``tests/test_distrib_optimizer.py`` counts both). With Muon the distributed optimizer is
the layer-wise one (`mp.estimate.layer_wise`): whole parameters dealt over DP x CP, each rank
keeping the state of its own; the optimizer column is then the busiest rank's.

Under FSDP (`mp.distributed.torch_fsdp2`, ``Setup.fully_sharded``) every parameter is an
fp32 shard, its own master, over DP x CP ranks, and so are its gradient and moments: ``16 / (DP
x CP)`` bytes a parameter whatever the model's precision (the gradients are reduced in bf16
with ``grad_reduce_in_bf16`` but kept in fp32), plus the step counters. Each unit's weights,
gathered for its forward and backward in the model's dtype, and their unsharded gradients
are transient and left out, as is the padding of each tensor's rows to a multiple of the
ranks. The routers' expert biases, not trained, stay whole on every rank, outside FSDP.

With the optimizer's state offloaded (``Setup.optimizer_offload_fraction`` F, Megatron's
``--optimizer-cpu-offload``) the first F of a rank's optimizer elements (after the
distributed optimizer's sharding) keep their fp32 master (a copy even of an fp32 parameter)
and moments in host memory, with a pinned fp32 buffer for their gradient:
``StateBytes.host``, ``F x (4 + 8 + 4)`` bytes an element with fp32 moments, and the device's
optimizer column shrinks by ``F``. mp offloads whole shards in order (Megatron's rule), so it
offloads up to one parameter's shard more than F; the estimate counts F exactly.

The precision-aware optimizer (`mp.optim.PrecisionAwareAdamW`, Megatron's
``--use-precision-aware-optimizer``) stores the two moments in ``exp_avg_dtype`` and
``exp_avg_sq_dtype``: 2 bytes each in bf16 or fp16, so a bf16 parameter costs
``2 + 4 + (4 + 2 + 2) = 14`` bytes (``6 + 8 / DP`` distributed), 12 with
``main_grads_dtype=bf16`` (``grad_reduce_in_bf16``). fp16 moments add a 4-byte scale factor per
``mp.optim.precision_aware.CHUNK_ELEMENTS`` (4Mi) elements of each shard, left out here.

A multi-latent attention layer (`mp.model.mla`) replaces the QKV projection by its down
projections (whole on every TP rank), the latents' norms (replicated) and its up projections
(column-parallel), none with a bias (`mla_input_params`); its output projection takes the
``a dv`` values.

A mixture-of-experts layer (`mp.model.moe`) holds, instead of the MLP, a router ``[E, h]``
(replicated; and a bias ``[E]`` with ``moe_router_bias``), its ``E / EP`` experts (each an
MLP ``moe_ffn_hidden_size`` wide split over ETP, TP as the dense one is or with
``expert_tensor_parallel_size=1`` whole, their weights stacked into one tensor per kind) and a
shared expert's MLP when there is one. The experts' gradients are reduced over the
expert-data-parallel ranks (EDP = TP x DP x CP / (ETP x EP): DP x CP / EP at ETP = TP), so
the distributed optimizer divides their state by that instead. A router's expert bias
(``moe_router_enable_expert_bias``) is an fp32 weight that is not trained: it has no gradient
and no optimizer state, and it is not in ``total``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from mp.estimate.setup import Setup
from mp.estimate.storage import expert_tensor_parallel_size
from mp.model.config import TransformerConfig
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS

FP32 = 4
STEP_COUNTER_BYTES = FP32  # AdamW's per-tensor ``step``, a float32 scalar tensor
MOMENTUM_BYTES = FP32  # SGD's and Muon's ``momentum_buffer`` per element


class Count(NamedTuple):
    """Trained parameters on one rank: elements and tensors, and of them the matrices Muon
    updates (`mp.optim.muon.is_muon_parameter`: the layers' 2-D weights, per expert)."""

    elements: int
    tensors: int
    matrix_elements: int = 0
    matrices: int = 0


def _sum(parts, times: int = 1) -> Count:
    """``times`` the field-wise sum of the `Count`s ``parts``."""
    return Count(*(times * sum(field) for field in zip(*parts, strict=True)))


def _matrix(elements: int) -> Count:
    """One weight matrix of ``elements`` elements."""
    return Count(elements, 1, elements, 1)


@dataclass(frozen=True)
class RankParams:
    """Parameter elements one TP rank of a pipeline stage holds, by part."""

    embedding: int  # word-embedding shard, plus the position table (learned positions); on
    # a last stage with multi-token prediction, its copy of them
    layers: int
    final_norm: int
    output_layer: int  # untied output weight, or the last stage's copy of a tied one (none
    # when multi-token prediction's embedding copy serves it)
    tensors: int  # how many trained parameter tensors (AdamW keeps a step counter for each)
    experts: int = 0  # of ``layers`` and ``mtp``: the experts' (reduced over EDP)
    expert_bias: int = 0  # the routers' untrained fp32 expert biases, beside ``total``
    mtp: int = 0  # multi-token prediction's depths (`mtp_params`), on the last stage
    matrices: int = 0  # of ``layers`` and ``mtp``: the matrices' (`Count`; Muon's, when it
    # is the optimizer: the rest, embeddings and output layer included, takes AdamW)
    matrix_tensors: int = 0  # how many tensors hold them
    pp_rank: int = 0  # the stage (the layer-wise optimizer deals its parameters in order)

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output_layer + self.mtp


def norm_params(cfg: TransformerConfig, size: int | None = None) -> Count:
    """`Count` of one norm ``size`` wide (default ``hidden_size``): weight and bias
    (LayerNorm) or weight (RMSNorm), vectors."""
    n = 2 if cfg.normalization == "LayerNorm" else 1
    return Count(n * (cfg.hidden_size if size is None else size), n)


def _linear(cfg: TransformerConfig, in_size: int, out_size: int, shard_out: bool,
            bias: bool = False, t: int | None = None) -> Count:
    """`Count` of a column- (``shard_out``) or row-parallel linear on one rank of ``t`` (default
    TP), with a bias under ``add_bias_linear`` (or ``bias``: the QKV projection's under
    ``add_qkv_bias``). A column-parallel bias is sharded with its outputs; a row-parallel one
    is replicated."""
    t = cfg.tensor_model_parallel_size if t is None else t
    weight = _matrix(in_size * out_size // t)
    if not (cfg.add_bias_linear or bias):
        return weight
    return _sum([weight, Count(out_size // t if shard_out else out_size, 1)])


def _mlp(cfg: TransformerConfig, width: int, t: int | None = None) -> Count:
    """`Count` of an MLP ``width`` wide on one of ``t`` ranks (default TP): fc1 (and SwiGLU's
    gate) column-parallel, fc2 row-parallel."""
    h = cfg.hidden_size
    parts = [_linear(cfg, h, width, True, t=t), _linear(cfg, width, h, False, t=t)]
    if cfg.gated_linear_unit:
        parts.append(_linear(cfg, h, width, True, t=t))
    return _sum(parts)


def expert_params(cfg: TransformerConfig) -> Count:
    """`Count` of the experts one rank holds in a mixture-of-experts layer: ``E / EP`` MLPs
    ``moe_ffn_hidden_size`` wide split over ETP (`expert_tensor_parallel_size`), stacked (one
    tensor per weight kind; Muon updates each expert's matrix, AdamW the stacked biases)."""
    mlp = _mlp(cfg, cfg.moe_ffn_hidden_size, expert_tensor_parallel_size(cfg))
    experts = cfg.num_moe_experts // cfg.expert_model_parallel_size
    return mlp._replace(elements=experts * mlp.elements,
                        matrix_elements=experts * mlp.matrix_elements)


def mla_input_params(cfg: TransformerConfig) -> Count:
    """`Count` of multi-latent attention's input projections on one TP rank
    (`mp.model.mla`; none has a bias): the queries' ``h -> a (dn + dr)`` column-parallel, or
    their down projection ``h -> q_lora_rank`` (whole on every rank), its norm and up
    projection ``q_lora_rank -> a (dn + dr)`` (column-parallel); the keys' and values' down
    projection ``h -> c + dr`` (whole), the latent's norm ``c`` wide and its up projection
    ``c -> a (dn + dv)`` (column-parallel)."""
    h, a, t = cfg.hidden_size, cfg.num_attention_heads, cfg.tensor_model_parallel_size
    dn, dr, c = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.kv_lora_rank
    parts = [_matrix(h * (c + dr)), norm_params(cfg, c),
             _matrix(c * a * (dn + cfg.v_head_dim) // t)]
    if cfg.q_lora_rank is None:
        parts.append(_matrix(h * a * (dn + dr) // t))
    else:
        r = cfg.q_lora_rank
        parts += [_matrix(h * r), norm_params(cfg, r), _matrix(r * a * (dn + dr) // t)]
    return _sum(parts)


def mla_duplicated_params(cfg: TransformerConfig) -> int:
    """Elements of multi-latent attention's parameters whole on every TP rank and computed
    on the rank's own tokens (the down projections and the latents' norms): under sequence
    parallelism their gradients are partial over TP."""
    h, c, r = cfg.hidden_size, cfg.kv_lora_rank, cfg.q_lora_rank
    total = h * (c + cfg.qk_pos_emb_head_dim) + norm_params(cfg, c)[0]
    return total if r is None else total + h * r + norm_params(cfg, r)[0]


def layer_params(cfg: TransformerConfig, moe: bool = False) -> Count:
    """`Count` of one transformer layer's trained parameters on one TP rank (the
    attention output projection maps the ``a d`` query width to ``h``, ``a dv`` under
    multi-latent attention, whose input projections are `mla_input_params`; ``qk_layernorm``
    adds two norms ``d`` wide, replicated, and learnable attention sinks one logit per head,
    split over TP with the heads); ``moe``: a mixture-of-experts layer's, its `expert_params`
    included."""
    h = cfg.hidden_size
    attention = (mla_input_params(cfg) if cfg.multi_latent_attention
                 else _linear(cfg, h, cfg.qkv_size, True, cfg.add_qkv_bias))
    parts = [norm_params(cfg), attention,
             _linear(cfg, cfg.query_projection_size, h, False), norm_params(cfg)]
    if not moe:
        parts.append(_mlp(cfg, cfg.ffn_hidden_size))
    else:
        parts += [_matrix(h * cfg.num_moe_experts), expert_params(cfg)]  # router [E, h]
        if cfg.moe_router_bias:
            parts.append(Count(cfg.num_moe_experts, 1))
        if cfg.moe_shared_expert_intermediate_size is not None:
            parts.append(_mlp(cfg, cfg.moe_shared_expert_intermediate_size))
        if cfg.moe_shared_expert_gate:  # its [1, h] gate, whole on every TP rank
            parts.append(_matrix(h))
    if cfg.qk_layernorm:
        parts += [norm_params(cfg, cfg.kv_channels)] * 2
    if cfg.softmax_type == "learnable":  # the core's softmax_offset
        parts.append(Count(cfg.num_attention_heads // cfg.tensor_model_parallel_size, 1))
    return _sum(parts)


def mtp_layer_is_moe(cfg: TransformerConfig) -> bool:
    """Whether multi-token prediction's layers have experts (as the model's last layer)."""
    return cfg.num_moe_experts is not None and cfg.is_moe_layer(cfg.num_layers - 1)


def mtp_params(cfg: TransformerConfig) -> Count:
    """`Count` of multi-token prediction's ``D`` depths on one TP rank (none
    without ``mtp_num_layers``): each ``enorm``, ``hnorm`` and the final norm, ``eh_proj``
    ``[h, 2h]`` whole, and a transformer layer (`layer_params`, with its experts when
    `mtp_layer_is_moe`)."""
    return _sum([norm_params(cfg)] * 3 + [_matrix(2 * cfg.hidden_size ** 2),
                                          layer_params(cfg, moe=mtp_layer_is_moe(cfg))],
                times=cfg.mtp_num_layers or 0)


def rank_params(cfg: TransformerConfig, pp_rank: int = 0) -> RankParams:
    """What one TP rank of pipeline stage ``pp_rank`` holds (all TP ranks hold as much)."""
    pp = cfg.pipeline_model_parallel_size
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, pipeline_model_parallel_size={pp})")
    first, last = pp_rank == 0, pp_rank == pp - 1
    h = cfg.hidden_size
    vocab_shard = cfg.padded_vocab_size // cfg.tensor_model_parallel_size * h
    layers = cfg.stage_layers(pp_rank)
    moe_layers = sum(map(cfg.is_moe_layer, layers))
    stack = [_sum([layer_params(cfg)], len(layers) - moe_layers)]
    if moe_layers:
        stack.append(_sum([layer_params(cfg, moe=True)], moe_layers))
    predicts_more = last and cfg.mtp_num_layers is not None  # multi-token prediction here
    embedding = tensors = 0
    if first or predicts_more:  # the embedding, or multi-token prediction's copy of it
        embedding, tensors = vocab_shard, 1
        if cfg.position_embedding_type == "learned_absolute":
            embedding, tensors = embedding + cfg.max_position_embeddings * h, 2
    final_norm, output = (0, 0)
    if last:
        final_norm, norm_tensors = norm_params(cfg)[:2]
        tensors += norm_tensors
        if cfg.untie_embeddings_and_output_weights or not (first or predicts_more):
            output = vocab_shard
            tensors += 1
    mtp = mtp_params(cfg) if predicts_more else Count(0, 0)
    trained = _sum(stack + [mtp])  # the layers' and multi-token prediction's
    moe_layers += (cfg.mtp_num_layers if predicts_more and mtp_layer_is_moe(cfg) else 0)
    bias = cfg.num_moe_experts if cfg.moe_router_enable_expert_bias else 0
    return RankParams(embedding=embedding, layers=trained.elements - mtp.elements,
                      final_norm=final_norm, output_layer=output,
                      tensors=tensors + trained.tensors,
                      experts=moe_layers * expert_params(cfg).elements if moe_layers else 0,
                      expert_bias=moe_layers * bias, mtp=mtp.elements,
                      matrices=trained.matrix_elements, matrix_tensors=trained.matrices,
                      pp_rank=pp_rank)


def model_params(cfg: TransformerConfig) -> int:
    """The parameters of the whole model, each once (with the vocabulary padded as at this TP
    size; a tied output layer is not a second weight): ``12 l h^2 + 13 l h + (V + s) h + 2 h``
    for GPT-3's shape. It is one rank's count for the same model unsplit."""
    unsplit = dataclasses.replace(
        cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, **UNEVEN_SPLIT_FIELDS,
        sequence_parallel=False, expert_model_parallel_size=1, expert_tensor_parallel_size=None,
        recompute_granularity=None, recompute_modules=None, recompute_method=None,
        recompute_num_layers=None, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by
        * cfg.tensor_model_parallel_size)
    return rank_params(unsplit).total


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model state on one rank: on the device, and in host memory (``host``, the
    offloaded optimizer state, not in ``total``)."""

    weights: float
    grads: float
    optimizer: float
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def state_bytes(setup: Setup, params: RankParams) -> StateBytes:
    """Weights, gradient buffer (fp32, or bf16 with ``setup.grad_reduce_in_bf16``) and
    optimizer state (moments in ``setup``'s dtypes) for ``params`` (see the module doc)."""
    n = params.total
    if setup.fully_sharded:  # FSDP: fp32 shards of everything over DP x CP (module doc)
        shard = n / setup.gradient_group_size
        return StateBytes(weights=FP32 * (shard + params.expert_bias),  # biases whole
                          grads=FP32 * shard, optimizer=setup.moment_bytes * shard
                          + params.tensors * _step_counter_bytes(setup))
    weights = n * setup.activation_bytes + FP32 * params.expert_bias
    grads = n * setup.grad_bytes
    if setup.optimizer == "muon":  # its matrices keep one fp32 buffer, the rest AdamW's state
        if setup.distributed_optimizer:  # whole parameters, dealt
            from mp.estimate.layer_wise import busiest_state_bytes  # it imports this module
            optimizer = busiest_state_bytes(setup, params.pp_rank)
        else:  # no step counter for the matrices
            optimizer = (n * _master_bytes(setup) + params.matrices * MOMENTUM_BYTES
                         + (n - params.matrices) * setup.moment_bytes
                         + (params.tensors - params.matrix_tensors) * STEP_COUNTER_BYTES)
        return StateBytes(weights=weights, grads=grads, optimizer=optimizer)
    if setup.distributed_optimizer:  # sharded, without the per-shard step counters
        elements = ((n - params.experts) / setup.optimizer_shard_size
                    + params.experts / setup.expert_optimizer_shard_size)
        counters = 0
    else:
        elements, counters = n, params.tensors * _step_counter_bytes(setup)
    offloaded = setup.optimizer_offload_fraction * elements
    return StateBytes(weights=weights, grads=grads,
                      optimizer=(elements - offloaded) * (_master_bytes(setup)
                                                          + setup.moment_bytes) + counters,
                      host=offloaded * (FP32 + setup.moment_bytes + FP32))


def _master_bytes(setup: Setup) -> int:
    """A master weight's bytes on the device: none for fp32 (the parameter is its own)."""
    return 0 if setup.model.precision == "fp32" else FP32


def _step_counter_bytes(setup: Setup) -> int:
    """AdamW's step counter per parameter tensor; SGD keeps none."""
    return 0 if setup.optimizer == "sgd" else STEP_COUNTER_BYTES
