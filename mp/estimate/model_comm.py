"""The tensor- and context-parallel collectives of one rank of pipeline stage ``pp_rank`` in an
iteration of ``m`` micro-batches (`mp.estimate.comm.collectives` lists them with the rest). ``a``
is one ``[s, b, h]`` activation in the model's dtype; ``c`` column-parallel layers per
transformer layer (QKV, fc1, and SwiGLU's gate), two row-parallel ones (attention output, fc2):

- TP without SP: an all-reduce of ``a`` for each row-parallel output (forward) and each
  column-parallel input gradient (backward), ``(2 + c) a`` per layer and micro-batch; the
  vocab-parallel embedding's forward (first stage) and the output layer's input gradient
  (last stage), ``a`` each.
- TP with SP: a column-parallel layer all-gathers its input forward, re-gathers it and
  reduce-scatters its input gradient backward; a row-parallel one reduce-scatters forward
  and all-gathers backward: ``(2c + 2) a`` gathered and ``(c + 2) a`` scattered per layer. The
  embedding all-reduces forward (reduce-scatters with RoPE) and all-gathers backward; the
  output layer is a column-parallel layer.
- Multi-latent attention: `mp.estimate.mla.tensor_parallel_channels` counts the TP calls of
  its latents and key RoPE channels; under SP its down projections and latent norms have
  partial gradients; under CP its keys are ``dn + dr`` wide a head, its values ``dv``.
- Multi-token prediction (``D`` depths, last stage): each depth's layer calls what a decoder
  layer does (never rerun by full recompute), its embedding lookup and output layer what the
  first stage's embedding and the output layer do, its cross-entropy another ``3 s b`` fp32
  values; under SP ``eh_proj`` and its norms have partial gradients
  (`mp.estimate.mtp.mtp_tensor_parallel_activations`, `mtp_partial_gradient_params`).
- TP: the cross-entropy's all-reduces of the row maxima and of the target logits and exp
  sums, ``3 s b`` fp32 values per micro-batch; once per iteration, with SP, the gradients of
  the parameters replicated over TP (norms, row-parallel biases).
- TP under full recompute: the recomputed layers' forward calls again, and with
  ``distribute_saved_activations`` an all-gather of each checkpoint's input (fp32 with
  ``fp32_residual_connection``; every other TP call moves the model's dtype: the norms return
  it, and the embedding casts its output after its calls). Under selective
  recompute the forward calls of what its modules rerun (`_selective_reruns`): ``mlp`` a dense
  MLP's (fc2's all-reduce; under SP fc1's and the gate's all-gathers and fc2's
  reduce-scatter), ``shared_experts`` the shared expert's, ``moe`` the shared expert's, the
  experts' all-reduce without SP and the dispatcher's exchanges (`expert_comm`),
  ``mla_up_proj`` under SP the latents' and the key's RoPE channels' all-gathers (and the
  queries' projection's from ``h`` without ``q_lora_rank``); ``core_attn`` reruns CP's
  exchanges; ``layernorm`` and ``moe_act`` call nothing.
- CP (context parallelism, ``c`` ranks; ``a`` is then the rank's ``[s / c, b, h]``): with
  ``all_gather`` each layer all-gathers its keys and values, ``[s, b, g d / t]`` each, in
  every forward (again when full or selective recompute reruns it) and reduce-scatters their
  gradients in backward; with ``a2a`` it exchanges its q, k and v and then its attention
  output, ``[s / c, b, (q + 2 g d + q) / t]`` in all, in every forward and the same in
  backward; with ``p2p`` (ring attention) each forward sends its K and V blocks, ``[s / c,
  b, g d / t]`` each, on ``c - 1`` times, and backward sends them ``c - 1`` times with their
  fp32 gradients ``c`` times (the last brings the gradients home); with ``a2a+p2p`` (``A x
  P = c``) both: ``a2a``'s all-to-alls, as many bytes, over the A ranks of its a2a group
  (``cp_a2a``: their tokens of ``1 / A`` of the heads for the rank's ``s / c`` tokens of
  every head), and ``p2p``'s ring over the P ranks of its p2p group (``cp_p2p``) with ``P``
  in place of ``c``, its blocks, ``s / P`` tokens of ``1 / A`` of the key/value heads, as
  large as ``p2p``'s. The last stage all-reduces each micro-batch's loss sum and token count
  (two fp32 values) over CP.

Bytes follow `mp.estimate.measure` (`mp.estimate.comm`'s doc); every row is checked against mp's
code.
"""

