"""What a transformer layer's MLP saves for backward: the dense MLP's interior, and a
mixture-of-experts layer's router, dispatcher, experts and combine (`mp.model.moe`).

The dense MLP saves its activation's input(s) and fc2's input (`mlp_interior_terms`). A
mixture-of-experts layer (`moe_terms`; ``layer_terms(..., moe=True)``) replaces the dense
MLP's terms. Each rank routes its ``n'`` tokens (`sequence_rows`: the ``N`` = `local_tokens`
of its sequences, ``N / t`` of them under SP) to ``k`` of ``E`` experts and runs its ``1 / t``
of each local expert on the ``M`` rows its TP group's routers sent there; ``M = N k`` with
balanced routing (`expert_rows`: exact at EP 1, the mean over the ``P`` expert-parallel ranks,
which take ``P M`` rows together). Whole experts (ETP 1 under TP > 1, SP) run on the
``M = n' k`` rows sent to the rank alone, ``moe_ffn_hidden_size`` wide. With ``r`` the
router's bytes (fp32, or fp64 with ``moe_router_dtype="fp64"``), it saves:

- the MLP input ``e n' h`` where the router or a shared expert reads it as it is; with a
  ``moe_router_dtype`` wider than the activations, ``r``-byte copies of the router's input
  and weight (``r n' h + r E h``);
- the router: top-k indices (int64, ``n' k``) and the probabilities (``r n' k``) (with
  ``moe_router_num_groups``, a bool mask of the allowed experts, ``n' E``, unless sigmoid); with
  ``moe_router_pre_softmax`` the softmax over all experts (``r n' E``); with the sigmoid
  score function the sigmoids (``r n' E``) and for ``k > 1`` the top ``k`` before
  renormalizing and their sums (``r n' (k + 1)``); the top-k softmax before a
  ``moe_router_topk_scaling_factor``;
- the load-balancing loss: a softmax over all experts (``r n' E``; the pre-softmax router's
  own; a sigmoid router's sigmoids again, normalized: ``r n' (E + 1)``) and the ``E`` expert
  fractions; the z-loss: the logits and their log-sum-exp (``r n' (E + 1)``);
- the dispatcher: each routed copy's token (int64, ``n' k``), the received rows (``e M h``),
  and at EP > 1 or under SP (more than one source) their regrouping by expert (int64, ``M``);
- the experts: the MLP interior for ``M`` rows ``moe_ffn_hidden_size / ETP`` wide;
- the combine: the inverse regrouping (int64, ``M``, with more than one source), the
  copies' inverse order (int64, ``n' k``) and the expert outputs per copy (``e n' k h``);
- a shared expert (``moe_shared_expert_intermediate_size``): the MLP interior for ``N`` rows
  of its width over ``t``.

No MoE tensor depends on the kernels beyond the MLP interior's rules: CUDA and the CPU run the
same torch operations for the router, the dispatcher and the combine.
"""

from __future__ import annotations

from collections.abc import Collection

from mp.estimate.storage import (
    CUDA,
    FP32,
    INT64,
    Kernels,
    activation_bytes,
    expert_tensor_parallel_size,
    local_tokens,
    sequence_rows,
)
from mp.model.config import TransformerConfig

_ROUTER_DTYPE_BYTES = {"fp32": 4, "fp64": 8}  # TransformerConfig.moe_router_dtype
_FLOAT_NAMES = {4: "fp32", 8: "fp64"}


