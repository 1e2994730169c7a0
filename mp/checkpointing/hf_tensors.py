"""What the Hugging Face converters (`mp.checkpointing.hf_gpt2`, `hf_llama`,
`hf_starcoder2`, ...) share: the padded vocabulary rows, zero-centred norm weights, separate
q, k, v projections fused as mp fuses them, and the checks of a state dict's names, its
output layer and the model an mp config describes."""

from __future__ import annotations

import torch

from mp.model.config import TransformerConfig


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (mp's padded vocabulary; never a target)."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def shift_norm_weights(weights: dict[str, torch.Tensor], config: TransformerConfig,
                       shift: float) -> dict[str, torch.Tensor]:
    """``weights`` (mp's global names) with ``shift`` added to each norm weight
    (``*layernorm.weight``, and multi-token prediction's ``enorm``, ``hnorm``) when
    ``config.layernorm_zero_centered_gamma``, else unchanged.

    Hugging Face's norms scale by their weight, a zero-centred mp norm by ``1 + weight``:
    mp's weight is Hugging Face's ``- 1`` (``shift=-1``) and back (``+1``). For Hugging Face
    weights in [0.5, 2] the subtraction is exact (Sterbenz's lemma), so their round trip
    through mp is bitwise."""
    if not config.layernorm_zero_centered_gamma:
        return weights
    return {k: v + shift if k.endswith(("layernorm.weight", ".enorm.weight", ".hnorm.weight"))
            else v for k, v in weights.items()}


def qkv_to_mp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              groups: int) -> torch.Tensor:
    """Separate ``q [a d, h]``, ``k, v [g d, h]`` (Llama's, StarCoder2's) -> mp's fused
    ``query_key_value`` ``[g (a / g + 2) d, h]``, laid per query group (the group's ``a / g``
    queries, its key, its value) so that a tensor-parallel slice holds whole groups; biases
    (``[a d]``, ``[g d]``) alike, to ``[g (a / g + 2) d]``."""
    per_group = [t.reshape(groups, -1, k.shape[0] // groups, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def qkv_to_hf(qkv: torch.Tensor, heads: int, groups: int) -> list[torch.Tensor]:
    """mp's fused QKV weight (or bias) -> ``[q, k, v]`` (the inverse of `qkv_to_mp`)."""
    per_group = qkv.reshape(groups, heads // groups + 2, -1, *qkv.shape[1:])
    q, k, v = per_group.split([heads // groups, 1, 1], dim=1)
    return [t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v)]


def check_keys(got: set[str], expected: set[str], what: str) -> None:
    """ValueError naming the first missing and unexpected names, if any."""
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                         f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")


def check_output_layer(head: torch.Tensor | None, embedding: torch.Tensor, tied: bool,
                       embedding_name: str) -> None:
    """``lm_head.weight`` (None when absent) against ``tie_word_embeddings``."""
    if tied and head is not None and not torch.equal(head, embedding):
        raise ValueError(f"tie_word_embeddings is true but lm_head.weight differs from "
                         f"{embedding_name}")
    if not tied and head is None:
        raise ValueError("tie_word_embeddings is false but the state dict has no lm_head.weight")


def llama_ends_to_mp(hf: dict[str, torch.Tensor], head: torch.Tensor | None,
                     config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's embedding, final norm and (untied) output layer from a Llama-style ``hf``
    (``embed_tokens.weight``, ``norm.weight``; ``head``: ``lm_head.weight`` or None), the
    vocabulary padded to ``config.padded_vocab_size`` rows."""
    tied = not config.untie_embeddings_and_output_weights
    check_output_layer(head, hf["embed_tokens.weight"], tied, "embed_tokens")
    rows = config.padded_vocab_size
    mp = {"embedding.word_embeddings.weight": pad_rows(hf["embed_tokens.weight"], rows),
          "decoder.final_layernorm.weight": hf["norm.weight"]}
    if not tied:
        mp["output_layer.weight"] = pad_rows(head, rows)
    return mp


def check_expressible(config: TransformerConfig, needs: dict[str, tuple], family: str) -> None:
    """ValueError naming each ``model.key`` whose value is not among ``needs[key]``."""
    wrong = [f"{k}={getattr(config, k)!r}" for k, v in needs.items() if getattr(config, k) not in v]
    if wrong:
        raise ValueError(f"model.{', model.'.join(wrong)}: {family} needs "
                         + ", ".join(f"{k} in {v!r}" for k, v in needs.items()))


def rope_parameters(hf: dict, default_base: float = 10000.0) -> tuple[str, float, dict]:
    """A Hugging Face config's RoPE, from ``rope_theta`` and ``rope_scaling`` or transformers
    5's ``rope_parameters``: ``(its scaling's kind, "default" for none; its base,
    ``default_base`` when it has none (the family's ``default_theta``); the scaling's
    parameters)``."""
    parameters = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    base = parameters.get("rope_theta", hf.get("rope_theta", default_base))
    return kind, float(base), parameters


def yarn_from_hf(parameters: dict) -> dict:
    """mp's YaRN fields of a ``rope_type: yarn`` scaling's ``parameters`` but its magnitude
    (``mscale``, ``mscale_all_dim``, ``attention_factor``: each family reads them), with
    transformers' defaults: ``beta_fast`` 32, ``beta_slow`` 1, and ``truncate`` true (the
    ramp's ends rounded to whole pairs: mp's ``yarn_correction_range_round_to_int``)."""
    return {"rope_type": "yarn", "yarn_rotary_scaling_factor": float(parameters["factor"]),
            "yarn_original_max_position_embeddings":
                parameters["original_max_position_embeddings"],
            "yarn_beta_fast": float(parameters.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(parameters.get("beta_slow") or 1.0),
            "yarn_correction_range_round_to_int": bool(parameters.get("truncate", True))}


def yarn_to_hf(config: TransformerConfig) -> dict:
    """The ``rope_parameters`` of mp model ``config``'s YaRN but its magnitude (the inverse of
    `yarn_from_hf`; ``truncate`` written when false, transformers' default being true)."""
    rounded = config.yarn_correction_range_round_to_int
    return {"rope_type": "yarn", "factor": config.yarn_rotary_scaling_factor,
            "original_max_position_embeddings": config.yarn_original_max_position_embeddings,
            "beta_fast": config.yarn_beta_fast, "beta_slow": config.yarn_beta_slow,
            **({} if rounded else {"truncate": False})}


def common_fields(hf: dict, tensor_model_parallel_size: int,
                  pipeline_model_parallel_size: int) -> dict:
    """The `TransformerConfig` fields the Llama-like and DeepSeek ``config.json`` give alike:
    no biases, no dropout on the hidden states (the attention's as given), the init std,
    tied or untied embeddings; and the parallel layout asked for."""
    return dict(add_bias_linear=False, hidden_dropout=0.0,
                attention_dropout=hf.get("attention_dropout", 0.0),
                init_method_std=hf.get("initializer_range", 0.02),
                untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
                tensor_model_parallel_size=tensor_model_parallel_size,
                pipeline_model_parallel_size=pipeline_model_parallel_size)
