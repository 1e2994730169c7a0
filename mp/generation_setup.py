"""What the generation tools share (`tools/generate.py`, `tools/run_text_generation_server.py`):
their checkpoint, tokenizer and prompt-format flags, the saved model config made fit for
generation at a tensor-parallel size, and the model loaded from the checkpoint.

The model's shape comes from the checkpoint, and so does the tokenizer when the checkpoint
holds its job's config (a pretraining checkpoint does; a converted one needs
``--tokenizer-type`` and its files). The tensor-parallel size is the world size; it must
divide the checkpoint's padded vocabulary. Conversations (a model fine-tuned with ``--sft``) are
written in the prompt format of the checkpoint's job unless ``--sft-tokenizer-prompt-format``
names another (`mp.data.prompt_formats`; Megatron's default for a checkpoint without one).
"""

from __future__ import annotations

import argparse

from mp.checkpointing import load_checkpoint
from mp.config.sections import DataConfig
from mp.data.prompt_formats import PROMPT_FORMATS, PromptFormat, get_prompt_format
from mp.data.tokenizer import TOKENIZER_TYPES
from mp.model import GPTModel, TransformerConfig
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS

# What generation changes in the saved model config: one stage, no sequence parallelism
# (the sequence grows a token at a time), no FP8 (its products need multiples of 16 tokens),
# experts routed by their router (not a benchmark's random logits), nothing that only matters
# in training.
_FOR_GENERATION = dict(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                       context_parallel_size=1, expert_model_parallel_size=1,
                       expert_tensor_parallel_size=None, **UNEVEN_SPLIT_FIELDS,
                       sequence_parallel=False, recompute_granularity=None,
                       recompute_modules=None, recompute_method=None, recompute_num_layers=None,
                       distribute_saved_activations=False, hidden_dropout=0.0,
                       attention_dropout=0.0, compile_layers=False, fp8=None,
                       moe_router_force_load_balancing=False)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--load`` and the tokenizer's flags."""
    parser.add_argument("--load", required=True,
                        help="a checkpoint or a save directory (its newest)")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                        help="default: the checkpoint's job config")
    parser.add_argument("--vocab-file")
    parser.add_argument("--merge-file")
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--vocab-size", type=int, help="NullTokenizer: ids below it")
    parser.add_argument("--sft-tokenizer-prompt-format", choices=tuple(PROMPT_FORMATS),
                        help="how conversations are written (default: the checkpoint job's)")


def prompt_format(args: argparse.Namespace, job_config: dict | None) -> PromptFormat:
    """The prompt format for conversations: the command line's, else the checkpoint job's,
    else Megatron's default."""
    saved = (job_config or {}).get("data", {}).get("sft_tokenizer_prompt_format")
    return get_prompt_format(args.sft_tokenizer_prompt_format or saved
                             or DataConfig.sft_tokenizer_prompt_format)


def tokenizer_args(args: argparse.Namespace, job_config: dict | None) -> dict:
    """`mp.data.tokenizer.build_tokenizer`'s arguments: the command line's, else the
    checkpoint job's (a ValueError when neither names one)."""
    data = (job_config or {}).get("data", {})
    if args.tokenizer_type is None and not data:
        raise ValueError(f"{args.load} holds no job config to take the tokenizer from (a "
                         "converted checkpoint): give --tokenizer-type and its files")
    if args.tokenizer_type is not None:
        data = {}
    return {"tokenizer_type": args.tokenizer_type or data["tokenizer_type"],
            "vocab_file": args.vocab_file or data.get("vocab_file"),
            "merge_file": args.merge_file or data.get("merge_file"),
            "tokenizer_model": args.tokenizer_model or data.get("tokenizer_model"),
            "eod_token": data.get("eod_token"),
            "vocab_size": args.vocab_size or data.get("vocab_size")}


def generation_config(saved: dict, tp: int) -> TransformerConfig:
    """The saved model config at tensor-parallel size ``tp``, for generation: one stage, no
    sequence parallelism, no dropout, and the saved padded vocabulary (whatever ``tp``)."""
    rows = TransformerConfig(**saved).padded_vocab_size
    if rows % tp:
        raise ValueError(f"the checkpoint's padded vocabulary ({rows} rows) does not divide "
                         f"over {tp} tensor-parallel ranks; run with fewer processes")
    return TransformerConfig(**{**saved, **_FOR_GENERATION, "tensor_model_parallel_size": tp,
                                "make_vocab_size_divisible_by": rows // tp})


def load_for_generation(path: str, config: TransformerConfig) -> GPTModel:
    """This rank's model (``config``, from `generation_config`) with ``path``'s weights, in
    eval mode (collective over the tensor-parallel group)."""
    model = GPTModel(config)
    load_checkpoint(path, model, load_rng=False)
    return model.eval()
