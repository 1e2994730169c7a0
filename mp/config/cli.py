"""`parse_args`: the pretraining job's command line, ``--config PATH`` and overrides, to a
`JobConfig`, with a ``--help`` generated from the schema."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from mp.config.coerce import ConfigError, describe, field_annotations
from mp.config.job import SECTIONS, JobConfig
from mp.config.loader import load_config
from mp.config.megatron_flags import ALIASES, CONSTANT_FLAGS, DEFERRED_FLAGS, MEGATRON_VALUES
from mp.config.megatron_notices import CHOICE_FLAGS, NO_EFFECT_FLAGS
from mp.config.overrides import no_effect_notices

CONFIG_FLAG = "--config"


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None,
               prog: str | None = None) -> JobConfig:
    """``load_config(PATH, overrides, world_size)`` from ``[--config PATH] [overrides...]``
    (``argv`` defaults to ``sys.argv[1:]``; overrides as in `mp.config.overrides`; without
    ``--config`` the flags give the whole job, as on Megatron-LM's command line).

    Like argparse, ``-h``/``--help`` prints `help_text` and exits with status 0, and a bad
    command line or config prints ``PROG: error: MESSAGE`` to stderr and exits with status 2
    (any other exception the config raises too, its type named: never a traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "pretrain_gpt.py")
    if "-h" in argv or "--help" in argv:
        print(help_text(prog))
        raise SystemExit(0)
    try:
        path, overrides = _split_config_flag(argv)
        return load_config(path, overrides, world_size)
    except (ValueError, OSError) as error:  # ConfigError, TransformerConfig's, a missing file
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except Exception as error:  # any other: still one line, never a traceback
        print(f"{prog}: error: {type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(2) from error


def flag_notices(argv: Sequence[str]) -> list[str]:
    """The notices a job prints for the flags of ``argv`` (a command line that `parse_args`
    took) that change nothing in mp (`mp.config.megatron_notices.NO_EFFECT_FLAGS`)."""
    return no_effect_notices(_split_config_flag(list(argv))[1])


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(PATH, the other arguments)`` from ``--config PATH`` or ``--config=PATH``; PATH is
    None without one."""
    for i, token in enumerate(argv):
        if token == CONFIG_FLAG:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{CONFIG_FLAG} needs a PATH (a YAML file such as "
                                  "configs/gpt-tiny.yaml)")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if token.startswith(CONFIG_FLAG + "="):
            return token.partition("=")[2], argv[:i] + argv[i + 1:]
    return None, argv


def help_text(prog: str = "pretrain_gpt.py") -> str:
    """The usage, the Megatron flags and every ``--section.key`` with its type and default."""
    lines = [
        f"usage: {prog} [{CONFIG_FLAG} PATH] [--section.key VALUE | --megatron-flag VALUE ...]",
        "",
        "Reads the YAML config at PATH, applies the overrides left to right and checks the",
        "result for the world size (WORLD_SIZE, set by torchrun; 1 without it). Without",
        f"{CONFIG_FLAG}, the defaults below and the flags make the job, as in Megatron-LM.",
        "  --section.key VALUE, --section.key=VALUE  set any key listed below; null is None",
        "  --section.key (a bool key alone)          set it to true",
        "  --data-path 0.3 a 0.7 b                   a list key takes values up to the next --",
        "",
        "Megatron-LM flags:",
    ]
    width = max(map(len, [*ALIASES, *CONSTANT_FLAGS, *DEFERRED_FLAGS, *NO_EFFECT_FLAGS,
                          *CHOICE_FLAGS])) + 2
    for flag, key in ALIASES.items():
        values = ", ".join(f"{m} = {v}" for m, v in MEGATRON_VALUES.get(flag, {}).items())
        lines.append(f"  {flag:<{width}}{key}" + (f" (Megatron's {values})" if values else ""))
    lines += [f"  {flag:<{width}}{key}={value}" for flag, (key, value) in CONSTANT_FLAGS.items()]
    lines += [f"  {flag:<{width}}{what}" for flag, what in DEFERRED_FLAGS.items()]
    lines += [f"  {flag:<{width}}no effect: {why}" for flag, (_, why) in NO_EFFECT_FLAGS.items()]
    lines += [f"  {flag:<{width}}accepted as {' '.join(accepted)}: {why}"
              for flag, (accepted, why) in CHOICE_FLAGS.items()]
    for name, section_cls in SECTIONS.items():
        lines += ["", f"{name}:"]
        annotations = field_annotations(section_cls)
        for f in dataclasses.fields(section_cls):
            lines.append(f"  --{name}.{f.name}: {describe(annotations[f.name])}"
                         f"{_default_text(f)}")
    return "\n".join(lines)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return " (required)"
    return f" (default {json.dumps(default)})"  # JSON is YAML: null, true, "auto", [...]
