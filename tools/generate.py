"""Generate text from an mp checkpoint (`mp.generation`), at any tensor-parallel size.

    python tools/generate.py --load ckpt --prompt "def main(" --max-new-tokens 64 --greedy
    torchrun --nproc-per-node 2 tools/generate.py --load ckpt --prompt "import " \\
        --prompt "class " --temperature 0.8 --top-k 40 --top-p 0.95 --seed 7
    python tools/generate.py --load sft-ckpt --chat --prompt 'Write `dedent` of `textwrap`: ...'

The model's shape comes from the checkpoint, and so does the tokenizer when the checkpoint
holds its job's config (`mp.generation_setup`). The tensor-parallel size is the world size
(one process: TP 1); it must divide the checkpoint's padded vocabulary, whose padding rows
are never drawn. A prompt and its new tokens must fit in ``max_position_embeddings``. Each prompt is
continued until ``--max-new-tokens`` or the end-of-document token; rank 0 prints the prompt
and its continuation, separated by a line of dashes. With ``--chat`` (a model fine-tuned with
``--sft``) each prompt is a user's message, after ``--system``'s when given, written in the
prompt format of the checkpoint's job (``--sft-tokenizer-prompt-format`` to choose another,
`mp.data.prompt_formats`) and followed by the assistant's header: the continuation is the
assistant's answer.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.checkpointing import read_checkpoint_info
from mp.config import resolve_world_size
from mp.data.tokenizer import build_tokenizer
from mp.device import get_device
from mp.generation import SamplingParams, generate
from mp.generation_setup import (
    add_checkpoint_arguments,
    generation_config,
    load_for_generation,
    prompt_format,
    tokenizer_args,
)
from mp.initialize import initialize_distributed


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="text to continue; repeat "
                   "for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="the most likely token every time")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: no limit")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--chat", action="store_true", help="each prompt is a user's message and "
                   "the model answers as the assistant (a model fine-tuned with --sft)")
    p.add_argument("--system", help="--chat: a system message before each prompt")
    return p.parse_args(argv)


def prompt_ids(args: argparse.Namespace, tokenizer, job_config: dict | None) -> list[list[int]]:
    """Each ``--prompt``'s token ids: the text's, or with ``--chat`` the conversation's
    (module doc)."""
    if not args.chat:
        if args.system or args.sft_tokenizer_prompt_format:
            raise ValueError("--system and --sft-tokenizer-prompt-format go with --chat")
        return [tokenizer.tokenize(prompt) for prompt in args.prompt]
    chat = prompt_format(args, job_config)
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [chat.prompt([*system, {"role": "user", "content": prompt}], tokenizer)
            for prompt in args.prompt]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:  # every check before any process talks
        params = SamplingParams(args.greedy, args.temperature, args.top_k, args.top_p)
        info = read_checkpoint_info(args.load)
        tokenizer = build_tokenizer(**tokenizer_args(args, info.config))
        config = generation_config(info.model_config, resolve_world_size())
        prompts = prompt_ids(args, tokenizer, info.config)
        for prompt, ids in zip(args.prompt, prompts):
            if len(ids) + args.max_new_tokens > config.max_position_embeddings:
                raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens; with "
                                 f"--max-new-tokens {args.max_new_tokens} that exceeds the "
                                 f"model's max_position_embeddings="
                                 f"{config.max_position_embeddings}")
    except (ValueError, OSError) as error:
        raise SystemExit(f"generate.py: error: {error}") from error
    initialize_distributed()
    try:
        parallel_state.initialize_model_parallel(dist.get_world_size())
        model = load_for_generation(info.path, config)
        generator = torch.Generator(get_device()).manual_seed(args.seed)
        for prompt, tokens in zip(args.prompt, prompts):
            ids = torch.tensor([tokens], device=get_device())
            out = generate(model, ids, args.max_new_tokens, params, eod=tokenizer.eod,
                           generator=generator)
            if dist.get_rank() == 0:
                new = [t for t in out[0, ids.size(1):].tolist() if t != tokenizer.eod]
                print(f"{prompt}\n{'-' * 40}\n{tokenizer.detokenize(new)}\n", flush=True)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
