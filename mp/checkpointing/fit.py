"""Whether a checkpoint fits the model it is loaded into, as messages that name the setting.

`architecture_problems` compares the saved `TransformerConfig` fields that make "the same
model" (`ARCHITECTURE`); `target_problems` compares every tensor to read with its stored global
shape, explaining a vocabulary padding that differs (`vocab_problem`) by the setting that
would make it agree. `mp.checkpointing.checkpoint.load_checkpoint` gathers the problems of
every rank and refuses the checkpoint before reading any tensor.
"""

from __future__ import annotations

from pathlib import Path

from mp.checkpointing.storage import PlacedTensors
from mp.model.config import TransformerConfig
from mp.model.layer_pattern import moe_layer_pattern

#: Model fields that two checkpoints of "the same model" share (the rest, such as dropout,
#: precision and the parallel layout, may change between save and load); also which layers
#: have experts, however ``moe_layer_freq`` says it.
ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "ffn_hidden_size", "vocab_size", "max_position_embeddings",
                "normalization", "layernorm_zero_centered_gamma", "activation",
                "position_embedding_type", "rotary_percent", "add_bias_linear",
                "untie_embeddings_and_output_weights", "qk_layernorm", "num_moe_experts",
                "moe_ffn_hidden_size", "multi_latent_attention", "mtp_num_layers",
                "add_qkv_bias", "moe_shared_expert_gate")
#: ... and those of multi-latent attention, when the checkpoint's model has it.
MLA_ARCHITECTURE = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                    "v_head_dim")


def architecture_problems(saved: dict, config: TransformerConfig) -> list[str]:
    """The `ARCHITECTURE` fields where ``saved`` (a checkpoint's ``model`` metadata) and
    ``config`` differ."""
    heads = saved["num_attention_heads"]
    # older checkpoints lack these: the defaults
    saved = {"num_query_groups": heads, "kv_channels": saved["hidden_size"] // heads,
             "rotary_percent": 1.0, "layernorm_zero_centered_gamma": False,
             "qk_layernorm": False, "num_moe_experts": None, "moe_layer_freq": 1,
             "moe_ffn_hidden_size": None, "multi_latent_attention": False,
             "mtp_num_layers": None, "add_qkv_bias": False, "moe_shared_expert_gate": False,
             **saved}
    fields = ARCHITECTURE + (MLA_ARCHITECTURE if saved["multi_latent_attention"] else ())
    problems = [f"model.{name}={saved.get(name)!r} in the checkpoint but "
                f"{getattr(config, name)!r} here"
                for name in fields if saved.get(name) != getattr(config, name)]
    saved_pattern = moe_layer_pattern(saved["num_layers"], saved["num_moe_experts"],
                                      saved["moe_layer_freq"])
    if not problems and saved_pattern != moe_layer_pattern(
            config.num_layers, config.num_moe_experts, config.moe_layer_freq):
        problems.append(f"model.moe_layer_freq={saved['moe_layer_freq']!r} in the checkpoint "
                        f"but {config.moe_layer_freq!r} here (other layers have experts)")
    return problems


def vocab_problem(saved_rows: int, rows: int, config: TransformerConfig) -> str:
    """Why the vocabulary dimension differs, and the setting that would make it agree."""
    tp = config.tensor_model_parallel_size
    fits = [d for d in range(1, saved_rows // tp + 1)
            if saved_rows % (d * tp) == 0 and saved_rows - d * tp < config.vocab_size]
    if fits:
        powers_of_two = [d for d in fits if d & (d - 1) == 0]
        fix = f"model.make_vocab_size_divisible_by={min(powers_of_two or fits)} pads it to"
    else:
        fix = "no make_vocab_size_divisible_by pads it to"
    fix += f" {saved_rows} at tensor_model_parallel_size={tp}"
    return (f"the checkpoint pads the vocabulary (vocab_size={config.vocab_size}) to "
            f"{saved_rows} rows but this layout pads it to {rows} (a multiple of "
            f"make_vocab_size_divisible_by={config.make_vocab_size_divisible_by} x "
            f"tensor_model_parallel_size={tp}); {fix}")


def target_problems(targets: PlacedTensors, entries: dict, config: TransformerConfig,
                    directory: Path) -> list[str]:
    """The tensors to read (``targets``) that ``directory``'s index (``entries``) lacks or
    stores at another global shape."""
    problems = []
    for key, pieces in targets.items():
        entry = entries.get(key)
        if entry is None:
            problems.append(f"{directory} has no entry {key!r}")
            continue
        if not pieces:
            continue
        stored, wanted = tuple(entry.size), pieces[0][1].global_shape
        if stored == wanted:
            continue
        if ("word_embeddings" in key or "output_layer" in key) and stored[1:] == wanted[1:]:
            problems.append(vocab_problem(stored[0], wanted[0], config))
        else:
            problems.append(f"{key} is {list(stored)} in the checkpoint but {list(wanted)} here")
    return problems
