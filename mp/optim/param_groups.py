"""AdamW's parameter groups, as Megatron forms them: which parameters decay, and which take
the decoupled learning rate of the embedding and output layer."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def is_embedding_or_output_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` in a GPT chunk (wrapped or not) is the word
    embedding's weight or the output layer's (with tied embeddings: the shared matrix, and
    a last stage's copy of it): Megatron's ``is_embedding_or_output_parameter``, which
    leaves out the position embeddings and every bias and norm."""
    return ("." + name).endswith((".embedding.word_embeddings.weight", ".output_layer.weight"))


def get_param_groups(model_chunks: Iterable[nn.Module], weight_decay: float,
                     decoupled_lr: float | None = None,
                     skip_embedding_weight_decay: bool | None = None) -> list[dict]:
    """AdamW groups: matrices decay with ``weight_decay``; 1-D parameters (biases, norm
    weights) do not (each group's ``wd_mult``, 1 or 0, says which for a weight-decay schedule,
    as in Megatron). With ``skip_embedding_weight_decay`` (None: when a chunk's model config
    sets ``embedding_init_method_std``, as Megatron's training decides) the word and position
    embeddings do not decay either, nor a last stage's copy of the tied word embedding (which
    Megatron's name rule misses, letting the two copies drift apart). With ``decoupled_lr``
    (Megatron's ``--decoupled-lr``) the embedding and
    output weights (`is_embedding_or_output_parameter`) get a group of their own, marked
    ``is_decoupled_lr`` and starting at that rate (`OptimizerParamScheduler` gives it its own
    schedule). Each parameter appears once even when chunks share it."""
    model_chunks = list(model_chunks)
    if skip_embedding_weight_decay is None:
        skip_embedding_weight_decay = any(
            getattr(getattr(module, "config", None), "embedding_init_method_std", None)
            is not None for chunk in model_chunks for module in chunk.modules())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen = set()
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                decoupled = decoupled_lr is not None and is_embedding_or_output_parameter(name)
                embedding = ("." + name).endswith((".embedding.word_embeddings.weight",
                                                   ".embedding.position_embeddings.weight")) \
                    or (is_embedding_or_output_parameter(name) and getattr(param, "shared", False))
                no_decay = param.dim() == 1 or (skip_embedding_weight_decay and embedding)
                groups.setdefault((decoupled, no_decay), []).append(param)
    out = []
    for (decoupled, no_decay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                 "wd_mult": 0.0 if no_decay else 1.0}
        out.append({**group, "is_decoupled_lr": True, "lr": decoupled_lr} if decoupled
                   else group)
    return out