def mlp_interior_terms(cfg: TransformerConfig, kernels: Kernels, rows: float, width: float,
                       prefix: str = "", output_recomputed: bool = False,
                       refilled: bool = False) -> dict[str, float]:
    """What an MLP's activation and fc2 save for ``rows`` rows ``width`` wide (its ``1 / t``
    shard): the activation's input(s) and the fc2 input. ``prefix`` names whose MLP it is.
    ``output_recomputed`` (``moe_act``): the activation keeps no graph and its output, fc2's
    input, is freed (``refilled``: counted, as its recompute refills it in backward); its
    checkpoint keeps its inputs, ``up`` (and a gated unit's ``gate``), under the name of the
    activation's own saves where those are the same tensors (no bias added before it, or
    the compiled function, which keeps its inputs)."""
    e = activation_bytes(cfg)
    size = e * rows * width
    swiglu = cfg.gated_linear_unit  # SwiGLU or quick GeGLU: a gate and an up projection
    compiled = kernels.jit_compiled and cfg.bias_activation_fusion
    clamped = cfg.activation_func_clamp_value is not None
    general = cfg.activation == "quick_geglu" or clamped or cfg.glu_linear_offset != 0.0
    if general:  # mp.model.mlp.bias_glu: compiled, it keeps its inputs and recomputes
        terms = {"gated unit gate and up outputs": 2 * size}
        if not compiled:  # the SiLU's input (1.702 g for quick GeGLU), its output, the up
            # half (plus the offset) the product keeps; a clamp keeps its unclamped input
            terms = {"gated unit SiLU input, output and up half": 3 * size}
            if clamped:
                terms["gated unit gate and up before the clamp"] = 2 * size
    elif swiglu:  # compiled, the SiLU output is recomputed
        terms = {"SwiGLU gate and up outputs": 2 * size}
        if not compiled:
            terms["SiLU output"] = size
    elif cfg.activation == "squared_relu":  # relu and square both keep relu's output
        terms = {"ReLU output": size}
    else:
        terms = {"GeLU input": size}
    if output_recomputed:
        same = (compiled or not cfg.add_bias_linear) and cfg.activation != "squared_relu"
        name = next(iter(terms)) if same else "activation inputs (kept for the recompute)"
        terms = {name: (2 if swiglu else 1) * size}
    if refilled or not output_recomputed:
        terms["fc2 input"] = size
    return {prefix + name: value for name, value in terms.items()}


def expert_rows(cfg: TransformerConfig, micro_batch: int) -> int:
    """Rows one rank's experts take for one micro-batch, with balanced routing: ``N k``,
    ``N`` = `local_tokens`, ``k`` = ``moe_router_topk``; ``N k / t`` with whole experts
    (ETP 1 under TP ``t`` > 1: each rank takes the copies of its own ``N / t`` tokens' worth).
    Exact at EP 1; over ``P > 1`` expert-parallel ranks it is their mean (together they take
    the copies their routers sent), which a rank exceeds by as much as its experts are
    favoured."""
    folded = cfg.tensor_model_parallel_size // expert_tensor_parallel_size(cfg)
    return local_tokens(cfg, micro_batch) * cfg.moe_router_topk // folded


