"""Checkpoints: exact resume, loading at any parallel layout, and conversion.

- `save_checkpoint` / `load_checkpoint` (`mp.checkpointing.checkpoint`): a job's model,
  optimizer (fp32 masters, AdamW moments), LR schedule, loss scaler, iteration, consumed
  samples, every rank's RNG states and the resolved config; collective over the ranks.
- `save_global_model` / `load_global_model`: whole weights in one process (tools).
- `read_checkpoint_info`: what a checkpoint holds, from its metadata alone.
- `resolve_checkpoint`, `find_checkpoint`, `read_latest` (`mp.checkpointing.files`): where the
  newest complete checkpoint of a save directory is (or a given iteration's).
- `mp.checkpointing.job`: the pretraining job's resume and save hook;
  `mp.checkpointing.hf_gpt2`, `hf_llama` (with `hf_llama_config`), `hf_starcoder2`,
  `hf_deepseek`, `hf_gpt_oss`: Hugging Face weights to and from global names;
  `mp.checkpointing.megatron`: Megatron-Core checkpoints to global names.
- `CheckpointError`, `CorruptCheckpointError`.

See docs/checkpoints.md for the format and the guarantees.
"""

from mp.checkpointing.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    load_global_model,
    read_checkpoint_info,
    save_checkpoint,
    save_global_model,
)
from mp.checkpointing.errors import CheckpointError, CorruptCheckpointError
from mp.checkpointing.files import find_checkpoint, read_latest, resolve_checkpoint

__all__ = [
    "CheckpointError", "CheckpointInfo", "CorruptCheckpointError", "find_checkpoint",
    "load_checkpoint", "load_global_model", "read_checkpoint_info", "read_latest",
    "resolve_checkpoint", "save_checkpoint", "save_global_model",
]
