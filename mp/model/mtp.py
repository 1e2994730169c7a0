"""Multi-token prediction (DeepSeek-V3, section 2.2; Megatron-Core's
``MultiTokenPredictionBlock``): ``D`` more layers on the last pipeline stage, depth ``k``
predicting the token ``k + 1`` places ahead.

Depth ``k`` takes the previous depth's hidden states ``h^(k-1)`` (``h^0``: the main model's
last layer, before its final norm) and the embeddings of the tokens ``k`` places ahead, both
normalized, joins them (``[norm(emb(t_(i+k))); norm(h_i^(k-1))]``, ``2h`` wide) and projects
them back to ``h`` (``eh_proj``), runs one transformer layer (with experts when the main
model's last layer has them), and its own final norm and the model's output layer give
logits for ``t_(i+k+1)``. Its loss is the cross-entropy over the positions whose target
exists and the loss mask keeps (the mask shifted alike), averaged; the ``D`` losses, times
``mtp_loss_scaling_factor / D``, are added to the gradients (not to the reported loss),
attached to the main model's hidden states (`mp.model.aux_losses.attach_aux_loss`: with the
micro-batch's loss scale), and logged as ``mtp_1 loss`` ... ``mtp_D loss``.

With packed documents (`mp.model.packed_documents`: ``--reset-attention-mask``, ``--sft``) the
tokens, labels and loss mask move within each document, zeros where the place ``k`` ahead is
in the next one (Megatron-Core rolls each packed sequence so), so no depth learns across
documents; a mask given as a tensor carries no documents, and they move along the sample.

Shapes: hidden ``[s, b, h]`` (``[s / t, b, h]`` with sequence parallelism), tokens, labels and
the loss mask ``[b, s]``. ``eh_proj`` is a `mp.tensor_parallel.DuplicatedLinear`: whole on
every TP rank, each computing its own tokens under sequence parallelism.

With ``fp32_residual_connection`` ``eh_proj``'s output is cast to fp32, so that each depth's
layer keeps its residual in fp32 as the decoder's layers do (Megatron-Core adds it in the
parameters' dtype there) and every depth computes alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mp.model.attention_masks import mask_for_layers
from mp.model.aux_losses import attach_aux_loss, track
from mp.model.config import TransformerConfig
from mp.model.init import init_method
from mp.model.norm import build_norm
from mp.model.packed_documents import PackedDocuments
from mp.model.transformer import TransformerLayer
from mp.tensor_parallel import DuplicatedLinear


def shift_left(x: torch.Tensor, k: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """``x [b, s]`` moved ``k`` places left along the sequence, zeros in the last ``k``; with
    ``segments [b, s]`` zeros too where the place ``k`` ahead is in another segment."""
    shifted = torch.cat((x[:, k:], x.new_zeros(x.size(0), k)), dim=1)
    if segments is None:
        return shifted
    return shifted.masked_fill(shift_left(segments, k) != segments, 0)


class MTPLayer(nn.Module):
    """Depth ``depth`` (1-based) of multi-token prediction."""

    def __init__(self, config: TransformerConfig, depth: int, group=None):
        super().__init__()
        self.config = config
        self.enorm, self.hnorm = build_norm(config), build_norm(config)
        self.eh_proj = DuplicatedLinear(
            2 * config.hidden_size, config.hidden_size, bias=False,
            init_method=init_method(config), sequence_parallel=config.sequence_parallel,
            params_dtype=config.params_dtype)
        last = config.num_layers - 1
        self.transformer_layer = TransformerLayer(config, config.num_layers + depth, group,
                                                  moe=config.is_moe_layer(last))
        self.final_layernorm = build_norm(config)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor,
                attention_mask: torch.Tensor | None,
                rotary_freqs: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` ``h^(k-1)`` and ``embedded``, the tokens ``k`` ahead, -> ``(h^k, its
        final norm)``."""
        joined = torch.cat((self.enorm(embedded), self.hnorm(hidden)), dim=-1)
        hidden, _ = self.eh_proj(joined)
        if self.config.fp32_residual_connection:  # the layer's residual, as the decoder's
            hidden = hidden.float()
        hidden = self.transformer_layer(hidden, attention_mask, rotary_freqs)
        return hidden, self.final_layernorm(hidden)


class MultiTokenPrediction(nn.Module):
    """The ``mtp_num_layers`` depths; `forward` returns the main hidden states with their
    losses attached."""

    def __init__(self, config: TransformerConfig, group=None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MTPLayer(config, depth, group)
                                    for depth in range(1, config.mtp_num_layers + 1))

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor, embed: Callable, token_losses: Callable,
                attention_mask: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` (the main model's, before its final norm) with every depth's loss
        attached. ``embed(ids [b, s])`` gives the embeddings in ``hidden``'s layout,
        ``token_losses(normed [s, b, h], labels [b, s])`` the per-token losses ``[b, s]``
        (the model's output layer and cross-entropy)."""
        cfg = self.config
        segments = (attention_mask.segment_ids
                    if isinstance(attention_mask, PackedDocuments) else None)
        if attention_mask is not None:
            attention_mask = mask_for_layers(attention_mask, cfg, cfg.params_dtype)
        weight = cfg.mtp_loss_scaling_factor / len(self.layers)
        depth_hidden, total = hidden, 0.0
        for k, layer in enumerate(self.layers, start=1):
            depth_hidden, normed = layer(depth_hidden, embed(shift_left(input_ids, k, segments)),
                                         attention_mask, rotary_freqs)
            mask = shift_left(loss_mask.float(), k, segments)
            losses = token_losses(normed, shift_left(labels, k, segments))
            loss = (losses.float() * mask).sum() / mask.sum().clamp(min=1.0)
            track(f"mtp_{k} loss", loss)
            total = total + loss
        return attach_aux_loss(hidden, total, weight)
