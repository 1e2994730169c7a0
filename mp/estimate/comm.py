"""Bytes each collective moves in one iteration, per rank (their time on the wire is
`mp.estimate.collective`'s).

`collectives` lists what one rank of pipeline stage ``pp_rank`` calls in an iteration of ``m``
micro-batches (forward and backward of each, then the gradient reduction and the optimizer
step), following mp's code call by call. ``a`` is one ``[s, b, h]`` activation in the model's
dtype; ``c`` column-parallel layers per transformer layer (QKV, fc1, and SwiGLU's gate), two
row-parallel ones (attention output, fc2):

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
- Mixture of experts: `mp.estimate.expert_comm` (the tokens' exchanges, the routers' sums).
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
  fp32 gradients ``c`` times (the last brings the gradients home). The last stage
  all-reduces each micro-batch's loss sum and token count (two fp32 values) over CP.
- DP, once: the gradient buffer, ``g P`` all-reduced; with the distributed optimizer
  reduce-scattered, then the updated parameters (``e P``) all-gathered, but for the word
  embedding's pair kept over the first and last stage (below), whose bucket of its own is
  all-reduced. With CP the gradients are reduced over DP x CP (group ``dp_cp``). With N
  distributed-optimizer instances the reduce-scatter and the all-gather run inside the
  instance (``intra_dp_cp``, DP x CP / N ranks; experts ``intra_edp``, EDP / N), and each
  rank's reduced shard, ``g P / (DP x CP / N)``, is all-reduced across the instances
  (``inter_dist_opt``, N ranks; the experts' shard too).
- PP: each chunk's output forward and its gradient backward, ``e s b h`` (``/ t`` with SP;
  ``e`` = 4 with ``fp32_residual_connection``, whose residual stream the stages send);
  once per iteration, the word-embedding gradients of the first stage and the last stage's
  copy (tied embeddings, or multi-token prediction's), ``g V h / t``, over the embedding
  group.

Gradients are read from the buffers, ``g`` bytes an element: 4 (fp32), or 2 with
``grad_reduce_in_bf16`` (`Setup.grad_bytes`).
- FSDP (``Setup.fully_sharded``, `mp.distributed.torch_fsdp2`) instead of the DP rows: in
  every micro-batch each unit's weights, ``e P`` in all, all-gathered over DP (x CP) for its
  forward and, with ``reshard_after_forward``, again for its backward (with full recompute,
  for the rerun of its forward, which keeps it for its backward), under any schedule (the
  wrapper sets FSDP2's backward prefetch, `mp.distributed.torch_fsdp2`), and its gradients,
  ``g P``, reduce-scattered; the TP and embedding-group all-reduces above then move each
  rank's fp32 shard, ``4 / (DP x CP)`` bytes an element (each tensor's rows padded to a
  multiple of DP x CP by FSDP is left out).
- Model-parallel group, once: the gradient norm, one fp32 scalar (over every rank with the
  distributed optimizer or FSDP, whose data-parallel shards add to it; over one instance's ranks,
  ``intra_dist_opt``, with several instances, which hold the same shards).

Bytes follow `mp.estimate.measure`: an all-reduce moves its tensor; an all-gather its
gathered output; a reduce-scatter its full input. Every row is checked against mp's code (TP,
DP with and without the distributed optimizer, pipeline with 1F1B and interleaving, tied
embeddings, multi-token prediction, the norm); the distributed optimizer's padding of each
bucket to a multiple of DP elements is left out.
"""

from __future__ import annotations

from mp.estimate.collective import FP64, Collective
from mp.estimate.expert_comm import expert_collectives
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
    local_tokens,
    residual_bytes,
    sequence_rows,
)
from mp.model.aux_losses import tracked_names


def collectives(setup: Setup, pp_rank: int = 0, logging: bool = False) -> list[Collective]:
    """Every collective one rank of stage ``pp_rank`` calls in one iteration (module doc).
    ``logging`` adds what `mp.training.training.train_step` does to report the loss: on the
    last stage, the all-reduce over DP of its numerator and denominator (two float64 values,
    `mp.training.evaluation.average_losses`; its ``broadcast_object_list`` to the other stages
    is not modelled)."""
    cfg = setup.model
    out: list[Collective] = []
    if setup.tp > 1:
        out += _tensor_parallel(setup, pp_rank)
    if setup.cp > 1:
        out += _context_parallel(setup, pp_rank)
    moe_layers, moe_forwards = _stage_layers(setup, pp_rank)[True]
    if cfg.recomputes("moe"):  # the layers' dispatch and combine again
        moe_forwards += moe_layers
    if moe_layers:
        out += expert_collectives(setup, moe_layers, moe_forwards)
    out += _data_parallel(setup, pp_rank)
    if setup.pp > 1:
        out += _pipeline(setup, pp_rank)
    instances = setup.distributed_optimizer_instances
    if setup.distributed_optimizer or setup.fully_sharded:  # the shards add up too
        if setup.world_size > instances:
            out.append(Collective("gradient norm", "all_reduce",
                                  "world" if instances == 1 else "intra_dist_opt", FP32))
    else:
        if setup.ep > 1 and rank_params(cfg, pp_rank).experts:
            out.append(Collective("gradient norm (experts)", "all_reduce", "ep", FP32))
        if setup.tp * setup.pp > 1:
            out.append(Collective("gradient norm", "all_reduce", "mp", FP32))
    if logging:
        out += _logging(setup, pp_rank)
    return [c for c in out if c.bytes > 0]


