"""Convert Hugging Face GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE, Qwen2-MoE,
DeepSeek-V2, DeepSeek-V3, StarCoder2 and gpt-oss weights to an mp checkpoint, and back; and
Megatron-Core GPT checkpoints to mp, and back.

    python tools/convert_checkpoint.py hf-to-mp --input gpt2/ --output ckpt/gpt2 \\
        [--tensor-model-parallel-size 2] [--make-vocab-size-divisible-by 128] [--seq-length 1024] \\
        [--apply-layernorm-1p]
    python tools/convert_checkpoint.py mp-to-hf --input ckpt/gpt2 --output gpt2-out/ \\
        [--format safetensors|bin]
    python tools/convert_checkpoint.py megatron-to-mp --input megatron-save/ --output ckpt/m \\
        [--tensor-model-parallel-size 2] [--make-vocab-size-divisible-by 128] [--vocab-size N]
    python tools/convert_checkpoint.py mp-to-megatron --input ckpt/m --output megatron-save/ \
        [--iteration N | --release] [--transformer-impl transformer_engine|local]

``hf-to-mp`` reads a ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``,
``Qwen2MoeForCausalLM``, ``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``,
``Starcoder2ForCausalLM`` or ``GptOssForCausalLM`` directory (``config.json`` with
``model.safetensors``, the shards a ``model.safetensors.index.json`` names, or
``pytorch_model.bin``) or one weights file (then ``--config`` names the ``config.json``);
the config's ``model_type`` (``gpt2``, ``llama``, ``mistral``, ``qwen2``, ``qwen3``,
``mixtral``, ``qwen3_moe``, ``qwen2_moe``, ``deepseek_v2``, ``deepseek_v3``, ``starcoder2``
or ``gpt_oss``) picks the mapping (`mp.checkpointing.hf_gpt2`, `mp.checkpointing.hf_deepseek`,
`mp.checkpointing.hf_starcoder2`, `mp.checkpointing.hf_gpt_oss`, `mp.checkpointing.hf_llama`
for the others). gpt-oss's released weights are MXFP4-quantized (a ``quantization_config``)
and are refused: load them with transformers' ``Mxfp4Config(dequantize=True)`` and
``save_pretrained`` them in bf16 first.
It writes a model-only mp checkpoint (a save directory with ``iter_0000000``). mp checkpoints
are layout-free: the result loads at any tensor/pipeline/data-parallel layout whose padded
vocabulary matches, which ``--tensor-model-parallel-size`` and
``--make-vocab-size-divisible-by`` set (GPT-2's 50257 tokens pad to 50304 with 128 x 1). Start
training from it with ``launch/pretrain_gpt.py --load ckpt/gpt2``.

``mp-to-hf`` reads any mp checkpoint (a checkpoint directory or a save directory's latest;
the fp32 masters when it has them) and writes ``config.json`` and the weights in GPT-2's
names and layout, or Llama's for a model with rotary embeddings (Qwen3's with
``qk_layernorm``, Mixtral's or Qwen3-MoE's with experts, DeepSeek-V3's with multi-latent
attention, gpt-oss's with attention sinks or quick GeGLU, StarCoder2's with LayerNorm;
``lm_head.weight`` is left out of safetensors files when tied, as ``save_pretrained`` does).

``megatron-to-mp`` reads a Megatron-LM save directory (or one ``iter_XXXXXXX``) in the
``torch_dist`` format, Megatron-LM's default, or the legacy ``torch`` one (one stage), and
writes the model-only mp checkpoint of its GPT, its shape taken from the checkpoint's
``args`` (`mp.checkpointing.megatron`). The tensor-parallel size and the vocabulary's
divisor default to the checkpoint's; they only check that mp pads the vocabulary to
Megatron's ``padded_vocab_size`` rows, all of which are kept.

``mp-to-megatron`` (``--load``/``--save`` are aliases of ``--input``/``--output``) writes an
mp checkpoint's model as a Megatron-LM ``torch_dist`` checkpoint (`mp.checkpointing.
megatron_export`): ``latest_checkpointed_iteration.txt`` and ``iter_XXXXXXX/`` (the mp
checkpoint's iteration unless ``--iteration``; ``release/`` with ``--release``), its
``common.pt`` holding Megatron-LM's ``args`` for the model (so ``--use-checkpoint-args``
works). Weights only, no optimizer or RNG state: load it in Megatron-LM with ``--load DIR
--ckpt-format torch_dist --finetune`` (or ``--no-load-optim --no-load-rng``; a ``--release``
checkpoint needs neither). ``--transformer-impl`` is the Megatron-LM run's (its default
``transformer_engine``, or ``local``): it sets the extra-state objects written and the name of
a mixture-of-experts layer's norm. Features Megatron-Core's GPT cannot express (multi-latent
attention, multi-token prediction, YaRN, GPT-2's tanh GeLU, ...) are refused by name.

Files are read safely: safetensors, or ``torch.load(weights_only=True)``. GPT-2's ``gelu_new``
becomes mp's ``activation: gelu_tanh`` (the same function), so logits agree with the Hugging
Face model's to float rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from mp.checkpointing import (
    CheckpointError,
    hf_deepseek,
    hf_gpt2,
    hf_gpt_oss,
    hf_llama,
    hf_starcoder2,
    load_global_model,
    megatron,
    megatron_export,
    megatron_files,
    read_checkpoint_info,
    save_global_model,
)
from mp.model.config import TransformerConfig

SAFETENSORS, BIN, CONFIG = "model.safetensors", "pytorch_model.bin", "config.json"
INDEX = SAFETENSORS + ".index.json"  # a sharded checkpoint's map of tensors to files
# config.json's model_type -> its mapping
FORMATS = {"gpt2": hf_gpt2, "deepseek_v3": hf_deepseek, "deepseek_v2": hf_deepseek,
           "starcoder2": hf_starcoder2, "gpt_oss": hf_gpt_oss,
           **{kind: hf_llama for kind in hf_llama.FAMILIES}}


def _format_of(config: TransformerConfig):
    """The Hugging Face mapping an mp model converts to: DeepSeek-V3's with multi-latent
    attention, gpt-oss's with attention sinks or quick GeGLU, else with rotary embeddings
    StarCoder2's with LayerNorm (its GeLU MLP and biases) and Llama's (and its kin,
    `hf_llama.FAMILIES`) with RMSNorm; GPT-2's without."""
    if config.multi_latent_attention:
        return hf_deepseek
    if config.softmax_type != "vanilla" or config.activation == "quick_geglu":
        return hf_gpt_oss
    if config.position_embedding_type != "rope":
        return hf_gpt2
    return hf_starcoder2 if config.normalization == "LayerNorm" else hf_llama


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise SystemExit("convert_checkpoint.py: reading or writing .safetensors needs the "
                         "safetensors package: pip install safetensors") from error
    return safetensors.torch


