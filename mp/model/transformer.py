"""Pre-norm transformer layers and the block that stacks them (with activation recompute)."""

from __future__ import annotations

import torch
from torch import nn

from mp.model.attention import SelfAttention
from mp.model.attention_masks import mask_for_layers
from mp.model.config import TransformerConfig
from mp.model.dropout import bias_dropout_add
from mp.model.fp8_layers import fp8_recipe
from mp.model.inference import InferenceParams
from mp.model.mla import MLASelfAttention
from mp.model.mlp import MLP, checkpointed
from mp.model.moe import MoELayer
from mp.model.norm import build_norm
from mp.tensor_parallel import CheckpointWithoutOutput, checkpoint


class TransformerLayer(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, each with bias-dropout-add; the
    ``mlp`` is a mixture of experts (`mp.model.moe`) in the layers the config says.

    ``hidden [s, b, h]`` (``[s / t, b, h]`` with sequence parallelism) in and out. With
    ``fp32_residual_connection`` it is fp32 while the layer computes in the parameters'
    dtype: the norms return that dtype (`mp.fused.normalization`), and each residual add
    promotes back to fp32.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, group=None,
                 moe: bool | None = None):
        """``moe``: experts or not (default: as the config says of layer ``layer_number``)."""
        super().__init__()
        self.config = config
        self.layer_number = layer_number  # 1-based, over the whole model
        self.input_layernorm = build_norm(config)
        attention = MLASelfAttention if config.multi_latent_attention else SelfAttention
        self.self_attention = attention(config, group, layer_number)
        self.pre_mlp_layernorm = build_norm(config)
        if moe is None:
            moe = config.is_moe_layer(layer_number - 1)
        self.mlp = (MoELayer(config, group, layer_index=layer_number - 1) if moe
                    else MLP(config, group, fp8=fp8_recipe(config, layer_number)))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        def attention(x):
            return self.self_attention(x, attention_mask, rotary_freqs, inference_params)
        out, bias = self._after_norm(self.input_layernorm, hidden, attention)
        hidden = self._bias_dropout_add(out, bias, hidden)
        out, bias = self._after_norm(self.pre_mlp_layernorm, hidden, self._mlp)
        return self._bias_dropout_add(out, bias, hidden)

    def _after_norm(self, norm: nn.Module, hidden: torch.Tensor, run):
        """``run(norm(hidden))``, an ``(output, bias)`` pair. With ``layernorm`` among the
        recompute modules the norm's output is not kept for backward (the projections after it
        would keep it) but recomputed from ``hidden`` once the output's gradient arrives
        (`CheckpointWithoutOutput`)."""
        if not (self.config.recomputes("layernorm") and self.training
                and torch.is_grad_enabled()):
            return run(norm(hidden))
        normed = CheckpointWithoutOutput()
        out, bias = run(normed.checkpoint(norm, hidden))
        normed.discard_output_and_register_recompute(out)
        return out, bias

    def _mlp(self, hidden: torch.Tensor):
        """The MLP, checkpointed with ``mlp`` among the recompute modules (``moe`` for a
        mixture of experts)."""
        module = "moe" if isinstance(self.mlp, MoELayer) else "mlp"
        if self.config.recomputes(module) and self.training:
            return checkpointed(self.mlp, hidden)
        return self.mlp(hidden)

    def _bias_dropout_add(self, x, bias, residual):
        cfg = self.config
        return bias_dropout_add(x, bias, residual, cfg.hidden_dropout, self.training,
                                cfg.sequence_parallel, cfg.bias_dropout_fusion)


class TransformerBlock(nn.Module):
    """The layers of one pipeline chunk, and the final norm on the last one.

    ``layers``: the 0-based indices over the whole model of the chunk's layers (default
    `TransformerConfig.chunk_layers` of the first chunk: every layer without pipelining).

    Full activation recompute (Megatron's ``recompute_granularity='full'``) keeps only chunk
    inputs: ``uniform`` checkpoints every group of ``recompute_num_layers`` consecutive layers;
    ``block`` checkpoints each of the first ``recompute_num_layers`` layers and runs the rest
    normally. ``selective`` recompute (Megatron's ``recompute_modules``) happens inside each
    layer: the norms and the MLP here, the attention's core and up projections in the
    attention, the experts' activation and shared experts in `mp.model.moe`.
    """

    def __init__(self, config: TransformerConfig, post_process: bool = True,
                 layers: range | None = None, group=None):
        super().__init__()
        self.config = config
        self.group = group
        self.layers = nn.ModuleList(
            TransformerLayer(config, index + 1, group)
            for index in (config.chunk_layers() if layers is None else layers))
        if config.compile_layers:  # in place: parameter names and hooks stay as they are
            for layer in self.layers:
                layer.compile()
        self.final_layernorm = build_norm(config) if post_process else None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None,
                final_norm: bool = True) -> torch.Tensor:
        """``final_norm=False`` leaves the final norm to the caller (multi-token
        prediction reads the hidden states before it)."""
        cfg = self.config
        if attention_mask is not None:
            attention_mask = mask_for_layers(attention_mask, cfg, cfg.params_dtype)
        if cfg.recompute_granularity == "full" and self.training:
            hidden = self._recomputed(hidden, attention_mask, rotary_freqs)
        else:
            for layer in self.layers:
                hidden = layer(hidden, attention_mask, rotary_freqs, inference_params)
        if self.final_layernorm is None or not final_norm:
            return hidden
        return self.final_layernorm(hidden)

    def _recomputed(self, hidden, attention_mask, rotary_freqs):
        cfg = self.config
        n = cfg.recompute_num_layers

        def run(start: int, end: int):
            def chunk(x, mask, freqs):
                for layer in self.layers[start:end]:
                    x = layer(x, mask, freqs)
                return x
            return chunk

        num = len(self.layers)
        step = n if cfg.recompute_method == "uniform" else 1
        for start in range(0, num, step):
            end = min(start + step, num)
            if cfg.recompute_method == "uniform" or start < n:
                hidden = checkpoint(run(start, end), cfg.distribute_saved_activations, hidden,
                                    attention_mask, rotary_freqs, group=self.group)
            else:
                hidden = run(start, end)(hidden, attention_mask, rotary_freqs)
        return hidden
