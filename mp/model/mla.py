"""Multi-latent attention (DeepSeek-AI 2024, DeepSeek-V2), heads split over tensor-parallel
ranks; Megatron-Core's ``MLASelfAttention``.

Each token's keys and values come from one small latent, ``c = kv_lora_rank`` wide, instead of
from the hidden state (decoding's key/value cache keeps the latent alone, `_through_latents`);
its queries from another, ``q_lora_rank`` wide, or straight from the hidden state. Positions
enter through separate channels: each head's query and key hold ``dn = qk_head_dim`` channels
without position information and ``dr = qk_pos_emb_head_dim`` rotated by RoPE, the key's
``dr`` shared by all heads; values are ``dv = v_head_dim`` wide. With ``a`` heads, ``np = a /
t`` on a rank::

    hidden [s, b, h]  ([s / t, b, h] with sequence parallelism)
      queries: linear_q_proj (column-parallel)                          h -> a (dn + dr)
           or: linear_q_down_proj (duplicated), q_layernorm             h -> q_lora_rank
               linear_q_up_proj (column-parallel)             q_lora_rank -> a (dn + dr)
      linear_kv_down_proj (duplicated)                       h -> c + dr (latent, key's RoPE)
      kv_layernorm, linear_kv_up_proj (column-parallel)                c -> a (dn + dv)
      q = [q_nope, rope(q_pe)], k = [k_nope, rope(k_pe) for every head]     [s, b, np, dn + dr]
      core attention (scale 1 / sqrt(dn + dr)) -> [s, b, np dv]
      dense (row-parallel)                                                      a dv -> h

The down projections and the latent norms are whole on every TP rank: each rank computes
them for the tokens it holds, and under sequence parallelism the up projections all-gather
the latents (``c``, ``q_lora_rank`` wide: cheaper than gathering ``h``). Their gradients are
then partial over TP and marked ``sequence_parallel``; without it every rank holds every token
and the up projections' all-reduced input gradients make them whole. The key's shared RoPE
channels reach every rank's heads through ``gather_from_sequence_parallel_region`` (SP) or
``copy_to_tensor_model_parallel_region``: either sums its gradient over the heads of every
rank. The projections inside have no bias (as DeepSeek's and Megatron's); ``dense`` has one
with ``add_bias_linear``.
"""

from __future__ import annotations

import torch

from mp.model.attention import Attention
from mp.model.config import TransformerConfig
from mp.model.inference import InferenceParams
from mp.model.init import init_method
from mp.model.norm import build_norm
from mp.model.rope import apply_rotary
from mp.tensor_parallel import (
    CheckpointWithoutOutput,
    ColumnParallelLinear,
    DuplicatedLinear,
    copy_to_tensor_model_parallel_region,
    divide,
    gather_from_sequence_parallel_region,
)


