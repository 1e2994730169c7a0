"""Check ``tools/convert_checkpoint.py mp-to-megatron`` against real Megatron-Core: for each
variant of ``tools/make_megatron_fixture.py`` (`VARIANTS`), an mp model of its shape (the mp
config `mp.checkpointing.megatron` reads from the variant's args) with weights of its own
(the variant's fixture converted to mp, every weight plus N(0, 0.1) noise, so nothing equals
what Megatron saved) is saved as an mp checkpoint and run by mp on `TOKENS` (one process);
the export (``--transformer-impl local``) is then loaded by Megatron-Core at each ``--tp``
the way Megatron-LM's ``load_checkpoint`` does (``dist_checkpointing.load`` of the model's
``sharded_state_dict`` with ``strict='assume_ok_unexpected'``, then a strict
``load_state_dict``), built from the checkpoint's own ``args`` (plus the run's choices: the
allgather dispatcher, the legacy GroupedMLP for ``moe_grouped_gemm``), and its logits are
compared with mp's::

    /tmp/mcvenv/bin/python tools/verify_megatron_export.py --tp 1 2

It prints one row per variant and TP size and exits non-zero when a relative difference reaches
1e-5. Needs the virtual environment of ``tools/make_megatron_fixture.py`` (megatron-core 0.14).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp_spawn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_megatron_fixture import (  # noqa: E402  (a sibling script, not a package)
    TOKENS,
    VARIANTS,
    build_model,
    causal_inputs,
    patch_cuda_only_calls,
)


def _mp_reference(name: str, directory: Path, seed: int) -> tuple[Path, Path]:
    """An mp checkpoint of variant ``name``'s shape with weights of its own, its export
    (``--transformer-impl local``), and mp's logits ``[b, s, padded vocab]`` on `TOKENS`
    (``<directory>/mp_logits.pt``); one process."""
    import convert_checkpoint

    from mp import parallel_state as ps
    from mp.checkpointing import load_checkpoint, megatron, megatron_files, save_global_model
    from mp.model import GPTModel
    args, weights = megatron_files.read_checkpoint(Path(__file__).resolve().parent.parent
                                                   / "tests" / "fixtures" / "megatron" / name)
    config = megatron.config_from_args(args)
    generator = torch.Generator().manual_seed(seed)
    own = {k: v + 0.1 * torch.randn(v.shape, generator=generator)
           for k, v in megatron.megatron_to_mp(weights, config).items()}
    shutil.rmtree(directory, ignore_errors=True)
    mp_dir, export = directory / "mp", directory / "megatron"
    save_global_model(mp_dir, config, own, iteration=7)
    convert_checkpoint.main(["mp-to-megatron", "--load", str(mp_dir), "--save", str(export),
                             "--transformer-impl", "local"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + seed % 100))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1)
    model = GPTModel(config).eval()
    load_checkpoint(str(mp_dir), model)
    with torch.no_grad():
        logits = model(TOKENS)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    torch.save({"tokens": TOKENS.clone(), "logits": logits.contiguous()},
               directory / "mp_logits.pt")
    return export, directory / "mp_logits.pt"


def _verify_rank(rank: int, world: int, port: int, export: str, reference: str, tp: int,
                 results: str) -> None:
    """Load ``export`` in Megatron-Core at TP ``tp`` as Megatron-LM does and write how far its
    logits are from mp's (``reference``) to ``results`` (rank 0): the largest difference,
    the norm-wise relative one, the checkpoint's iteration."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    patch_cuda_only_calls()
    common = dist_checkpointing.load_common_state_dict(export)
    args = copy.copy(common["args"])  # the run's choices on top of the checkpoint's model
    args.tensor_model_parallel_size, args.expert_model_parallel_size = tp, 1
    if args.num_experts:
        args.moe_token_dispatcher_type = "allgather"
        args.moe_use_legacy_grouped_gemm = args.moe_grouped_gemm
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = build_model(args)
    sharded = {"model": model.sharded_state_dict(metadata=common.get("content_metadata"))}
    state = dist_checkpointing.load(sharded, export, strict="assume_ok_unexpected")
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    mask, positions = causal_inputs(TOKENS)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(TOKENS, positions, mask))
    if rank == 0:
        want = torch.load(reference, weights_only=True)["logits"].double()
        error = logits.double() - want  # largest, and norm-wise relative
        Path(results).write_text(f"{error.abs().max().item():.3e} "
                                 f"{(error.norm() / want.norm()).item():.3e} "
                                 f"{common['iteration']}")
    dist.destroy_process_group()


def verify_export(variants: list[str], tps: list[int], port: int, work: Path) -> bool:
    """`_mp_reference` and `_verify_rank` for each variant and TP size; prints a table."""
    ok = True
    print("variant            TP  max |mc - mp|  |mc - mp| / |mp|  iteration")
    for offset, name in enumerate(variants):
        export, reference = _mp_reference(name, work / name, seed=offset)
        iteration = (export / "latest_checkpointed_iteration.txt").read_text()
        for tp in tps:
            results = work / name / f"tp{tp}.txt"
            mp_spawn.spawn(_verify_rank, args=(tp, port + 10 * offset + tp, str(
                export / f"iter_{int(iteration):07d}"), str(reference), tp, str(results)),
                nprocs=tp, join=True)
            diff, relative, saved = results.read_text().split()
            ok &= float(relative) < 1e-5
            print(f"{name:18} {tp:2}  {float(diff):12.3e}  {float(relative):16.3e}  {saved}")
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2],
                        help="the tensor-parallel sizes to load the exports at")
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--work", default="/tmp/mp_megatron_export",
                        help="where to write the checkpoints")
    args = parser.parse_args(argv)
    if not verify_export(args.variants, args.tp, args.port, Path(args.work)):
        raise SystemExit("verify_megatron_export.py: Megatron-Core's logits differ from mp's")


if __name__ == "__main__":
    main()
