"""Pre-norm transformer layers and the block that stacks them (with activation recompute)."""

from __future__ import annotations

import torch
from torch import nn

from mp.model.attention import SelfAttention, mask_for_layers
from mp.model.config import TransformerConfig
from mp.model.dropout import bias_dropout_add
from mp.model.inference import InferenceParams
from mp.model.mla import MLASelfAttention
from mp.model.mlp import MLP
from mp.model.moe import MoELayer
from mp.model.norm import build_norm
from mp.tensor_parallel import checkpoint


class TransformerLayer(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, each with bias-dropout-add; the
    ``mlp`` is a mixture of experts (`mp.model.moe`) in the layers the config says.

    ``hidden [s, b, h]`` (``[s / t, b, h]`` with sequence parallelism) in and out.
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
        self.mlp = MoELayer(config, group) if moe else MLP(config, group)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        out, bias = self.self_attention(self.input_layernorm(hidden), attention_mask,
                                        rotary_freqs, inference_params)
        hidden = self._bias_dropout_add(out, bias, hidden)
        out, bias = self.mlp(self.pre_mlp_layernorm(hidden))
        return self._bias_dropout_add(out, bias, hidden)

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
    normally. ``selective`` recompute happens inside the attention (see ``SelfAttention``).
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
            attention_mask = mask_for_layers(attention_mask, cfg, hidden.dtype)
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
