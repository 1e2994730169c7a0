"""A ``training.deepspeed`` job's configuration: DeepSpeed's JSON joined to the mp config
(`deepspeed_config`), and the refusals checked before any process group
(`check_deepspeed_supported`). The engine and the loop are `mp.training.deepspeed`'s.
"""

from __future__ import annotations

import copy
import json
import math
import os

from mp.checkpointing.files import find_checkpoint
from mp.checkpointing.job import DEEPSPEED_LATEST
from mp.config import JobConfig
from mp.device import get_device

INSTALL_HINT = 'pip install -e ".[deepspeed]"'
ZERO_STAGES = (1, 2)


def import_deepspeed():
    """``deepspeed``, imported for this rank's device (see the module doc). ValueError, with
    the install command, when it is not importable."""
    if get_device().type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except Exception as error:  # ImportError, or a broken install failing at import
        raise ValueError(f"training.deepspeed=true but DeepSpeed is not importable ({error}); "
                         f"install it with {INSTALL_HINT}") from error
    return deepspeed


def _read_json(path: str | None) -> dict:
    if path is None:
        raise ValueError("training.deepspeed=true needs training.deepspeed_config "
                         "(--deepspeed-config ds.json, DeepSpeed's JSON config; examples in "
                         "configs/deepspeed/)")
    try:
        with open(path, encoding="utf-8") as file:
            ds = json.load(file)
    except OSError as error:
        raise ValueError(f"training.deepspeed_config={path!r} cannot be read: "
                         f"{error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"training.deepspeed_config={path!r} is not valid JSON: {error}") \
            from error
    if not isinstance(ds, dict):  # a config error like the others: ValueError, not TypeError
        raise ValueError(  # noqa: TRY004
            f"training.deepspeed_config={path!r} must hold a JSON object, not "
            f"{type(ds).__name__}")
    return ds


def _agree(ds: dict, key: str, value, source: str, path: str) -> None:
    """Fill ``ds[key]`` with mp's ``value`` (``source`` says where it comes from) when absent
    or ``"auto"``; else it must equal it."""
    given = ds.get(key)
    if given is None or given == "auto":
        ds[key] = value
    elif isinstance(given, bool) or not isinstance(given, (int, float)) or given != value:
        raise ValueError(f"{path}: {key}={given!r} contradicts the mp config, {source} = "
                         f"{value!r}; drop {key} from the JSON (mp fills it in) or make them "
                         "agree")


def _enabled(ds: dict, section: str) -> bool | None:
    """True/False when ``ds[section]["enabled"]`` says so; None when absent or ``"auto"``."""
    block = ds.get(section)
    if block is None:
        return None
    value = block.get("enabled", False) if isinstance(block, dict) else block
    return None if value == "auto" else bool(value)


def _precision(ds: dict, cfg: JobConfig, path: str) -> None:
    """Make the ``bf16``/``fp16`` sections say what ``model.precision`` says, or refuse."""
    tr, precision = cfg.training, cfg.model.precision
    for section in ("amp", "torch_autocast"):
        if _enabled(ds, section):
            raise ValueError(f"{path}: {section}.enabled=true is not supported with mp: the "
                             f"parameters' precision is model.precision={precision!r} (fp32, "
                             "bf16 or fp16)")
    for section in ("bf16", "fp16"):
        enabled = _enabled(ds, section)
        if enabled and precision != section:
            raise ValueError(f"{path}: {section}.enabled=true contradicts model.precision="
                             f"{precision!r}; set --model.precision {section} or drop the "
                             f"{section} section")
        if enabled is False and precision == section:
            raise ValueError(f"{path}: {section}.enabled=false contradicts model.precision="
                             f"{precision!r}; drop the {section} section (mp enables it)")
    if precision == "fp32":
        return
    block = ds[precision] = dict(ds.get(precision) or {})
    block["enabled"] = True
    if precision == "fp16":  # mp's loss-scaling settings, unless the JSON has its own
        block.setdefault("loss_scale", 0 if tr.loss_scale is None else tr.loss_scale)
        block.setdefault("initial_scale_power", round(math.log2(tr.initial_loss_scale)))
        block.setdefault("loss_scale_window", tr.loss_scale_window)
        block.setdefault("hysteresis", tr.hysteresis)
        block.setdefault("min_loss_scale", tr.min_loss_scale)


def deepspeed_config(cfg: JobConfig, world_size: int) -> dict:
    """``training.deepspeed_config``'s JSON joined to ``cfg`` for ``world_size`` ranks (see
    the module doc): what ``deepspeed.initialize`` gets. ValueError when they disagree."""
    path = cfg.training.deepspeed_config
    ds = copy.deepcopy(_read_json(path))
    tr = cfg.training
    dp = cfg.data_parallel_size(world_size)
    _agree(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size,
           "training.micro_batch_size", path)
    _agree(ds, "gradient_accumulation_steps", cfg.num_microbatches(world_size),
           f"training.global_batch_size / (micro_batch_size x data-parallel size) = "
           f"{tr.global_batch_size} / ({tr.micro_batch_size} x {dp})", path)
    _agree(ds, "train_batch_size", tr.global_batch_size, "training.global_batch_size", path)
    _agree(ds, "gradient_clipping", tr.clip_grad, "training.clip_grad", path)
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage") if isinstance(zero, dict) else zero
    if stage == 3:
        raise ValueError(f"{path}: zero_optimization.stage=3 is not supported with mp's tensor "
                         "parallelism (ZeRO-3 partitions the parameters mp has already sharded); "
                         "use stage 1 or 2")
    if stage not in ZERO_STAGES:
        given = " is not set (DeepSpeed's default is 0)" if stage is None else f"={stage!r}"
        raise ValueError(f"{path}: zero_optimization.stage{given}: mp runs DeepSpeed with "
                         "ZeRO stage 1 or 2 (without ZeRO, drop --deepspeed: mp's own data "
                         "parallelism does the same)")
    if "scheduler" in ds:
        raise ValueError(f"{path}: a scheduler section is not supported: the learning rate "
                         "follows mp's schedule (training.lr, min_lr, lr_warmup_*, lr_decay_*, "
                         "lr_wsd_*, lr_decay_style); drop the section")
    _precision(ds, cfg, path)
    return ds


def check_deepspeed_supported(cfg: JobConfig, world_size: int) -> None:
    """The refusals of a ``training.deepspeed`` job (ValueError); needs no process group but
    imports DeepSpeed."""
    tr, m = cfg.training, cfg.model
    if m.pipeline_model_parallel_size > 1:
        raise ValueError(f"training.deepspeed=true with model.pipeline_model_parallel_size="
                         f"{m.pipeline_model_parallel_size}: not supported (DeepSpeed runs "
                         "here with tensor and data parallelism only); use "
                         "--pipeline-model-parallel-size 1, or drop --deepspeed")
    if m.context_parallel_size > 1:
        raise ValueError(f"training.deepspeed=true with model.context_parallel_size="
                         f"{m.context_parallel_size}: not supported (DeepSpeed would reduce "
                         "gradients over data parallel only); use --context-parallel-size 1, "
                         "or drop --deepspeed")
    if tr.use_distributed_optimizer:
        raise ValueError("training.deepspeed=true with training.use_distributed_optimizer=true: "
                         "choose one (ZeRO stage 1/2 already shards the optimizer state)")
    if tr.rampup_batch_size is not None:
        raise ValueError(f"training.deepspeed=true with training.rampup_batch_size="
                         f"{tr.rampup_batch_size}: not supported (DeepSpeed's engine fixes "
                         "train_batch_size and its accumulation steps); drop one of them")
    load = tr.load
    if load is not None and not os.path.isfile(os.path.join(load, DEEPSPEED_LATEST)) \
            and find_checkpoint(load) is not None:
        raise ValueError(f"training.load={load!r} holds an mp-format checkpoint, which does not "
                         "load into a --deepspeed job (it resumes DeepSpeed checkpoints: a "
                         "'latest' file and iter_NNNNNNN folders)")
    deepspeed_config(cfg, world_size)
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(),
                 "fp16": accelerator.is_fp16_supported()}
    if not supported[m.precision]:
        raise ValueError(f"model.precision={m.precision!r}: DeepSpeed's "
                         f"{accelerator.device_name()} accelerator does not support it; use "
                         + " or ".join(p for p, ok in supported.items() if ok))
