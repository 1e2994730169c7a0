"""Serve text generation from an mp checkpoint over HTTP (`mp.text_generation_server`),
Megatron-LM's ``tools/run_text_generation_server.py`` API, at any tensor-parallel size.

    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load ckpt --port 5000
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["def main("], "tokens_to_generate": 32, "top_k": 1}'

The model, tokenizer and the prompt format of conversation prompts come from the checkpoint as
for ``tools/generate.py`` (`mp.generation_setup`); the tensor-parallel size is the world size.
Rank 0 listens on ``--host:--port``; the server runs until interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist

from mp import parallel_state
from mp.checkpointing import read_checkpoint_info
from mp.config import resolve_world_size
from mp.data.tokenizer import build_tokenizer
from mp.generation_setup import (
    add_checkpoint_arguments,
    generation_config,
    load_for_generation,
    prompt_format,
    tokenizer_args,
)
from mp.initialize import initialize_distributed
from mp.text_generation_server import serve


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_text_generation_server.py",
                                description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p)
    p.add_argument("--host", default="0.0.0.0", help="rank 0's address to listen on")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--heartbeat-seconds", type=float, default=60.0,
                   help="while idle, rank 0 wakes the other ranks this often (below the "
                        "collectives' timeout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:  # every check before any process talks
        info = read_checkpoint_info(args.load)
        tokenizer = build_tokenizer(**tokenizer_args(args, info.config))
        chat = prompt_format(args, info.config)
        config = generation_config(info.model_config, resolve_world_size())
    except (ValueError, OSError) as error:
        raise SystemExit(f"run_text_generation_server.py: error: {error}") from error
    initialize_distributed()
    try:
        parallel_state.initialize_model_parallel(dist.get_world_size())
        model = load_for_generation(info.path, config)
        serve(model, tokenizer, args.host, args.port, heartbeat_s=args.heartbeat_seconds,
              on_listening=lambda port: print(f"serving PUT http://{args.host}:{port}/api",
                                              flush=True), prompt_format=chat)
    except KeyboardInterrupt:
        pass
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