class MLASelfAttention(Attention):
    """`mp.model.attention.SelfAttention`'s arguments and result, ``(output, bias)``, by
    multi-latent attention; ``config.multi_latent_attention`` picks it."""

    def __init__(self, config: TransformerConfig, group=None, layer_number: int = 1):
        super().__init__(config, layer_number)
        sp, dtype, a = config.sequence_parallel, config.params_dtype, config.num_attention_heads
        dn, dr = config.qk_head_dim, config.qk_pos_emb_head_dim

        def column(inputs: int, outputs: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(inputs, outputs, bias=False, gather_output=False,
                                        init_method=init_method(config), sequence_parallel=sp,
                                        params_dtype=dtype, group=group)

        def duplicated(inputs: int, outputs: int) -> DuplicatedLinear:
            return DuplicatedLinear(inputs, outputs, bias=False, init_method=init_method(config),
                                    sequence_parallel=sp, params_dtype=dtype)

        if config.q_lora_rank is None:
            self.linear_q_proj = column(config.hidden_size, a * (dn + dr))
        else:
            self.linear_q_down_proj = duplicated(config.hidden_size, config.q_lora_rank)
            self.q_layernorm = build_norm(config, config.q_lora_rank)
            self.linear_q_up_proj = column(config.q_lora_rank, a * (dn + dr))
        self.linear_kv_down_proj = duplicated(config.hidden_size, config.kv_lora_rank + dr)
        self.kv_layernorm = build_norm(config, config.kv_lora_rank)
        self.linear_kv_up_proj = column(config.kv_lora_rank, a * (dn + config.v_head_dim))
        self.group = self.linear_kv_up_proj.group
        self.heads_per_partition = divide(a, self.linear_kv_up_proj.world_size,
                                          "num_attention_heads")
        self._build_output(group)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None):
        """With ``mla_up_proj`` among the recompute modules, everything from the latents to
        the queries, keys and values is recomputed in backward and its outputs are not kept
        (`CheckpointWithoutOutput`, freed once the attention core has read them)."""
        cfg = self.config
        # the queries' latent [s, b, q_lora_rank] (or the hidden state itself) and the keys'
        # and values' latent with the key's RoPE channels [s, b, c + dr]
        q_in = hidden if cfg.q_lora_rank is None else self.linear_q_down_proj(hidden)[0]
        kv_in, _ = self.linear_kv_down_proj(hidden)
        if inference_params is not None:
            return self._through_latents(*self._rotated(q_in, kv_in, rotary_freqs),
                                         attention_mask, inference_params)
        if not (cfg.recomputes("mla_up_proj") and self.training and torch.is_grad_enabled()):
            return self.attend(*self._queries_keys_values(q_in, kv_in, rotary_freqs),
                               attention_mask, None)
        up_projections = CheckpointWithoutOutput()
        q, k, v = up_projections.checkpoint(self._queries_keys_values, q_in, kv_in, rotary_freqs)
        context = self.context(q, k, v, attention_mask, None)
        up_projections.discard_output_and_register_recompute(context)
        return self.dense(context)

    def _rotated(self, q_in: torch.Tensor, kv_in: torch.Tensor,
                 rotary_freqs: torch.Tensor | None):
        """The latents (`forward`) -> ``q_nope [s, b, np, dn]``, ``q_pe [s, b, np, dr]``
        (rotated), the normalized latent ``[s, b, c]`` and ``k_pe [s, b, 1, dr]`` (rotated);
        ``s`` all the tokens under sequence parallelism."""
        cfg, heads = self.config, self.heads_per_partition
        dn, dr = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
        if cfg.q_lora_rank is None:
            q, _ = self.linear_q_proj(q_in)
        else:
            q, _ = self.linear_q_up_proj(self.q_layernorm(q_in))  # [s, b, np (dn + dr)]
        latent, k_pe = kv_in.split([cfg.kv_lora_rank, dr], dim=-1)
        latent = self.kv_layernorm(latent)
        if cfg.sequence_parallel:
            k_pe = gather_from_sequence_parallel_region(k_pe, group=self.group)
        else:
            k_pe = copy_to_tensor_model_parallel_region(k_pe, group=self.group)
        s, b = q.shape[:2]
        q_nope, q_pe = q.view(s, b, heads, dn + dr).split([dn, dr], dim=-1)
        k_pe = k_pe.view(s, b, 1, dr)
        if rotary_freqs is not None:
            magnitude = cfg.rotary_magnitude
            q_pe, k_pe = (apply_rotary(t, rotary_freqs, magnitude, cfg.rotary_interleaved)
                          for t in (q_pe, k_pe))
        return q_nope, q_pe, latent, k_pe

    def _queries_keys_values(self, q_in: torch.Tensor, kv_in: torch.Tensor,
                             rotary_freqs: torch.Tensor | None):
        """The latents (`forward`) -> ``q, k [s, b, np, dn + dr]``, ``v [s, b, np, dv]``."""
        q_nope, q_pe, latent, k_pe = self._rotated(q_in, kv_in, rotary_freqs)
        s, b, heads, dn = q_nope.shape
        dr, dv = q_pe.size(-1), self.config.v_head_dim
        kv, _ = self.linear_kv_up_proj(latent)  # [s, b, np (dn + dv)]
        k_nope, v = kv.view(s, b, heads, dn + dv).split([dn, dv], dim=-1)
        v = v.contiguous()  # what attention keeps, without the keys' channels beside it
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(s, b, heads, dr)), dim=-1)
        return q, k, v

    def _through_latents(self, q_nope, q_pe, latent, k_pe, attention_mask, inference_params):
        """Decoding with a key/value cache of the latents (DeepSeek-V2's absorbed form):
        the cache holds each token's normalized latent ``[b, c]`` and rotated key channels
        ``[b, dr]``, not every head's key and value. A head's key up projection ``W_k
        [dn, c]`` is folded into its query (``q_nope W_k``, ``c`` wide) and its value
        projection ``W_v [dv, c]`` applied after the weighted sum of latents, so
        ``softmax(scale (q_nope W_k latent + q_pe k_pe)) latent W_v^T`` is the attention of the
        uncached path. ``q_nope [s, b, np, dn]``, ``q_pe [s, b, np, dr]``, ``latent [s, b, c]``,
        ``k_pe [s, b, 1, dr]`` -> ``(output, bias)``."""
        if attention_mask is not None:
            raise ValueError("a key/value cache attends causally: attention_mask must be None")
        cfg, (s, b, heads, dn) = self.config, q_nope.shape
        mask = inference_params.causal_mask(s, q_nope.device)
        latent, k_pe = inference_params.update(self.layer_number, latent, k_pe[:, :, 0])
        if mask is None:  # nothing cached before: causal over the new tokens
            mask = torch.ones(s, s, dtype=torch.bool, device=q_nope.device).triu(1)[None, None]
        w = self.linear_kv_up_proj.weight.view(heads, dn + cfg.v_head_dim, -1)
        w_k, w_v = w[:, :dn], w[:, dn:]  # [np, dn, c], [np, dv, c]
        scores = (torch.einsum("sbhd,hdc,tbc->bhst", q_nope, w_k, latent)
                  + torch.einsum("sbhr,tbr->bhst", q_pe, k_pe)).float() * cfg.softmax_scale
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1).to(latent.dtype)
        context = torch.einsum("bhst,tbc,hvc->sbhv", probs, latent, w_v)
        return self.dense(context.reshape(s, b, heads * cfg.v_head_dim))
