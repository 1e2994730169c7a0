"""GPT: embedding, transformer block, final norm, vocab-parallel output and loss.

``forward(input_ids [b, s], position_ids [b, s] | None, attention_mask, labels [b, s] | None,
inference_params, loss_mask [b, s] | None)`` returns the per-token loss ``[b, s]`` (fp32) when
``labels`` are given,
otherwise the logits ``[b, s, V / t]`` still split over the vocabulary (gather them with
``gather_from_tensor_model_parallel_region`` if a full distribution is needed). The loss never
materialises full logits: ``vocab_parallel_cross_entropy`` works on the shards.

With pipeline parallelism a stage has ``pre_process`` (holds the embedding) and/or
``post_process`` (holds the final norm, output layer and loss); a stage without
``pre_process`` takes its input from ``set_input_tensor``; ``layers`` are the 0-based indices
over the whole model of the transformer layers it holds (default: the first chunk's,
`TransformerConfig.chunk_layers`, all of them without pipelining). With ``inference_params``
(`mp.model.inference`) ``input_ids`` are the tokens after the cached ones.

With ``mtp_num_layers`` the last stage also holds multi-token prediction (`mp.model.mtp`),
which runs while training when ``labels`` are given (its losses, over ``loss_mask``, reach
the gradients only) and reads the word embedding: a last stage without ``pre_process`` then
keeps a copy of the embedding, synced with the first stage's as a tied output layer's is
(`mp.model.stages`); with tied embeddings the output layer uses that copy.
"""

from __future__ import annotations

import torch
from torch import nn

from mp import parallel_state
from mp.model.config import TransformerConfig
from mp.model.context_parallel import local_positions
from mp.model.embedding import LanguageModelEmbedding
from mp.model.inference import InferenceParams
from mp.model.init import init_method
from mp.model.mtp import MultiTokenPrediction
from mp.model.rope import rotary_freqs
from mp.model.transformer import TransformerBlock
from mp.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy


class GPTModel(nn.Module):
    def __init__(self, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layers: range | None = None, group=None):
        super().__init__()
        self.config = config
        self.group = parallel_state.get_tensor_model_parallel_group() if group is None else group
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings = not config.untie_embeddings_and_output_weights
        self.input_tensor: torch.Tensor | None = None
        mtp = post_process and config.mtp_num_layers is not None
        self.embedding = (LanguageModelEmbedding(config, self.group) if pre_process or mtp
                          else None)
        self.decoder = TransformerBlock(config, post_process, layers, self.group)
        self.output_layer = self.mtp = None
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.padded_vocab_size, bias=False, gather_output=False,
                init_method=init_method(config),
                sequence_parallel=config.sequence_parallel,
                skip_weight_param_allocation=self.embedding is not None and self.share_embeddings,
                params_dtype=config.params_dtype, group=self.group)
        if mtp:
            self.mtp = MultiTokenPrediction(config, self.group)

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """The activations ``[s, b, h]`` a stage without ``pre_process`` starts from."""
        self.input_tensor = input_tensor

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The word-embedding weight the output layer uses (tied embeddings), or that
        multi-token prediction reads on the last stage."""
        if self.embedding is not None:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        length, offset = input_ids.size(1), 0
        cp = self.config.context_parallel_size
        if inference_params is not None and cp > 1:
            raise ValueError(f"a key/value cache (inference_params) needs context_parallel_size=1"
                             f", not {cp}: decoding adds one token at a time (tools/generate.py "
                             "builds the model without CP)")
        if inference_params is not None:  # the tokens after the cached ones
            offset = inference_params.sequence_len_offset
            if position_ids is None:
                position_ids = inference_params.positions(length, input_ids.device)
        elif position_ids is None and cp > 1:  # this CP rank's tokens
            position_ids = local_positions(length * cp, cp,
                                           parallel_state.get_context_parallel_rank(),
                                           input_ids.device)
        if self.pre_process:
            hidden = self.embedding(input_ids, position_ids)
        else:
            hidden = self.input_tensor
        freqs = None
        if self.config.position_embedding_type == "rope":
            c = self.config
            freqs = rotary_freqs(offset + length * cp, c.rotary_dim, c.rotary_base,
                                 input_ids.device,
                                 c.rope_scaling_factor if c.use_rope_scaling else None,
                                 c.rotary_seq_len_interpolation_factor, c.yarn_arguments)
            freqs = freqs[offset:] if cp == 1 else freqs[local_positions(
                length * cp, cp, parallel_state.get_context_parallel_rank(), input_ids.device)]
        predict_more = self.mtp is not None and labels is not None and self.training
        hidden = self.decoder(hidden, attention_mask, freqs, inference_params,
                              final_norm=not predict_more)
        if not self.post_process:
            return hidden
        if predict_more:
            hidden = self.decoder.final_layernorm(self.mtp(
                hidden, input_ids, labels,
                torch.ones_like(labels) if loss_mask is None else loss_mask,
                lambda ids: self.embedding(ids, position_ids), self._token_losses,
                attention_mask, freqs))
        logits = self._logits(hidden)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self._token_losses(hidden, labels, logits)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [s, b, h]`` after the final norm -> ``[s, b, V / t]``."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

    def _token_losses(self, hidden: torch.Tensor, labels: torch.Tensor,
                      logits: torch.Tensor | None = None) -> torch.Tensor:
        """The per-token losses ``[b, s]`` of ``hidden [s, b, h]`` (after a final norm) for
        ``labels [b, s]``, from ``logits`` when they are at hand."""
        logits = self._logits(hidden) if logits is None else logits
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), group=self.group,
                                            fused=self.config.cross_entropy_loss_fusion)
        return loss.transpose(0, 1).contiguous()
