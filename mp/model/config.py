"""``TransformerConfig``: the shape of a GPT and how it is split and computed.

Field names follow Megatron-Core's ``TransformerConfig`` / ``ModelParallelConfig`` so ported
code and configs read the same. ``__post_init__`` fills the sizes left to their defaults and
checks everything, before any process group exists, with messages that name the value and
the rule (`mp.model.config_check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mp.model.config_check import PRECISIONS, complete_and_check
from mp.model.layer_pattern import moe_layer_pattern
from mp.model.parallel_rules import interleaved_microbatches_rule
from mp.model.pipeline_split import chunk_layer_counts, chunk_layer_range


@dataclass
class TransformerConfig:
    # shape
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    kv_channels: int | None = None  # size of one attention head (Megatron's --kv-channels);
    # default hidden / heads. Queries are heads x kv_channels wide, the output projection maps
    # that back to hidden_size.
    num_query_groups: int | None = None  # key/value heads (grouped-query attention); default
    # one per query head (multi-head attention), 1 for multi-query attention
    ffn_hidden_size: int | None = None  # default 4h (GeLU) or 8h/3 rounded up to 64 (SwiGLU)
    max_position_embeddings: int | None = None  # default seq_length
    make_vocab_size_divisible_by: int = 128
    # architecture
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    normalization_impl: str = "mp"  # mp (mp.fused: kernel when built, else torch) | apex
    layernorm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False  # every norm scales by 1 + weight and its weight
    # starts at 0 (Megatron's --apply-layernorm-1p); LayerNorm and RMSNorm, mp's or apex's
    activation: str = "gelu"  # gelu | gelu_tanh (GPT-2's gelu_new, Megatron's --openai-gelu)
    # | swiglu | squared_relu (relu(x)^2, Megatron's --squared-relu) | quick_geglu (gpt-oss's
    # gated unit, Megatron's --quick-geglu: g sigmoid(1.702 g) times the linear half)
    activation_func_clamp_value: float | None = None  # gated units: the gate half clamped to
    # at most this, the linear half to [-this, this], after the biases (Megatron's
    # --activation-func-clamp-value; gpt-oss: 7)
    glu_linear_offset: float = 0.0  # gated units: this added to the linear half after the
    # clamp (Megatron's --glu-linear-offset; gpt-oss: 1)
    softmax_type: str = "vanilla"  # attention softmax (Megatron's --softmax-type): vanilla |
    # off-by-one (a 0 logit joins every row's denominator) | learnable (a learned logit per
    # head, "attention sinks", gpt-oss's: core_attention.softmax_offset [heads], split over TP)
    qk_layernorm: bool = False  # normalize each query and key head over its kv_channels
    # (Megatron's --qk-layernorm): one q_layernorm and one k_layernorm shared by all heads
    qk_l2_norm: bool = False  # Llama 4's L2 norm of each query and key head instead (Megatron's
    # --qk-l2-norm): x / sqrt(mean(x^2) + layernorm_epsilon) over its kv_channels, in fp32,
    # no weights, after the projection and before RoPE, in every layer
    window_size: list[int] | str | None = None  # sliding-window attention (Megatron's
    # --window-size left,right): a query attends to its own key and the `left` keys before it;
    # right must be 0 (a GPT is causal). None: to every earlier key
    window_attn_skip_freq: int | list[int] | str | None = None  # which layers slide: None:
    # all; N: all but every N-th (the 1-based layer numbers N divides attend fully); or a 0/1
    # per layer, 1 = sliding (Megatron's expression of one too: "([1]*3+[0])*2")
    no_rope_freq: int | list[int] | str | None = None  # layers that skip RoPE ("NoPE", Llama
    # 4's; Megatron's --no-rope-freq): None: none; N: every N-th (the 1-based layer numbers N
    # divides; N must divide num_layers); or a 0/1 per layer, 1 = no RoPE (Megatron's
    # expression of one too: "([0]*3+[1])*2"). Needs position_embedding_type rope
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | none (no
    # position information but the causal mask, "NoPE"; Megatron's --no-position-embedding)
    rotary_base: float = 10000.0
    use_rope_scaling: bool = False  # Llama 3.1's RoPE frequency scaling (mp.model.rope)
    rope_scaling_factor: float = 8.0
    rotary_seq_len_interpolation_factor: float | None = None  # RoPE at positions / this
    # (linear position interpolation, Megatron's --rotary-seq-len-interpolation-factor)
    rope_type: str = "rope"  # or "yarn": YaRN's frequencies (Peng et al. 2023, DeepSeek's
    # long-context RoPE; mp.model.rope.yarn_frequencies) with the yarn_* constants below
    yarn_rotary_scaling_factor: float = 1.0  # the context's extension (Megatron's
    # --rotary-scaling-factor)
    yarn_original_max_position_embeddings: int = 4096  # the context pretraining used
    yarn_beta_fast: float = 32.0  # pairs turning more than this often over it keep their
    yarn_beta_slow: float = 1.0  # frequency, less than this are interpolated, ramp between
    yarn_mscale: float = 1.0  # the rotated channels scale by m(mscale) / m(mscale_all_dim)
    yarn_mscale_all_dim: float = 0.0  # and the scores by m(mscale_all_dim)^2, with
    # m(x) = 0.1 x ln(factor) + 1 (DeepSeek's; Megatron's --mscale, --mscale-all-dim)
    yarn_correction_range_round_to_int: bool = True  # the ramp's ends rounded outwards to
    # whole pairs (DeepSeek's); false: left fractional (gpt-oss's, Hugging Face's "truncate":
    # false; Megatron's --no-yarn-correction-range-round-to-int)
    rotary_interleaved: bool = False  # RoPE turns channels 2i and 2i + 1 together (GPT-J's;
    # Megatron's --rotary-interleaved), not i and i + r / 2
    rotary_percent: float = 1.0  # RoPE rotates the first int(kv_channels x this) channels of
    # each head, frequencies over those (Megatron's --rotary-percent); the rest pass unchanged
    # multi-latent attention (DeepSeek-V2's; mp.model.mla, Megatron's --multi-latent-attention):
    # keys and values from a small latent per token, queries from another (or the hidden state),
    # each head's query and key holding qk_head_dim channels without position information and
    # qk_pos_emb_head_dim rotated by RoPE (the key's shared by all heads); the query groups
    # and rotary_percent do not apply, kv_channels defaults to a query head's width
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None  # the queries' latent width; None: projected from h
    kv_lora_rank: int = 512  # the keys' and values' latent width
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # multi-token prediction (DeepSeek-V3's; mp.model.mtp, Megatron's --mtp-num-layers)
    mtp_num_layers: int | None = None  # depths after the last layer, each predicting one
    # token further ahead; None: none
    mtp_loss_scaling_factor: float = 0.1  # their mean loss's weight in the gradients
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # the QKV projection has a bias even without add_bias_linear
    # (Megatron's --add-qkv-bias; Qwen2's attention)
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    embedding_init_method_std: float | None = None  # the embeddings' N(0, std) instead, and
    # then no weight decay on them (Megatron's --embedding-init-method-std; mp.model.init)
    init_method_xavier_uniform: bool = False  # Glorot's uniform for every weight matrix
    # instead of N(0, init_method_std) (Megatron's --init-method-xavier-uniform)
    attention_backend: str = "sdpa"  # sdpa (flash on GPU) | unfused (matmul, softmax, matmul)
    masked_softmax_fusion: bool = True  # unfused backend: use mp.fused's kernel when built
    bias_dropout_fusion: bool = True  # bias-dropout-add compiled into one kernel (mp.jit)
    bias_activation_fusion: bool = True  # fc1 bias + GeLU/SwiGLU compiled likewise (mp.jit)
    cross_entropy_loss_fusion: bool = True  # loss and its gradient compiled (mp.jit)
    compile_layers: bool = False  # each transformer layer through torch.compile
    # parallelism and memory
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    microbatch_group_size_per_vp_stage: int | None = None  # interleaved: each chunk runs
    # this many consecutive micro-batches before the next (Megatron's
    # --microbatch-group-size-per-virtual-pipeline-stage); None: PP; unused without VPP
    context_parallel_size: int = 1  # each sequence split over this many ranks
    # (mp.model.context_parallel; Megatron's --context-parallel-size)
    cp_comm_type: str = "all_gather"  # or "a2a", "p2p", "a2a+p2p": how attention crosses CP
    hierarchical_context_parallel_sizes: list[int] | None = None  # a2a+p2p's [A, P], A x P =
    # CP: all-to-all in A consecutive CP ranks, the ring across (Megatron's flag of this name)
    # uneven pipeline splits (mp.model.pipeline_split); default: L / (PP x VPP) layers a chunk
    num_layers_in_first_pipeline_stage: int | None = None  # Megatron's
    # --decoder-first-pipeline-num-layers; the middle stages share what first and last leave
    num_layers_in_last_pipeline_stage: int | None = None  # --decoder-last-pipeline-num-layers
    account_for_embedding_in_pipeline_split: bool = False  # the embedding counts as a layer
    account_for_loss_in_pipeline_split: bool = False  # the output layer and loss count as one
    pipeline_model_parallel_layout: str | None = None  # every chunk written out ("Et*3|...|tL",
    # Megatron's --pipeline-model-parallel-layout); its chunks / PP are the virtual stages
    sequence_parallel: bool = False
    # mixture of experts (mp.model.moe; Megatron's --num-experts, --moe-*)
    num_moe_experts: int | None = None  # experts per MoE layer; None: every MLP is dense
    moe_layer_freq: int | list[int] | str = 1  # MoE every this-many-th layer (0-based index
    # divisible by it), or a 0/1 flag per layer, or Megatron's expression of one:
    # "([0]*3+[1]*58)" (3 dense layers, then MoE)
    moe_router_topk: int = 2  # experts each token goes to
    moe_ffn_hidden_size: int | None = None  # an expert's hidden size; default ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None  # a dense MLP this wide beside the
    # routed experts, every token through it (DeepSeek's shared experts, their widths summed)
    moe_shared_expert_gate: bool = False  # their output times sigmoid(x . gate_weight) per
    # token (Qwen2-MoE's; Megatron's --moe-shared-expert-gate)
    moe_router_dtype: str | None = None  # fp32 | fp64: the router's matrix product in this
    # dtype (Megatron's --moe-router-dtype); None: the model's, the softmax in fp32 either way
    moe_router_score_function: str = "softmax"  # or "sigmoid": each expert's score on its own,
    # the top k's renormalized to sum to 1 (DeepSeek-V3's)
    moe_router_topk_scaling_factor: float | None = None  # the k weights times this
    moe_input_jitter_eps: float | None = None  # in training the router's input times noise
    # uniform in [1 - eps, 1 + eps] (the Switch Transformer's, Megatron's --moe-input-jitter-eps)
    moe_router_force_load_balancing: bool = False  # route by random N(0, 1) logits, their
    # gradient passed to the real ones (benchmarks: balanced loads whatever the weights)
    moe_apply_probs_on_input: bool = False  # top-1: the expert takes its token times the
    # router's probability and its output is not weighted (Llama 4's)
    moe_per_layer_logging: bool = False  # TensorBoard / W&B also get each MoE layer's
    # auxiliary losses, moe/{name}_layer_{i} (Megatron's --moe-per-layer-logging)
    moe_router_enable_expert_bias: bool = False  # sigmoid: choose by score + a per-expert bias
    # that follows the load instead of by an auxiliary loss (DeepSeek-V3's aux-loss-free
    # balancing; the bias is not a weight: it moves by the rate below each iteration)
    moe_router_bias_update_rate: float = 1e-3
    moe_router_bias: bool = False  # a learned bias [E] on the router's logits (gpt-oss's;
    # Megatron-Core's router.bias, which Megatron-Core after 0.14 adds whenever
    # add_bias_linear: mp adds it by this flag only, so add_bias_linear MoE models and their
    # checkpoints stay 0.14's)
    moe_router_num_groups: int | None = None  # the experts in this many groups, a token's top
    moe_router_group_topk: int | None = None  # k taken from this many of them (DeepSeek's)
    moe_grouped_gemm: bool = False  # experts as torch grouped GEMMs where they run; else a loop
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top k (the k
    # probabilities sum to less than 1); default top k of the logits, then softmax over those
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss (Switch's) | seq_aux_loss
    # (the same per sequence, averaged: DeepSeek-V2's) | global_aux_loss (over every DP
    # rank's micro-batch, Megatron's) | none
    moe_aux_loss_coeff: float = 0.0  # weight of the load-balancing loss
    moe_z_loss_coeff: float | None = None  # weight of the router z-loss (ST-MoE); None: none
    moe_expert_capacity_factor: float | None = None  # an expert takes at most this x its share
    # of a rank's routed copies, the rest dropped (mp.model.moe.capacity); None: dropless
    moe_token_drop_policy: str = "probs"  # the copies it keeps: probs (likeliest) | position
    expert_model_parallel_size: int = 1  # EP: the experts split over this many DP ranks
    expert_tensor_parallel_size: int | None = None  # ETP: None or TP (experts split as the
    # rest of the layer) | 1 (each expert whole; needs sequence_parallel, EP a multiple of TP)
    overlap_p2p_comm: bool = False  # interleaved pipeline: p2p under compute (pipelined.py)
    recompute_granularity: str | None = None  # None | full (whole layers) | selective (parts
    # of each layer: recompute_modules)
    recompute_modules: list[str] | None = None  # selective: what (RECOMPUTE_MODULES); None:
    # ["core_attn"], Megatron's default
    recompute_method: str | None = None  # full: uniform | block
    recompute_num_layers: int | None = None  # full: layers per chunk (uniform) or count (block)
    distribute_saved_activations: bool = False
    # numerics
    precision: str = "fp32"  # fp32 | bf16 | fp16 (parameters and activations)
    fp32_residual_connection: bool = False  # bf16/fp16: the residual stream (embedding output,
    # layer inputs and outputs, pipeline sends) in fp32; norms take it and return the precision
    # (Megatron's --fp32-residual-connection)
    fp8: str | None = None  # FP8 products in the transformer layers' dense linears (Megatron's
    # --fp8-format): e4m3 | hybrid (e5m2 gradients); which layers: mp.model.fp8_layers
    fp8_recipe: str = "tensorwise"  # per-tensor current scaling, the one mp has (Megatron's
    # default is delayed; mp.tensor_parallel.fp8)
    fp8_wgrad: bool = True  # the weight gradient's product in FP8 too (--no-fp8-wgrad: false)
    first_last_layers_bf16: bool = False  # keep the first num_layers_at_start_in_bf16 and the
    num_layers_at_start_in_bf16: int = 1  # last num_layers_at_end_in_bf16 layers out of FP8
    num_layers_at_end_in_bf16: int = 1

    def __post_init__(self):
        complete_and_check(self)

    def recomputes(self, module: str) -> bool:
        """Whether selective recompute covers ``module`` (one of `RECOMPUTE_MODULES`)."""
        return self.recompute_granularity == "selective" and module in self.recompute_modules

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based over the model) has experts instead of an MLP."""
        return bool(moe_layer_pattern(self.num_layers, self.num_moe_experts,
                                      self.moe_layer_freq)[index])

    def attention_window(self, layer_number: int) -> int | None:
        """The keys before its own that a query of layer ``layer_number`` (1-based over the
        model) attends to: ``window_size[0]`` where the layer slides, None for every one.
        Multi-token prediction's depths attend as the last layer does."""
        if self.window_size is None:
            return None
        number, freq = min(layer_number, self.num_layers), self.window_attn_skip_freq
        slides = (freq is None or (freq[number - 1] == 1 if isinstance(freq, list)
                                   else number % freq != 0))
        return self.window_size[0] if slides else None

    def applies_rope(self, layer_number: int) -> bool:
        """Whether RoPE rotates the queries and keys of layer ``layer_number`` (1-based over
        the model): with RoPE, in every layer but ``no_rope_freq``'s. Multi-token prediction's
        depths rotate as the last layer does."""
        if self.position_embedding_type != "rope":
            return False
        number, freq = min(layer_number, self.num_layers), self.no_rope_freq
        if freq is None:
            return True
        return freq[number - 1] == 0 if isinstance(freq, list) else number % freq != 0

    @property
    def microbatch_group_size(self) -> int:
        """Consecutive micro-batches each model chunk runs in the interleaved schedule:
        ``microbatch_group_size_per_vp_stage``, by default the pipeline size (Megatron's)."""
        return self.microbatch_group_size_per_vp_stage or self.pipeline_model_parallel_size

    def interleaved_microbatches_rule(self, num_microbatches: int) -> str | None:
        """What Megatron's interleaved schedule asks of ``num_microbatches`` (m) with groups
        of N = `microbatch_group_size`, as a phrase ("to be ..."), or None when m is fine or
        there are no virtual stages. See `interleaved_microbatches_rule` (the function)."""
        if self.virtual_pipeline_model_parallel_size is None:
            return None
        return interleaved_microbatches_rule(num_microbatches, self.pipeline_model_parallel_size,
                                             self.microbatch_group_size)

    @property
    def gated_linear_unit(self) -> bool:
        """Whether the MLPs are gated (Megatron's name): SwiGLU or quick GeGLU, each with a
        gate projection beside fc1."""
        return self.activation in ("swiglu", "quick_geglu")

    # --- derived sizes ---------------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        """Channels of a head that RoPE rotates (the first ones; Megatron's rounding; under
        multi-latent attention the ``qk_pos_emb_head_dim`` channels that hold positions)."""
        if self.multi_latent_attention:
            return self.qk_pos_emb_head_dim
        return int(self.kv_channels * self.rotary_percent)

    @property
    def query_projection_size(self) -> int:
        """Width of all query heads together, ``a d`` (Megatron's name): the attention output
        projection's input (``h`` by default; ``a v_head_dim`` under multi-latent attention)."""
        if self.multi_latent_attention:
            return self.num_attention_heads * self.v_head_dim
        return self.num_attention_heads * self.kv_channels

    @property
    def softmax_scale(self) -> float:
        """The attention scores' scale, one over the square root of a query's width."""
        width = (self.qk_head_dim + self.qk_pos_emb_head_dim if self.multi_latent_attention
                 else self.kv_channels)
        return yarn_mscale(self, self.yarn_mscale_all_dim) ** 2 / math.sqrt(width)

    @property
    def yarn_arguments(self) -> dict | None:
        """`mp.model.rope.yarn_frequencies`'s arguments with ``rope_type='yarn'``."""
        if self.rope_type != "yarn":
            return None
        return {"factor": self.yarn_rotary_scaling_factor,
                "original_context": self.yarn_original_max_position_embeddings,
                "beta_fast": self.yarn_beta_fast, "beta_slow": self.yarn_beta_slow,
                "round_to_int": self.yarn_correction_range_round_to_int}

    @property
    def rotary_magnitude(self) -> float:
        """What RoPE multiplies the rotated channels by: 1 but under YaRN."""
        return yarn_mscale(self, self.yarn_mscale) / yarn_mscale(self, self.yarn_mscale_all_dim)

    @property
    def qkv_size(self) -> int:
        """Outputs of the fused QKV projection: a query per head, a key and a value per
        query group, each ``kv_channels`` wide (``h + 2 g h / a`` by default)."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * TP``
        (Megatron's rule), so every TP rank holds an equal, aligned slice."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return math.ceil(self.vocab_size / multiple) * multiple

    @property
    def chunk_layer_counts(self) -> tuple[tuple[int, ...], ...]:
        """``counts[r][c]``: transformer layers of chunk ``c`` (a virtual stage) of pipeline
        stage ``r``; even unless an uneven split is set (`mp.model.pipeline_split`)."""
        return chunk_layer_counts(
            self.num_layers, self.pipeline_model_parallel_size,
            self.virtual_pipeline_model_parallel_size, self.num_layers_in_first_pipeline_stage,
            self.num_layers_in_last_pipeline_stage, self.account_for_embedding_in_pipeline_split,
            self.account_for_loss_in_pipeline_split, self.pipeline_model_parallel_layout)

    def chunk_layers(self, pp_rank: int = 0, chunk: int = 0) -> range:
        """0-based indices over the whole model of the layers of ``chunk`` on ``pp_rank``."""
        return chunk_layer_range(self.chunk_layer_counts, pp_rank, chunk)

    def stage_layers(self, pp_rank: int) -> list[int]:
        """0-based indices over the whole model of the layers of every chunk of ``pp_rank``."""
        return [index for chunk in range(len(self.chunk_layer_counts[pp_rank]))
                for index in self.chunk_layers(pp_rank, chunk)]

    def stage_num_layers(self, pp_rank: int) -> int:
        """Transformer layers of pipeline stage ``pp_rank``, all its chunks together."""
        return sum(self.chunk_layer_counts[pp_rank])

    @property
    def params_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


def yarn_mscale(config: TransformerConfig, mscale: float) -> float:
    """YaRN's magnitude ``0.1 mscale ln(factor) + 1`` (1 without YaRN or extension)."""
    factor = config.yarn_rotary_scaling_factor
    if config.rope_type != "yarn" or factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
