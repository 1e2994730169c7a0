"""Multi-token prediction (`mp.model.mtp`, DeepSeek-V3's) in the estimate: what its depths
save for backward on the last stage, and the tensor-parallel calls they add.

Its parameters are `mp.estimate.params.mtp_params` (and the last stage's copy of the word
embedding, `rank_params`), its FLOPs `mp.estimate.flops.mtp_training_flops`.

Depth ``k`` of ``D`` looks up the embeddings of the tokens ``k`` places ahead (``[b, s]`` ids,
shifted: a new tensor), normalizes them (``enorm``) and the previous depth's hidden states
``[n', b, h]`` (``hnorm``), concatenates the two to ``[n', b, 2h]``, projects them back to ``h``
(``eh_proj``, whole on every TP rank), runs one transformer layer, its final norm, the output
layer and the cross-entropy against the labels shifted alike, and averages the losses over
the loss mask shifted alike. With ``e`` bytes an activation, ``n`` the rank's tokens and ``n'``
its rows in the sequence-parallel regions (`sequence_rows`), one depth saves
(`mtp_depth_terms`):

- the embedding's saves (`mp.estimate.stage_ends.embedding_terms`: ids, flags, dropout mask);
- ``enorm``'s input and statistics; ``hnorm``'s statistics only: its input is the tensor the
  main model's final norm (depth 1) or the previous depth's final norm saves too (torch's
  composite RMSNorm on the CPU makes its own fp32 copy of 16-bit input, counted); both are
  norms of the residual stream (fp32 with ``fp32_residual_connection``, which casts
  ``eh_proj``'s output to fp32 for the layer: `mp.estimate.storage.norm_weight_terms`);
- ``eh_proj``'s input, the concatenation, ``2 e n' h`` (the concatenation saves nothing);
- the layer's terms (`mp.estimate.activations.layer_terms`, with experts and a sliding window
  when the model's last layer has them; selective recompute applies, full recompute does
  not: it checkpoints the decoder's layers only); a window's tile mask is one for all the
  depths and the decoder's layers of that window (`mtp_saves`);
- the final norm, the output layer's input and the cross-entropy
  (`mp.estimate.stage_ends.output_terms`);
- the shifted loss mask, fp32 ``[b, s]``, and the mask's sum, one fp32 scalar (the mean's
  denominator).

Tensor parallelism, per depth and micro-batch (`mtp_tensor_parallel_activations`, in
``[n, b, h]`` activations ``a``): the embedding's lookup as the first stage's (all-reduced;
under SP reduce-scattered and, in backward, gathered), the layer's calls as a decoder layer's
(`mp.estimate.comm`), the output layer's as the last stage's (its input gradient all-reduced;
under SP its input gathered forward and again backward, the gradient reduce-scattered), and
the cross-entropy's three fp32 all-reduces per token. ``eh_proj`` calls nothing: under SP each
rank projects its own tokens, and its weight's gradient, with the three norms', is partial
over TP and all-reduced with the other sequence-parallel ones (`mtp_partial_gradient_params`).
"""

from __future__ import annotations

from mp.estimate.activations import layer_terms
from mp.estimate.attention_calls import split_tile_masks
from mp.estimate.params import mtp_layer_is_moe, norm_params
from mp.estimate.stage_ends import embedding_terms, output_terms
from mp.estimate.storage import (
    CUDA,
    FP32,
    Kernels,
    activation_bytes,
    local_tokens,
    norm_terms,
    norm_weight_terms,
    residual_bytes,
    sequence_rows,
)
from mp.model.config import TransformerConfig


def mtp_depths(cfg: TransformerConfig) -> int:
    """``mtp_num_layers``, or 0 without multi-token prediction."""
    return cfg.mtp_num_layers or 0


def mtp_depth_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA
                    ) -> dict[str, float]:
    """Bytes one depth of multi-token prediction saves for backward on one TP rank of the
    last stage for one micro-batch, by tensor (module doc); every depth saves as much."""
    e, h = activation_bytes(cfg), cfg.hidden_size
    local, tokens = sequence_rows(cfg, micro_batch), local_tokens(cfg, micro_batch)
    terms = {f"embedding {name}": size
             for name, size in embedding_terms(cfg, micro_batch, kernels).items()}
    terms.update({f"enorm {name}": size
                  for name, size in norm_terms(cfg, kernels, local, residual=True).items()})
    copied = (cfg.normalization == "RMSNorm" and kernels.composite_rms_norm
              and residual_bytes(cfg) != FP32)
    terms.update({f"hnorm {name}": size
                  for name, size in norm_terms(cfg, kernels, local, residual=True).items()
                  if copied or not name.startswith("input")})
    terms.update({f"enorm and hnorm {name}": 2 * size
                  for name, size in norm_weight_terms(cfg, kernels).items()})
    terms["eh_proj input (the two normalized, concatenated)"] = e * local * 2 * h
    terms.update({f"layer {name}": size for name, size in layer_terms(  # numbered after the
        # decoder's layers, it slides as the last one does (`cfg.attention_window`)
        cfg, micro_batch, kernels, moe=mtp_layer_is_moe(cfg), layer=cfg.num_layers).items()})
    terms.update(output_terms(cfg, micro_batch, kernels))
    terms["loss mask, shifted (fp32)"] = FP32 * tokens
    terms["loss mask sum (fp32)"] = FP32
    return terms


def mtp_saved_bytes(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA
                    ) -> float:
    """What all ``D`` depths save for one micro-batch (0 without multi-token prediction)."""
    own, masks = mtp_saves(cfg, micro_batch, kernels)
    return own + sum(masks.values())


def mtp_saves(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA
              ) -> tuple[float, dict[str, float]]:
    """`mtp_saved_bytes` in two: the bytes but their layers' sliding-window tile mask, and
    that mask by name, once for all the depths (`split_tile_masks`; the decoder's layers of
    the same window share it too)."""
    depths = mtp_depths(cfg)
    terms = mtp_depth_terms(cfg, micro_batch, kernels) if depths else {}
    return split_tile_masks([terms] * depths)


def mtp_tensor_parallel_activations(cfg: TransformerConfig) -> dict[str, int]:
    """``[n, b, h]`` activations that the ``D`` depths' embedding lookups and output layers
    move over TP per micro-batch, by kind (the layers' calls are counted with the decoder's,
    the cross-entropy's apart): without SP the lookups' and the output layers' input
    gradients all-reduced; under SP each lookup reduce-scattered forward (all-reduced, then
    split, with learned positions) and its gradient gathered, each output layer's input
    gathered forward and backward and its gradient reduce-scattered."""
    depths = mtp_depths(cfg)
    if not cfg.sequence_parallel:
        return {"all_reduce": 2 * depths}
    learned = cfg.position_embedding_type == "learned_absolute"
    return {"all_gather": 3 * depths, "reduce_scatter": depths if learned else 2 * depths,
            "all_reduce": depths if learned else 0}


def mtp_partial_gradient_params(cfg: TransformerConfig) -> int:
    """Elements of the ``D`` depths' parameters outside their layers whose gradients are
    partial over TP under SP: ``eh_proj`` and the three norms (0 without SP)."""
    if not cfg.sequence_parallel:
        return 0
    return mtp_depths(cfg) * (2 * cfg.hidden_size ** 2 + 3 * norm_params(cfg)[0])
