"""Job configs: YAML files plus command-line overrides to a checked `JobConfig`.

- `load_config(path, overrides, world_size)` and `parse_args(argv)` (``--config PATH`` and
  overrides, for ``launch/pretrain_gpt.py``, which also prints `flag_notices`) in
  `mp.config.loader` / `mp.config.cli`;
- `JobConfig` (sections ``model``, ``training``, ``data``, ``logging``), `format_config` and
  `resolve_world_size` in `mp.config.job`; the sections in `mp.config.training_section`
  and `mp.config.sections` (their shared checks in `mp.config.section`);
- the override syntax and Megatron flag aliases in `mp.config.overrides`;
- value conversion and `ConfigError` in `mp.config.coerce`;
- `BatchSchedule` (the global batch size along the run, its ramp) in `mp.config.batch_schedule`.
"""

from mp.config.batch_schedule import BatchSchedule
from mp.config.cli import flag_notices, help_text, parse_args
from mp.config.coerce import ConfigError
from mp.config.job import JobConfig, format_config, known_keys, resolve_world_size
from mp.config.loader import load_config
from mp.config.sections import BUILTIN_DATA_PATH, DataConfig, LoggingConfig
from mp.config.training_section import TrainingConfig

__all__ = [
    "BatchSchedule",
    "BUILTIN_DATA_PATH",
    "ConfigError",
    "DataConfig",
    "JobConfig",
    "LoggingConfig",
    "TrainingConfig",
    "flag_notices",
    "format_config",
    "help_text",
    "known_keys",
    "load_config",
    "parse_args",
    "resolve_world_size",
]
