"""Per-layer 0/1 patterns: which layers of a mixture-of-experts model have experts
(Megatron's ``--moe-layer-freq``) and which attend through a sliding window (its
``--window-attn-skip-freq``): every ``n``-th layer, a 0/1 flag per layer, or an expression of
such lists."""

from __future__ import annotations

import ast


def moe_layer_pattern(num_layers: int, num_moe_experts: int | None,
                      moe_layer_freq: int | list[int]) -> tuple[int, ...]:
    """1 for each layer with experts, 0 for each dense one."""
    if num_moe_experts is None:
        return (0,) * num_layers
    if isinstance(moe_layer_freq, list):
        return tuple(moe_layer_freq)
    return tuple(int(i % moe_layer_freq == 0) for i in range(num_layers))


def layer_pattern(text: str, name: str = "moe_layer_freq") -> list[int]:
    """Megatron's expression of a per-layer pattern (the ``name`` field's), lists of integers
    joined by ``+`` and repeated by ``*`` (``"([1]*3+[0])*2"``), as a list; read without
    ``eval``."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # quoted once more
            return value(ast.parse(node.value.strip(), mode="eval").body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [item for element in node.elts for item in _as_list(value(element))]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) \
                    and isinstance(right, list):
                return left + right
            if isinstance(node.op, ast.Mult) and isinstance(left, list) \
                    and isinstance(right, int):
                return left * right
        raise ValueError
    try:
        pattern = value(ast.parse(text.strip(), mode="eval").body)
        if not isinstance(pattern, list):
            raise ValueError
    except (SyntaxError, ValueError, RecursionError):
        raise ValueError(f"{name}={text!r} must be an integer, a list of 0/1 per layer "
                         "or an expression of lists joined by + and repeated by * such as "
                         "'([0]*3+[1]*58)'") from None
    return pattern


def _as_list(item) -> list:
    return item if isinstance(item, list) else [item]