def _data_parallel(setup: Setup, pp_rank: int) -> list[Collective]:
    """The gradient reduction over DP (x CP) and, with the distributed optimizer, the
    parameter all-gather: dense parameters' and experts' (module doc); FSDP's gathers and
    reduce-scatters."""
    cfg, out = setup.model, []
    if setup.fully_sharded:
        return _fully_sharded(setup, pp_rank)
    params = rank_params(cfg, pp_rank)
    dense_group = "dp_cp" if setup.cp > 1 else "dp"
    synced = _embedding_group_elements(setup, pp_rank)
    several = setup.distributed_optimizer_instances > 1
    for what, group, elements, size, intra, shard_size in (
            ("", dense_group, params.total - params.experts, setup.gradient_group_size,
             "intra_dp_cp", setup.optimizer_shard_size),
            ("expert ", "edp" if setup.ep > 1 else dense_group, params.experts,
             setup.expert_data_parallel_size, "intra_edp" if setup.ep > 1 else "intra_dp_cp",
             setup.expert_optimizer_shard_size)):
        if size == 1:
            continue
        shard_group = intra if several else group
        grads = setup.grad_bytes * elements
        if not setup.distributed_optimizer:
            out.append(Collective(f"{what}gradients", "all_reduce", group, grads))
            continue
        sharded = grads - setup.grad_bytes * (synced if not what else 0)
        if shard_size > 1:
            out += [Collective(f"{what}gradients (distributed optimizer)", "reduce_scatter",
                               shard_group, sharded),
                    Collective(f"updated {what}parameters (distributed optimizer)",
                               "all_gather", shard_group, activation_bytes(cfg) * elements)]
        if several:  # the reduced shard, across the instances
            out.append(Collective(f"{what}gradient shards (distributed optimizer instances)",
                                  "all_reduce", "inter_dist_opt", sharded / shard_size))
        if not what:  # the embedding pair's own bucket is all-reduced
            out.append(Collective("word-embedding gradients (distributed optimizer)",
                                  "all_reduce", group, grads - sharded))
    return out


def _fully_sharded(setup: Setup, pp_rank: int) -> list[Collective]:
    """FSDP over DP x CP (module doc): every micro-batch gathers each unit's weights in the
    model's dtype for its forward, and again for its backward under ``reshard_after_forward``
    (without it a unit stays gathered from its forward to its backward), and reduce-scatters
    its gradients; the same under 1F1B and interleaving (the wrapper's explicit backward
    prefetch targets only the units the running backward needs)."""
    if setup.gradient_group_size == 1:
        return []
    elements = rank_params(setup.model, pp_rank).total
    group, m = ("dp_cp" if setup.cp > 1 else "dp"), setup.num_microbatches
    gathers = m * (2 if setup.reshard_after_forward else 1)
    return [Collective("parameters (FSDP)", "all_gather", group,
                       gathers * activation_bytes(setup.model) * elements),
            Collective("gradients (FSDP)", "reduce_scatter", group,
                       m * setup.grad_bytes * elements)]


def _shard_grad_bytes(setup: Setup, elements: int) -> float:
    """Bytes of the reduced gradients of ``elements`` parameter elements on one rank: the
    gradient buffer's, or under FSDP its fp32 shard of them."""
    if setup.fully_sharded:
        return FP32 * elements / setup.gradient_group_size
    return setup.grad_bytes * elements


def _logging(setup: Setup, pp_rank: int) -> list[Collective]:
    out = []
    if pp_rank == setup.pp - 1 and setup.data_parallel_size > 1:
        out.append(Collective("reported loss (logging)", "all_reduce", "dp", 2 * FP64))
    tracked = 2 * FP64 * len(tracked_names(setup.model))  # (sum, count) of each
    for group, size in (("pp", setup.pp), ("dp", setup.data_parallel_size)):
        if size > 1:
            out.append(Collective("router and MTP losses (logging)", "all_reduce", group,
                                  tracked))
    return out


