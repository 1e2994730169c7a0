"""Command-line overrides of a config: ``--section.key VALUE`` for any key, and Megatron-LM's
common flags as aliases (their tables: `mp.config.megatron_flags`; the flags accepted without
effect or refused: `mp.config.megatron_notices`).

Syntax, applied left to right (a later override of the same key wins):

- ``--section.key VALUE`` or ``--section.key=VALUE`` sets any key of `known_keys`, e.g.
  ``--training.lr 3e-4``, ``--model.hidden_size=256``; dashes in the key are read as
  underscores (``--training.micro-batch-size 4``). ``VALUE`` is read as the key's type (see
  `mp.config.coerce`): ``null`` for None, ``true``/``false`` for a bool.
- A bool key may stand alone for ``true``: ``--model.sequence_parallel``.
- A list key takes every value up to the next ``--option``:
  ``--data-path 0.3 a 0.7 b``, ``--rampup-batch-size 16 16 5859375`` (or one value with
  ``=``; ``null`` unsets an optional list).
- A Megatron flag, ``--tensor-model-parallel-size 2`` or ``--lr=3e-4``, is its key's alias
  (`ALIASES` maps each to its key). ``--bf16``, ``--fp16`` set ``model.precision`` and
  ``--swiglu`` sets ``model.activation``, ``--apex-fused-adam`` and ``--apex-layer-norm``
  choose apex's optimizer and norms; they take no value.
  ``--num-layers-per-virtual-pipeline-stage N`` sets ``model.virtual_pipeline_model_parallel_size``
  to ``num_layers / pipeline_model_parallel_size / N`` (after every other override); with an
  uneven split (``--decoder-first-pipeline-num-layers`` and the like) give the chunks per stage
  instead, ``--num-virtual-stages-per-pipeline-rank V``, as Megatron asks.
  Other value-less flags (`CONSTANT_FLAGS`) set a key to a fixed value the same way:
  ``--disable-bias-linear``, ``--use-rotary-position-embeddings``, ``--use-flash-attn``,
  ``--recompute-activations`` (selective recompute, as in Megatron), ... A recompute
  granularity other than ``full`` given on the command line drops the config file's
  ``recompute_method`` and ``recompute_num_layers`` (full recompute's) unless it gives them.
- ``--attention-backend`` also takes Megatron's values (`MEGATRON_VALUES`): ``auto``,
  ``flash`` and ``fused`` are ``sdpa`` (PyTorch picks the flash or cuDNN kernel), ``local``
  (matmul, fused softmax, matmul) is ``unfused``.
  ``--cp-comm-type allgather`` is ``all_gather``; ``--position-embedding-type yarn``
  (Megatron-Core's GPTModel) is ``rope`` with ``model.rope_type yarn`` (`IMPLIED_VALUES`).
  Megatron flags that take a list where mp takes one value (`ONE_VALUE_FLAGS`:
  ``--cp-comm-type`` per layer, ``--moe-router-load-balancing-type`` and
  ``--moe-aux-loss-coeff`` per loss) are errors with more than one value, saying what mp
  takes.
- ``--group-query-attention`` turns on grouped-query attention as in Megatron, where
  ``--num-query-groups`` then defaults to 1 (multi-query attention): it sets
  ``model.num_query_groups`` to 1 unless the config or the command line gives a count.
  Unlike Megatron, ``--num-query-groups G`` alone takes effect too.
- ``--no-position-embedding`` (no learned absolute position embedding) changes nothing with
  RoPE, which adds none; otherwise it sets ``model.position_embedding_type`` to ``none`` (no
  position information but the causal mask), as in Megatron.

- Megatron flags that would change nothing in mp (`NO_EFFECT_FLAGS`, such as
  ``--use-mcore-models`` or ``--ckpt-format torch_dist``) are accepted, and the job prints why
  each changes nothing. Flags of features mp does not have (`UNSUPPORTED_FLAGS`,
  `UNSUPPORTED_PREFIXES`: FP8, mixture of experts, FSDP, ...) are errors that say so, and so
  are the values mp lacks of `CHOICE_FLAGS` (``--rerun-mode`` other than ``disabled``, ...).

A value never starts with ``--`` unless it is given with ``=``.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass

from mp.config.coerce import ConfigError, coerce, field_annotations, unknown_key_message
from mp.config.job import SECTIONS, known_keys
from mp.config.megatron_flags import (
    ALIASES,
    BUCKET_SIZE_FLAG,
    CONSTANT_FLAGS,
    DEFERRED_FLAGS,
    GROUP_QUERY_FLAG,
    IMPLIED_VALUES,
    MEGATRON_VALUES,
    LIMITED_DEVICES_FLAG,
    MOE_LAYER_RECOMPUTE_FLAG,
    NO_POSITION_EMBEDDING_FLAG,
    ONE_VALUE_FLAGS,
    VIRTUAL_STAGE_FLAG,
)
from mp.config.megatron_notices import (
    CHOICE_FLAGS,
    NO_EFFECT_FLAGS,
    UNSUPPORTED_FLAGS,
    UNSUPPORTED_PREFIXES,
)
from mp.model.pipeline_split import UNEVEN_SPLIT_FIELDS


@dataclass(frozen=True)
class _Option:
    """What one ``--option`` sets and how many values it takes."""

    key: str | None  # None: a flag of DEFERRED_FLAGS (resolved after the others), of
    # CHOICE_FLAGS (checked after them) or of NO_EFFECT_FLAGS
    min_values: int
    max_values: int | None  # None: any number
    constant: str | None = None


def apply_overrides(sections: dict, args: Sequence[str]) -> None:
    """Apply command-line overrides (module doc) to ``{section: {key: value}}`` in place.

    Values are stored as given (text); `JobConfig.from_dict` converts them to their types.
    """
    deferred: dict[str, list[str]] = {}
    constants_given: dict[str, str] = {}
    given = set()  # the keys the command line sets
    for name, option, values in _split_options(args):
        given.add(option.key)
        if option.key is None:
            deferred[name] = values
        elif option.constant is not None:
            earlier = constants_given.setdefault(option.key, name)
            if CONSTANT_FLAGS[earlier][1] != option.constant:
                raise ConfigError(f"{name} conflicts with {earlier} (both set {option.key})")
            _set(sections, option.key, option.constant)
        elif option.max_values is None:  # one value is read as one item, or as null
            _set(sections, option.key, values[0] if len(values) == 1 else values)
        elif values:
            _set(sections, option.key, MEGATRON_VALUES.get(name, {}).get(values[0], values[0]))
            if (name, values[0]) in IMPLIED_VALUES:
                _set(sections, *IMPLIED_VALUES[name, values[0]])
        else:
            _set(sections, option.key, "true")
    for name, (accepted, why) in CHOICE_FLAGS.items():
        others = [value for value in deferred.get(name, ()) if not _is_one_of(value, accepted)]
        if others:
            raise ConfigError(f"{name} {' '.join(others)}: {why}; only "
                              f"{', '.join(accepted)} is accepted")
    model = sections.get("model") or {}
    if GROUP_QUERY_FLAG in deferred and "num_query_groups" not in model:
        _set(sections, "model.num_query_groups", 1)
    if NO_POSITION_EMBEDDING_FLAG in deferred and model.get("position_embedding_type") != "rope":
        _set(sections, "model.position_embedding_type", "none")
    if BUCKET_SIZE_FLAG in deferred:
        _set(sections, "training.bucket_size_mb",
             _bucket_megabytes(sections.get("training") or {}, deferred[BUCKET_SIZE_FLAG][0]))
    if VIRTUAL_STAGE_FLAG in deferred:
        layers_per_stage = coerce(VIRTUAL_STAGE_FLAG, deferred[VIRTUAL_STAGE_FLAG][0], int)
        vpp = _virtual_stages(model, layers_per_stage)
        _set(sections, "model.virtual_pipeline_model_parallel_size", vpp)
    if LIMITED_DEVICES_FLAG in deferred and "moe_router_group_topk" not in model:
        _set(sections, "model.moe_router_num_groups",
             model.get("expert_model_parallel_size", 1))  # one group per EP rank
        _set(sections, "model.moe_router_group_topk", deferred[LIMITED_DEVICES_FLAG][0])
    if MOE_LAYER_RECOMPUTE_FLAG in deferred:
        _set(sections, "model.recompute_modules", _with_moe_recompute(model))
        _set(sections, "model.recompute_granularity", "selective")
        given.add("model.recompute_granularity")
    _drop_full_recompute_settings(sections, given)


def _drop_full_recompute_settings(sections: dict, given: set) -> None:
    """A command line that makes the recompute other than ``full`` (``--recompute-activations``
    over a config file with full recompute) drops the file's full-recompute method and layer
    count, unless it gives them itself: they would contradict it."""
    model = sections.get("model") or {}
    if "model.recompute_granularity" in given and model.get("recompute_granularity") != "full":
        for name in ("recompute_method", "recompute_num_layers"):
            if f"model.{name}" not in given:
                model.pop(name, None)


def _with_moe_recompute(model: dict) -> list:
    """The recompute modules with ``moe`` added, as Megatron turns ``--moe-layer-recompute``
    into selective recompute: the modules given, or none (not the default ``core_attn``).
    Refused over full recompute, as in Megatron."""
    if model.get("recompute_granularity") == "full":
        raise ConfigError(f"{MOE_LAYER_RECOMPUTE_FLAG} conflicts with model.recompute_granularity"
                          "=full (Megatron's rule): it makes the recompute selective, with "
                          "'moe' among model.recompute_modules")
    modules = model.get("recompute_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    return modules if "moe" in modules else [*modules, "moe"]


def _set(sections: dict, key: str, value) -> None:
    section, name = key.split(".")
    sections[section] = {**(sections.get(section) or {}), name: value}


def _split_options(args: Sequence[str]):
    """``(option name, its _Option, [values])`` for each ``--option`` of ``args``, in order."""
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ConfigError(
                f"unexpected argument {token!r}: overrides are --section.key VALUE, "
                "--section.key=VALUE or a Megatron flag such as --lr 3e-4"
            )
        name, equals, inline = token.partition("=")
        option = _option(name)
        i += 1
        if equals:
            values = [inline]
        else:
            values = []
            most = None if name in ONE_VALUE_FLAGS else option.max_values
            while (i < len(args) and not args[i].startswith("--")
                   and (most is None or len(values) < most)):
                values.append(args[i])
                i += 1
        if name in ONE_VALUE_FLAGS and len(values) > 1:
            raise ConfigError(f"{name} {' '.join(values)}: {ONE_VALUE_FLAGS[name]}")
        if len(values) < option.min_values:
            raise ConfigError(f"{name} needs a value")
        if option.max_values is not None and len(values) > option.max_values:
            raise ConfigError(f"{name} takes no value, got {inline!r}")
        yield name, option, values


def _option(name: str) -> _Option:
    """The `_Option` for ``--name``; an unknown option is an error naming the closest one."""
    if name in UNSUPPORTED_FLAGS:
        raise ConfigError(f"{name}: {UNSUPPORTED_FLAGS[name]}")
    if name in CHOICE_FLAGS:
        return _Option(None, 1, None)
    if name in DEFERRED_FLAGS:
        takes = int(name in (VIRTUAL_STAGE_FLAG, BUCKET_SIZE_FLAG, LIMITED_DEVICES_FLAG))
        return _Option(None, takes, takes)
    if name in NO_EFFECT_FLAGS:
        takes = NO_EFFECT_FLAGS[name][0]  # None: any number
        return _Option(None, takes or 0, takes)
    if name in CONSTANT_FLAGS:
        key, constant = CONSTANT_FLAGS[name]
        return _Option(key, 0, 0, constant)
    for prefix, why in UNSUPPORTED_PREFIXES.items():
        if name.startswith(prefix) and name not in ALIASES:
            raise ConfigError(f"{name}: {why}")
    key = ALIASES.get(name) or name[2:].replace("-", "_")
    if "." not in key or key not in known_keys():
        raise ConfigError(unknown_key_message("option", name, option_names()))
    section, field_name = key.split(".")
    annotation = field_annotations(SECTIONS[section])[field_name]
    if any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation))):
        return _Option(key, 1, None)
    if annotation is bool:
        return _Option(key, 0, 1)
    return _Option(key, 1, 1)


def option_names() -> list[str]:
    """Every option `apply_overrides` knows: the Megatron flags, then ``--section.key``."""
    return [*ALIASES, *CONSTANT_FLAGS, *DEFERRED_FLAGS, *NO_EFFECT_FLAGS, *CHOICE_FLAGS,
            *(f"--{k}" for k in known_keys())]


def no_effect_notices(args: Sequence[str]) -> list[str]:
    """One line for each `NO_EFFECT_FLAGS` flag in ``args`` (a valid command line), saying
    why it changes nothing."""
    return [f"notice: {' '.join([name, *values])} has no effect in mp: "
            f"{NO_EFFECT_FLAGS[name][1]}"
            for name, _, values in _split_options(args) if name in NO_EFFECT_FLAGS]


def _is_one_of(value: str, accepted: tuple[str, ...]) -> bool:
    """Whether ``value`` is one of ``accepted``, a number being equal to its value in any
    spelling (``5e-3`` is ``0.005``)."""
    try:
        return value in accepted or float(value) in {float(a) for a in accepted}
    except ValueError:
        return False


def _bucket_megabytes(training: dict, elements: str) -> float:
    """Megatron's ``--ddp-bucket-size`` (gradient elements per bucket) as mp's
    ``bucket_size_mb`` (exact: a whole number of elements times 2 or 4 bytes over 2^20)."""
    count = coerce(BUCKET_SIZE_FLAG, elements, int)
    if count < 1:
        raise ConfigError(f"{BUCKET_SIZE_FLAG}={count} must be >= 1 (elements per bucket)")
    bf16 = coerce("training.grad_reduce_in_bf16", training.get("grad_reduce_in_bf16", False),
                  bool)
    return count * (2 if bf16 else 4) / 2**20


def _virtual_stages(model: dict, layers_per_stage: int) -> int:
    """``num_layers / pipeline_model_parallel_size / layers_per_stage``, which must divide."""
    if layers_per_stage < 1:
        raise ConfigError(f"{VIRTUAL_STAGE_FLAG}={layers_per_stage} must be >= 1")
    if "num_layers" not in model:
        raise ConfigError(f"{VIRTUAL_STAGE_FLAG} needs model.num_layers")
    num_layers = coerce("model.num_layers", model["num_layers"], int)
    pp = coerce("model.pipeline_model_parallel_size",
                model.get("pipeline_model_parallel_size", 1), int)
    fields = field_annotations(SECTIONS["model"])
    for name in UNEVEN_SPLIT_FIELDS:
        value = coerce(f"model.{name}", model.get(name), fields[name]) if name in model else None
        if value is not None and value is not False:  # a count of 0 is set
            raise ConfigError(f"{VIRTUAL_STAGE_FLAG} assumes an even split and model.{name}="
                              f"{value!r} is set: give the chunks per stage with "
                              "--num-virtual-stages-per-pipeline-rank instead")
    if pp < 1 or num_layers % (pp * layers_per_stage):
        raise ConfigError(
            f"{VIRTUAL_STAGE_FLAG}={layers_per_stage} does not divide num_layers / "
            f"pipeline_model_parallel_size = {num_layers} / {pp}"
        )
    return num_layers // (pp * layers_per_stage)