def moe_terms(cfg: TransformerConfig, micro_batch: int, kernels: Kernels = CUDA,
              rows: float | None = None, modules: Collection[str] = (),
              refilled: bool = False) -> dict[str, float]:
    """What a mixture-of-experts MLP (`mp.model.moe.MoELayer`) saves for backward on one
    rank for one micro-batch, by tensor (see the module doc); ``rows``: the rows this rank's
    experts take (default `expert_rows`, the balanced mean). ``modules``: the selective
    recompute modules (``moe``: only the layer's input, kept by its checkpoint;
    ``shared_experts``: the shared expert's interior recomputed; ``moe_act``: the experts'
    activation outputs; ``layernorm``: the input, the norm's output, freed). ``refilled``:
    count the outputs those free, as their recomputes refill them in backward."""
    if cfg.num_moe_experts is None:
        raise ValueError("moe_terms needs a mixture-of-experts config (num_moe_experts is None)")
    e, t, h = activation_bytes(cfg), cfg.tensor_model_parallel_size, cfg.hidden_size
    input_freed = "layernorm" in modules and not refilled
    if "moe" in modules:
        return {} if input_freed else {"MLP input": e * sequence_rows(cfg, micro_batch) * h}
    experts, k = cfg.num_moe_experts, cfg.moe_router_topk
    n = sequence_rows(cfg, micro_batch)  # routed here: each TP rank's own under SP, else all
    m = expert_rows(cfg, micro_batch) if rows is None else rows
    shared = cfg.moe_shared_expert_intermediate_size
    router_dtype = _ROUTER_DTYPE_BYTES.get(cfg.moe_router_dtype)
    copied = router_dtype is not None and router_dtype != e  # input and weight converted
    r = router_dtype or max(e, FP32)  # the router's logits, scores and probabilities
    fp = _FLOAT_NAMES[r]
    etp = expert_tensor_parallel_size(cfg)
    regrouped = cfg.expert_model_parallel_size > 1 or (cfg.sequence_parallel and etp > 1)
    sigmoid = cfg.moe_router_score_function == "sigmoid"
    pre_softmax = cfg.moe_router_pre_softmax
    terms = {}
    # the norm's output: the shared expert's fc1 input, and the router's unless it converts it
    if (shared is not None or not copied) and not input_freed:
        terms["MLP input"] = e * n * h
    if shared is not None and "shared_experts" not in modules:
        terms.update(mlp_interior_terms(cfg, kernels, local_tokens(cfg, micro_batch),
                                        shared / t, "shared expert "))
        if cfg.moe_shared_expert_gate:  # what output x sigmoid(x g) keeps: both factors
            terms["shared expert output (gated)"] = e * n * h
            terms["shared expert gate (sigmoid)"] = e * n
    if copied:
        terms[f"router input ({fp} copy)"] = r * n * h
        terms[f"router weight ({fp} copy)"] = r * experts * h
    if sigmoid:
        terms[f"router sigmoids ({fp})"] = r * n * experts
    elif pre_softmax:
        terms[f"router softmax over all experts ({fp})"] = r * n * experts
    terms["router top-k expert indices (int64)"] = INT64 * n * k
    if sigmoid and k > 1:
        terms[f"router top-k sigmoids before renormalizing ({fp})"] = r * n * k
        terms[f"router renormalizing sums ({fp})"] = r * n
    elif not (sigmoid or pre_softmax) and cfg.moe_router_topk_scaling_factor is not None:
        terms[f"router top-k softmax before scaling ({fp})"] = r * n * k
    if cfg.moe_router_num_groups is not None and not sigmoid:  # the chosen groups' experts
        terms["router group mask (bool)"] = n * experts
    terms[f"router probabilities ({fp})"] = r * n * k
    balancing = cfg.moe_router_load_balancing_type
    if balancing != "none" and cfg.moe_aux_loss_coeff > 0:
        if sigmoid:  # computed again, and normalized over the experts
            terms[f"aux loss: sigmoids ({fp})"] = r * n * experts
            terms[f"aux loss: normalizing sums ({fp})"] = r * n
        elif not pre_softmax:
            terms[f"aux loss: softmax over all experts ({fp})"] = r * n * experts
        per_sequence = micro_batch if balancing == "seq_aux_loss" else 1
        terms[f"aux loss: expert fractions ({fp})"] = r * experts * per_sequence
    if cfg.moe_z_loss_coeff:
        terms[f"z-loss: router logits ({fp})"] = r * n * experts
        terms[f"z-loss: logsumexp ({fp})"] = r * n
    terms["dispatch: token of each routed copy (int64)"] = INT64 * n * k
    if regrouped:
        terms["dispatch: received rows in expert order (int64)"] = INT64 * m
    terms["expert input rows"] = e * m * h
    terms.update(mlp_interior_terms(cfg, kernels, m, cfg.moe_ffn_hidden_size / etp, "experts' ",
                                    output_recomputed="moe_act" in modules, refilled=refilled))
    if regrouped:
        terms["combine: expert outputs back in received order (int64)"] = INT64 * m
    terms["combine: outputs back in token order (int64)"] = INT64 * n * k
    terms["combine: expert output of each routed copy"] = e * n * k * h
    return terms