def _stage_layers(setup: Setup, pp_rank: int) -> dict[bool, tuple[int, int]]:
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
    row-parallel linear does, while under SP the dispatcher moves its rows (`_experts`)."""
    cfg = setup.model
    mlp_columns = 2 if cfg.gated_linear_unit else 1
    # multi-latent attention's up projections from latents: `mla.tensor_parallel_channels`
    qkv = 0 if cfg.multi_latent_attention and cfg.q_lora_rank is not None else 1
    if not moe:
        return qkv + mlp_columns, 2, 0
    shared = cfg.moe_shared_expert_intermediate_size is not None
    if cfg.sequence_parallel:  # the dispatcher moves the experts' rows (`_experts`)
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


def _tensor_parallel(setup: Setup, pp_rank: int) -> list[Collective]:
    cfg, m = setup.model, setup.num_microbatches
    act = activation_bytes(cfg) * local_tokens(cfg, setup.micro_batch_size) * cfg.hidden_size
    first, last = pp_rank == 0, pp_rank == setup.pp - 1
    gathers = scatters = reduces = 0
    for moe, (layers, forwards) in _stage_layers(setup, pp_rank).items():
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
        layers, forwards = map(sum, zip(*_stage_layers(setup, pp_rank).values()))
        if cfg.recomputes("mla_up_proj"):  # the latents' and RoPE channels' gathers again
            forwards += layers
        out += [Collective("MLA latents and key RoPE channels", kind, "tp",
                           m * act // cfg.hidden_size * channels)
                for kind, channels in tensor_parallel_channels(cfg, layers, forwards).items()]
    out.append(Collective("partial gradients of replicated parameters", "all_reduce", "tp",
                          _shard_grad_bytes(setup, _partial_gradient_params(setup, pp_rank))))
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


def _context_parallel(setup: Setup, pp_rank: int) -> list[Collective]:
    cfg, m = setup.model, setup.num_microbatches
    layers = cfg.stage_num_layers(pp_rank)
    forwards = layers + len(_recomputed_layers(setup, pp_rank))
    if cfg.recomputes("core_attn"):  # the recomputed core exchanges again
        forwards += layers
    e, b = activation_bytes(cfg), setup.micro_batch_size
    q, k, v = attention_widths(cfg)  # channels per token on the rank
    kv_block = local_tokens(cfg, b) * (k + v)
    if cfg.cp_comm_type == "a2a":  # q, k, v, then the attention output; back in backward
        exchanged = (e * local_tokens(cfg, b)
                     * (q + k + v + cfg.query_projection_size / setup.tp))
        out = [Collective("Q, K, V and attention output (heads for tokens)", "all_to_all", "cp",
                          m * (forwards + layers) * exchanged)]
    elif cfg.cp_comm_type == "p2p":  # K and V blocks around the ring, then their gradients
        c = setup.cp
        ring = m * kv_block * ((forwards + layers) * (c - 1) * e + layers * c * FP32)
        out = [Collective("K, V blocks and their gradients (ring)", kind, "cp", ring)
               for kind in ("send", "recv")]
    else:
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
    mixture-of-experts layer's router and experts' fc2 biases (each rank sees its share of
    the experts' outputs)."""
    cfg = setup.model
    bias = cfg.hidden_size if cfg.add_bias_linear else 0
    total = 0
    for moe, (layers, _) in _stage_layers(setup, pp_rank).items():
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
        if moe:
            local = cfg.num_moe_experts // cfg.expert_model_parallel_size
            per_layer += cfg.num_moe_experts * cfg.hidden_size + local * bias
        total += layers * per_layer
    if pp_rank == setup.pp - 1:  # eh_proj and the norms of multi-token prediction
        total += mtp_partial_gradient_params(cfg)
    return total + (rank_params(cfg, pp_rank).final_norm if cfg.sequence_parallel else 0)


def _pipeline(setup: Setup, pp_rank: int) -> list[Collective]:
    cfg, m, v = setup.model, setup.num_microbatches, setup.vpp
    tensor = (residual_bytes(cfg) * sequence_rows(cfg, setup.micro_batch_size)
              * cfg.hidden_size)
    first, last = pp_rank == 0, pp_rank == setup.pp - 1
    # each of the m v chunk passes sends its output on, except the model's last chunk, and
    # its input gradient back, except the model's first chunk
    sends = 2 * m * v - (m if last else 0) - (m if first else 0)
    out = [Collective("stage activations and gradients", "send", "pp", sends * tensor),
           Collective("stage activations and gradients", "recv", "pp", sends * tensor)]
    synced = _embedding_group_elements(setup, pp_rank)
    if synced:
        out.append(Collective("word-embedding gradients (first and last stage)", "all_reduce",
                              "embedding", _shard_grad_bytes(setup, synced)))
    return out


def _embedding_group_elements(setup: Setup, pp_rank: int) -> int:
    """Elements of the word embedding that the first and last stage keep equal by summing
    their gradients over the embedding group (`mp.model.stages`), on this stage: the
    matrix's shard ``V h / t`` on both when PP > 1 with tied embeddings or multi-token
    prediction (the last stage's copy), else none."""
    cfg = setup.model
    paired = not cfg.untie_embeddings_and_output_weights or cfg.mtp_num_layers is not None
    if setup.pp == 1 or not paired or 0 < pp_rank < setup.pp - 1:
        return 0
    return cfg.padded_vocab_size // setup.tp * cfg.hidden_size