from __future__ import annotations

from mp.estimate.attention_calls import exchange_sizes
from mp.estimate.collective import Collective
from mp.estimate.mla import tensor_parallel_channels
from mp.estimate.mtp import (
    mtp_depths,
    mtp_partial_gradient_params,
    mtp_tensor_parallel_activations,
)
from mp.estimate.params import mla_duplicated_params, mtp_layer_is_moe, norm_params, rank_params
from mp.estimate.setup import Setup
from mp.estimate.storage import (
    FP32,
    activation_bytes,
    attention_widths,
    expert_tensor_parallel_size,
    local_tokens,
    residual_bytes,
    sequence_rows,
)


def stage_layers(setup: Setup, pp_rank: int) -> dict[bool, tuple[int, int]]:
    """``{moe: (layers, forwards)}``: the dense (``False``) and mixture-of-experts (``True``)
    layers of one rank of stage ``pp_rank``, multi-token prediction's on the last stage
    included, and their forwards in an iteration's pass over a micro-batch (full recompute
    runs some of the decoder's twice, none of multi-token prediction's)."""
    cfg = setup.model
    recomputed = set(_recomputed_layers(setup, pp_rank))
    out = {False: (0, 0), True: (0, 0)}
    for index in cfg.stage_layers(pp_rank):
        layers, forwards = out[cfg.is_moe_layer(index)]
        out[cfg.is_moe_layer(index)] = (layers + 1, forwards + 1 + (index in recomputed))
    depths = mtp_depths(cfg) if pp_rank == setup.pp - 1 else 0
    if depths:
        layers, forwards = out[mtp_layer_is_moe(cfg)]
        out[mtp_layer_is_moe(cfg)] = (layers + depths, forwards + depths)
    return out


def _tensor_parallel_linears(setup: Setup, moe: bool) -> tuple[int, int, int]:
    """(column-parallel linears, row-parallel linears, regions entered) of one layer: QKV,
    fc1 (and SwiGLU's gate) column-parallel, the attention projection and fc2 row-parallel.
    A mixture-of-experts layer has a shared expert's MLP when there is one; without SP it
    enters its experts' region once (a copy whose gradient is all-reduced) and leaves it as a
    row-parallel linear does, while under SP the dispatcher moves its rows
    (`mp.estimate.expert_comm`)."""
    cfg = setup.model
    mlp_columns = 2 if cfg.gated_linear_unit else 1
    # multi-latent attention's up projections from latents: `mla.tensor_parallel_channels`
    qkv = 0 if cfg.multi_latent_attention and cfg.q_lora_rank is not None else 1
    if not moe:
        return qkv + mlp_columns, 2, 0
    shared = cfg.moe_shared_expert_intermediate_size is not None
    if cfg.sequence_parallel:  # the dispatcher moves the experts' rows (`expert_comm`)
        return qkv + shared * mlp_columns, 1 + shared, 0
    return qkv + shared * mlp_columns, 2 + shared, 1


def _selective_reruns(setup: Setup, moe: bool) -> tuple[int, int]:
    """(column-parallel linears, row-parallel linears and regions left) of one layer whose
    forward calls selective recompute runs again in backward: ``mlp`` a dense layer's MLP
    (fc1, SwiGLU's gate; fc2), ``moe`` a mixture-of-experts layer's shared expert and,
    without SP, its experts' region (entered by a copy, which calls nothing forward, left by
    an all-reduce; under SP its dispatcher's calls, `expert_comm`), ``shared_experts`` the
    shared expert, ``mla_up_proj`` the queries' projection from ``h`` when there is no
    ``q_lora_rank`` (the latents' gathers: `mla.tensor_parallel_channels`)."""
    cfg = setup.model
    mlp_columns = 2 if cfg.gated_linear_unit else 1
    shared = cfg.moe_shared_expert_intermediate_size is not None
    columns = rows = 0
    if cfg.recomputes("mlp") and not moe:
        columns, rows = mlp_columns, 1
    if moe and cfg.recomputes("moe"):
        columns, rows = shared * mlp_columns, shared + (not cfg.sequence_parallel)
    if moe and cfg.recomputes("shared_experts"):
        columns, rows = mlp_columns, 1
    if cfg.recomputes("mla_up_proj") and cfg.q_lora_rank is None:
        columns += 1
    return columns, rows


