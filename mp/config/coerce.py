"""Config values to the types of dataclass fields, with errors that name the key and the rule.

YAML gives typed values (``8``, ``true``, ``null``) and the command line gives text (``"8"``);
both go through `coerce`, which reads a field's annotation:

=================  ==========================================================================
annotation         accepts
=================  ==========================================================================
``int``            an int (not a bool), or text ``int()`` reads: ``8``, ``-1``
``float``          an int or a float, or text ``float()`` reads: ``3e-4`` (PyYAML reads an
                   exponent without a dot, ``lr: 3e-4``, as a string, so strings are read too);
                   never inf or nan
``bool``           a bool, or text ``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``
``str``            text, or a number (written as text: ``split: 100`` is ``"100"``)
``X | None``       ``null``, or text ``null``/``none``/``~`` (any case), or an ``X``
``A | B``          the first of ``A``, ``B`` that accepts the value
``list[X]``        a list of ``X``, or one ``X`` (a list of one)
=================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping

_NONE_TEXT = {"null", "none", "~"}
_TRUE_TEXT = {"true", "yes", "on", "1"}
_FALSE_TEXT = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config key, value or combination of values that breaks a rule (the message names them)."""


class _Mismatch(Exception):
    """The value does not fit the annotation tried (internal: becomes a `ConfigError`)."""


def coerce(key: str, value, annotation):
    """``value`` as the type ``annotation`` names (see the module table), or a `ConfigError`
    such as ``training.micro_batch_size='abc' must be an int``."""
    try:
        return _coerce(value, annotation)
    except _Mismatch:
        raise ConfigError(f"{key}={value!r} must be {describe(annotation)}") from None


def describe(annotation) -> str:
    """What an annotation accepts, in words: ``an int or null``."""
    if _is_union(annotation):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_PLURALS[item]}"
    return _NAMES[annotation]


_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string",
          type(None): "null"}
_PLURALS = {int: "ints", float: "numbers", bool: "bools", str: "strings"}


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _union_members(annotation) -> list:
    """The members of a union, ``None`` first, so that text ``null`` means None, not ``"null"``."""
    members = typing.get_args(annotation)
    return sorted(members, key=lambda a: a is not type(None))


def _coerce(value, annotation):
    if _is_union(annotation):
        for member in _union_members(annotation):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        values = value if isinstance(value, list) else [value]
        return [_coerce(v, item) for v in values]
    text = value.strip() if isinstance(value, str) else None
    if annotation is type(None):
        if value is None or (text is not None and text.lower() in _NONE_TEXT):
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE_TEXT | _FALSE_TEXT:
            return text.lower() in _TRUE_TEXT
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            return _parse(int, text)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:
            number = _parse(float, text)
        else:
            raise _Mismatch
        if math.isfinite(number):
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"no config conversion for the annotation {annotation!r}")
    raise _Mismatch


def _parse(parser, text: str):
    try:
        return parser(text)
    except ValueError:
        raise _Mismatch from None


def build_dataclass(cls, section: str, values: Mapping):
    """``cls(**values)`` with each value coerced to its field's annotation; a field without a
    default that ``values`` lacks is an error (``model.num_layers is required``). Keys that are
    not fields are the caller's to reject (see `unknown_key_message`)."""
    annotations = field_annotations(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        if f.name in values:
            kwargs[f.name] = coerce(key, values[f.name], annotations[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key} is required (it has no default)")
    return cls(**kwargs)


def field_annotations(cls) -> dict[str, object]:
    """``{field name: resolved annotation}`` of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_message(what: str, name: str, known: Iterable[str]) -> str:
    """``unknown key 'training.lr_warmup'; did you mean 'training.lr_warmup_iters'?``.

    The suggestion is a known ``section.key`` with the same key in another section
    (``training.hidden_size`` -> ``model.hidden_size``), else the closest known name by
    `difflib`, else none.
    """
    known = list(known)
    _, dot, key = name.rpartition(".")
    moved = [k for k in known if dot and k.rpartition(".")[2] == key]
    close = moved or difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}{hint}"
