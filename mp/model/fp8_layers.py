"""Which of a GPT's linear layers run in FP8, and the rules an FP8 config must meet.

With ``config.fp8`` (Megatron's ``--fp8-format``) the transformer layers' dense linears run
their products in FP8 (`mp.tensor_parallel.fp8`): the fused QKV projection, the attention
output projection, fc1 (and the gate) and fc2 of each MLP. The embedding, the output layer,
the norms, the attention core, multi-latent attention's input projections, the experts of a
mixture of experts (routed and shared) and multi-token prediction's projection stay in the
model's precision, as under Megatron with Transformer Engine, which runs its norms, attention
and output layer outside FP8 too. ``first_last_layers_bf16`` keeps the first
``num_layers_at_start_in_bf16`` and last ``num_layers_at_end_in_bf16`` layers out as well
(Megatron's flags; "bf16" is the model's precision).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mp.tensor_parallel.fp8 import FP8_FORMATS, FP8_MULTIPLE, Fp8Recipe

if TYPE_CHECKING:
    from mp.model.config import TransformerConfig

#: Megatron's ``--fp8-recipe`` values mp implements.
FP8_RECIPES = ("tensorwise",)


def fp8_recipe(config: TransformerConfig, layer_number: int) -> Fp8Recipe | None:
    """The FP8 recipe of layer ``layer_number``'s dense linears (1-based over the model;
    multi-token prediction's depths count as the last layer), or None."""
    if config.fp8 is None:
        return None
    number = min(layer_number, config.num_layers)
    if config.first_last_layers_bf16 and (
            number <= config.num_layers_at_start_in_bf16
            or number > config.num_layers - config.num_layers_at_end_in_bf16):
        return None
    return Fp8Recipe(config.fp8, config.fp8_wgrad)


def check_fp8(config: TransformerConfig) -> None:
    """ValueError naming the value and the rule: ``fp8`` a known format, the ``tensorwise``
    recipe, layer counts that are counts, and every dimension of an FP8 product a multiple
    of `FP8_MULTIPLE` on each TP rank (cuBLAS's rule; the tokens of a micro-batch are
    `check_fp8_tokens`'). Nothing is checked without ``fp8``."""
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")
    if config.fp8 is None:
        return
    if config.fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8={config.fp8!r} must be one of {', '.join(map(repr, FP8_FORMATS))}"
                         " (or None: no FP8)")
    if config.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe={config.fp8_recipe!r}: mp implements 'tensorwise' (each "
                         "tensor scaled by its own amax at every product); Megatron's delayed, "
                         "mxfp8 and blockwise recipes need Transformer Engine")
    tp = config.tensor_model_parallel_size
    sizes = {"hidden_size": config.hidden_size,
             "query_projection_size / tensor_model_parallel_size":
                 config.query_projection_size // tp,
             "ffn_hidden_size / tensor_model_parallel_size": config.ffn_hidden_size // tp}
    if not config.multi_latent_attention:
        sizes["qkv_size / tensor_model_parallel_size"] = config.qkv_size // tp
    for name, size in sizes.items():
        if size % FP8_MULTIPLE:
            raise ValueError(f"fp8={config.fp8!r}: {name} = {size} is not a multiple of "
                             f"{FP8_MULTIPLE}, as cuBLAS's FP8 products need every dimension "
                             "to be")


def check_fp8_tokens(config: TransformerConfig, micro_batch_size: int) -> None:
    """ValueError unless a rank's tokens per micro-batch, ``micro_batch_size x seq_length /
    context_parallel_size``, are a multiple of `FP8_MULTIPLE` (with ``fp8``)."""
    tokens = micro_batch_size * config.seq_length // config.context_parallel_size
    if config.fp8 is not None and tokens % FP8_MULTIPLE:
        raise ValueError(f"model.fp8={config.fp8!r}: a rank's tokens per micro-batch "
                         f"(training.micro_batch_size x model.seq_length / "
                         f"context_parallel_size = {tokens}) are not a multiple of "
                         f"{FP8_MULTIPLE}, as cuBLAS's FP8 products need")