def tensor_parallel_collectives(setup: Setup, pp_rank: int) -> list[Collective]:
    cfg, m = setup.model, setup.num_microbatches
    act = activation_bytes(cfg) * local_tokens(cfg, setup.micro_batch_size) * cfg.hidden_size
    first, last = pp_rank == 0, pp_rank == setup.pp - 1
    gathers = scatters = reduces = 0
    for moe, (layers, forwards) in stage_layers(setup, pp_rank).items():
        columns, rows, enters = _tensor_parallel_linears(setup, moe)
        rerun_columns, rerun_rows = _selective_reruns(setup, moe)
        # forward: gather into columns and regions, reduce(-scatter) out of rows (again for
        # the linears selective recompute reruns); backward: a column re-gathers its input, a
        # row gathers its output gradient, and columns and regions reduce(-scatter) their
        # input gradients
        gathers += forwards * (columns + enters) + layers * (columns + rows + rerun_columns)
        scatters += forwards * rows + layers * (columns + enters + rerun_rows)
        reduces += forwards * rows + layers * (columns + enters + rerun_rows)
    out = []
    if cfg.sequence_parallel:
        if last:  # the output layer is column-parallel
            gathers, scatters = gathers + 2, scatters + 1
        if first:
            gathers += 1  # the embedding's backward
            if cfg.position_embedding_type != "learned_absolute":  # no table: reduce-scattered
                scatters += 1
            else:
                out.append(Collective("embedding", "all_reduce", "tp", m * act))
        out += [Collective("sequence-parallel activations", "all_gather", "tp",
                           m * gathers * act),
                Collective("sequence-parallel activations", "reduce_scatter", "tp",
                           m * scatters * act)]
    else:
        reduces += (1 if first else 0) + (1 if last else 0)
        out.append(Collective("tensor-parallel activations", "all_reduce", "tp",
                              m * reduces * act))
    if cfg.multi_latent_attention:  # act / h bytes per channel of the rank's tokens
        layers, forwards = map(sum, zip(*stage_layers(setup, pp_rank).values()))
        if cfg.recomputes("mla_up_proj"):  # the latents' and RoPE channels' gathers again
            forwards += layers
        out += [Collective("MLA latents and key RoPE channels", kind, "tp",
                           m * act // cfg.hidden_size * channels)
                for kind, channels in tensor_parallel_channels(cfg, layers, forwards).items()]
    out.append(Collective("partial gradients of replicated parameters", "all_reduce", "tp",
                          shard_grad_bytes(setup, _partial_gradient_params(setup, pp_rank))))
    if cfg.recompute_granularity == "full" and cfg.distribute_saved_activations:
        saved = residual_bytes(cfg) * sequence_rows(cfg, setup.micro_batch_size) \
            * cfg.hidden_size
        out.append(Collective("distributed checkpoint inputs", "all_gather", "tp",
                              m * _checkpoints(setup, pp_rank) * saved))
    if last:
        out += [Collective("MTP embeddings and output layers", kind, "tp", m * count * act)
                for kind, count in mtp_tensor_parallel_activations(cfg).items()]
        rows = local_tokens(cfg, setup.micro_batch_size) * (1 + mtp_depths(cfg))
        out.append(Collective("cross-entropy", "all_reduce", "tp", m * 3 * FP32 * rows))
    return out


def context_parallel_collectives(setup: Setup, pp_rank: int) -> list[Collective]:
    cfg, m = setup.model, setup.num_microbatches
    layers = cfg.stage_num_layers(pp_rank)
    forwards = layers + len(_recomputed_layers(setup, pp_rank))
    if cfg.recomputes("core_attn"):  # the recomputed core exchanges again
        forwards += layers
    e, b = activation_bytes(cfg), setup.micro_batch_size
    q, k, v = attention_widths(cfg)  # channels per token on the rank
    kv_block = local_tokens(cfg, b) * (k + v)
    heads, ring = exchange_sizes(cfg)  # the CP ranks of the all-to-all, of the ring
    hierarchical = heads > 1 and ring > 1  # a2a+p2p: each over its level's group
    out = []
    if heads > 1:  # q, k, v, then the attention output; back in backward
        exchanged = (e * local_tokens(cfg, b)
                     * (q + k + v + cfg.query_projection_size / setup.tp))
        out.append(Collective("Q, K, V and attention output (heads for tokens)", "all_to_all",
                              "cp_a2a" if hierarchical else "cp",
                              m * (forwards + layers) * exchanged))
    if ring > 1:  # K and V blocks around the ring, then their gradients
        sent = m * kv_block * ((forwards + layers) * (ring - 1) * e + layers * ring * FP32)
        out += [Collective("K, V blocks and their gradients (ring)", kind,
                           "cp_p2p" if hierarchical else "cp", sent)
                for kind in ("send", "recv")]
    if heads == ring == 1:
        keys = e * cfg.seq_length * b * (k + v)  # the whole sequence's
        out = [Collective("keys and values", "all_gather", "cp", m * forwards * keys),
               Collective("key and value gradients", "reduce_scatter", "cp",
                          m * layers * keys)]
    if pp_rank == setup.pp - 1:
        out.append(Collective("loss sum and token count", "all_reduce", "cp", m * 2 * FP32))
    return out


def _recomputed_layers(setup: Setup, pp_rank: int) -> list[int]:
    """The layers (indices over the model) of one rank of stage ``pp_rank`` whose forward
    full recompute runs again in backward: every one (uniform), or the first ``n`` of each
    chunk (block)."""
    cfg = setup.model
    if cfg.recompute_granularity != "full":
        return []
    chunks = [cfg.chunk_layers(pp_rank, c) for c in range(len(cfg.chunk_layer_counts[pp_rank]))]
    n = None if cfg.recompute_method == "uniform" else cfg.recompute_num_layers
    return [index for chunk in chunks for index in chunk[:n]]


def _checkpoints(setup: Setup, pp_rank: int) -> int:
    """Checkpointed groups of layers on one rank of stage ``pp_rank`` (full recompute): the
    first ``n`` layers of each chunk (block), or its layers in groups of ``n`` (uniform)."""
    cfg, n = setup.model, setup.model.recompute_num_layers
    if cfg.recompute_method == "block":
        return sum(min(n, layers) for layers in cfg.chunk_layer_counts[pp_rank])
    return sum(-(-layers // n) for layers in cfg.chunk_layer_counts[pp_rank])


def _partial_gradient_params(setup: Setup, pp_rank: int) -> int:
    """Elements of the parameters replicated over TP whose gradients are partial sums there
    (`mp.distributed.finalize_model_grads` all-reduces them): under SP the norms, the
    row-parallel biases, the shared experts' gate and multi-latent attention's down
    projections and latent norms; at
    any TP the ``qk_layernorm`` norms (each rank normalizes its heads) and a
    mixture-of-experts layer's router and, split over ETP > 1, its experts' fc2 biases (each
    rank sees its share of the experts' outputs)."""
    cfg = setup.model
    bias = cfg.hidden_size if cfg.add_bias_linear else 0
    total = 0
    for moe, (layers, _) in stage_layers(setup, pp_rank).items():
        if not layers:
            continue
        shared = cfg.moe_shared_expert_intermediate_size is not None
        row_biases = 1 + (shared if moe else 1)  # the attention projection's, fc2's
        per_layer = 2 * norm_params(cfg, cfg.kv_channels)[0] if cfg.qk_layernorm else 0
        if cfg.sequence_parallel:
            per_layer += 2 * norm_params(cfg)[0] + row_biases * bias
            if cfg.multi_latent_attention:  # its down projections and latent norms
                per_layer += mla_duplicated_params(cfg)
            if moe and cfg.moe_shared_expert_gate:  # each rank gates its own tokens
                per_layer += cfg.hidden_size
        if moe:  # whole experts (ETP 1) each add their whole fc2 bias
            local = cfg.num_moe_experts // cfg.expert_model_parallel_size
            split = expert_tensor_parallel_size(cfg) > 1
            per_layer += cfg.num_moe_experts * cfg.hidden_size + split * local * bias
        total += layers * per_layer
    if pp_rank == setup.pp - 1:  # eh_proj and the norms of multi-token prediction
        total += mtp_partial_gradient_params(cfg)
    return total + (rank_params(cfg, pp_rank).final_norm if cfg.sequence_parallel else 0)


def shard_grad_bytes(setup: Setup, elements: int) -> float:
    """Bytes of the reduced gradients of ``elements`` parameter elements on one rank: the
    gradient buffer's, or under FSDP its fp32 shard of them."""
    if setup.fully_sharded:
        return FP32 * elements / setup.gradient_group_size
    return setup.grad_bytes * elements