def read_hf(path: Path, config_path: Path | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json contents, state dict)`` of a Hugging Face directory or weights file."""
    if path.is_dir():
        weights = next((path / name for name in (SAFETENSORS, INDEX, BIN)
                        if (path / name).is_file()), None)
        if weights is None:
            raise SystemExit(f"convert_checkpoint.py: {path} has none of {SAFETENSORS}, "
                             f"{INDEX}, {BIN}")
        config_path = config_path or path / CONFIG
    else:
        weights = path
    if config_path is None or not config_path.is_file():
        raise SystemExit(f"convert_checkpoint.py: no {CONFIG} for {path}: pass --config")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if weights.name.endswith(INDEX):
        shards = sorted(set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"]
                            .values()))
        state = {k: v for shard in shards
                 for k, v in _safetensors().load_file(str(weights.parent / shard)).items()}
    elif weights.suffix == ".safetensors":
        state = _safetensors().load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return config, state


def write_hf(directory: Path, config: TransformerConfig, state: dict[str, torch.Tensor],
             fmt: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(_format_of(config).hf_config(config), indent=2)
                                    + "\n", encoding="utf-8")
    if fmt == "bin":
        torch.save(state, directory / BIN)
        return directory / BIN
    if not config.untie_embeddings_and_output_weights:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    _safetensors().save_file(state, str(directory / SAFETENSORS), metadata={"format": "pt"})
    return directory / SAFETENSORS


def hf_to_mp_command(args) -> None:
    hf, state = read_hf(Path(args.input), args.config and Path(args.config))
    kind = hf.get("model_type", "gpt2")
    if kind not in FORMATS:
        raise ValueError(f"model_type={kind!r}: convert_checkpoint.py converts "
                         f"{' and '.join(map(repr, FORMATS))}")
    mapping = FORMATS[kind]
    config = mapping.config_from_hf(
        hf, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        seq_length=args.seq_length)
    config = dataclasses.replace(config, layernorm_zero_centered_gamma=args.apply_layernorm_1p)
    options = {}
    if mapping is hf_deepseek:  # its prediction depths; its RoPE channels, paired or halved
        config = dataclasses.replace(config,
                                     mtp_num_layers=hf_deepseek.prediction_depths(hf, state))
        options = {"rope_interleave": hf.get("rope_interleave", True)}
    path = save_global_model(args.output, config, mapping.hf_to_mp(state, config, **options))
    print(f"wrote {path}: {config.num_layers} layers, hidden {config.hidden_size}, vocabulary "
          f"{config.vocab_size} padded to {config.padded_vocab_size}")


def mp_to_hf_command(args) -> None:
    weights, info = load_global_model(args.input)
    config = TransformerConfig(**info.model_config)
    path = write_hf(Path(args.output), config, _format_of(config).mp_to_hf(weights, config),
                    args.format)
    print(f"wrote {path} and {Path(args.output) / CONFIG} from {info.path}")


def megatron_to_mp_command(args) -> None:
    megatron_args, weights = megatron_files.read_checkpoint(args.input)
    config = megatron.config_from_args(
        megatron_args, tensor_model_parallel_size=args.tensor_model_parallel_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        vocab_size=args.vocab_size)
    path = save_global_model(args.output, config, megatron.megatron_to_mp(weights, config))
    print(f"wrote {path}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.padded_vocab_size} vocabulary rows")


def mp_to_megatron_command(args) -> None:
    config = TransformerConfig(**read_checkpoint_info(args.input).model_config)
    megatron_export.check_exportable(config)  # before reading the weights
    weights, info = load_global_model(args.input)
    iteration = info.iteration if args.iteration is None else args.iteration
    state = megatron_export.sharded_state_dict(megatron_export.mp_to_megatron(weights, config),
                                               config, transformer_impl=args.transformer_impl)
    megatron_args = megatron_export.args_from_config(
        config, iteration=0 if args.release else iteration,
        transformer_impl=args.transformer_impl)
    path = megatron_export.write_checkpoint(args.output, megatron_args, state,
                                            iteration=iteration, release=args.release)
    print(f"wrote {path} from {info.path}: {config.num_layers} layers, hidden "
          f"{config.hidden_size}, {config.padded_vocab_size} vocabulary rows (weights only: "
          "load it with --finetune, or --no-load-optim --no-load-rng)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_mp = commands.add_parser("hf-to-mp", help="Hugging Face model (a family above) -> mp "
                                   "checkpoint")
    to_mp.add_argument("--input", required=True, help="Hugging Face directory or weights file")
    to_mp.add_argument("--config", help="config.json (default: beside the weights)")
    to_mp.add_argument("--output", required=True, help="mp save directory to create")
    to_mp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                       help="sets the vocabulary padding (with --make-vocab-size-divisible-by)")
    to_mp.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                       help="checked against the number of layers")
    to_mp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mp.add_argument("--seq-length", type=int,
                       help="default: n_positions / max_position_embeddings")
    to_mp.add_argument("--apply-layernorm-1p", action="store_true",
                       help="an mp model whose norms scale by 1 + weight (the weights are "
                            "stored minus 1)")
    to_mp.set_defaults(run=hf_to_mp_command)
    to_hf = commands.add_parser("mp-to-hf", help="mp checkpoint -> Hugging Face model (the "
                                   "family that expresses it)")
    to_hf.add_argument("--input", required=True, help="mp checkpoint or save directory")
    to_hf.add_argument("--output", required=True, help="directory to write")
    to_hf.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    to_hf.set_defaults(run=mp_to_hf_command)
    from_megatron = commands.add_parser("megatron-to-mp", help="Megatron-Core GPT checkpoint "
                                        "(torch_dist, or legacy torch) -> mp checkpoint")
    from_megatron.add_argument("--input", required=True,
                               help="Megatron save directory or one of its iter_XXXXXXX")
    from_megatron.add_argument("--output", required=True, help="mp save directory to create")
    from_megatron.add_argument("--tensor-model-parallel-size", type=int,
                               help="with --make-vocab-size-divisible-by, must pad the "
                                    "vocabulary to the checkpoint's rows (default: its own)")
    from_megatron.add_argument("--make-vocab-size-divisible-by", type=int,
                               help="default: the checkpoint's")
    from_megatron.add_argument("--vocab-size", type=int,
                               help="the tokenizer's (default: the checkpoint's padded rows)")
    from_megatron.set_defaults(run=megatron_to_mp_command)
    to_megatron = commands.add_parser(
        "mp-to-megatron", help="mp checkpoint -> Megatron-LM torch_dist checkpoint (weights only)",
        description="Writes the model only (no optimizer or RNG state): load it in Megatron-LM "
                    "with --load OUT --ckpt-format torch_dist --finetune (or --no-load-optim "
                    "--no-load-rng; a --release checkpoint needs neither), with "
                    "--use-checkpoint-args or the same model flags.")
    to_megatron.add_argument("--input", "--load", required=True,
                             help="mp checkpoint or save directory")
    to_megatron.add_argument("--output", "--save", required=True,
                             help="Megatron save directory to write")
    when = to_megatron.add_mutually_exclusive_group()
    when.add_argument("--iteration", type=int,
                      help="the iteration to record (default: the mp checkpoint's)")
    when.add_argument("--release", action="store_true",
                      help="write release/ (Megatron then loads no optimizer or RNG state)")
    to_megatron.add_argument("--transformer-impl", choices=megatron_export.IMPLS,
                             default="transformer_engine",
                             help="the Megatron-LM run's --transformer-impl")
    to_megatron.set_defaults(run=mp_to_megatron_command)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, CheckpointError) as error:  # each names the value and the rule
        raise SystemExit(f"convert_checkpoint.py: error: {error}") from error


if __name__ == "__main__":
    main()
