"""Text reports of estimates and plans, and the memory-breakdown chart."""

from __future__ import annotations

import dataclasses

from mp.estimate.activations import korthikanti_layer_bytes, layer_terms
from mp.estimate.collective import seconds
from mp.estimate.estimate import Estimate
from mp.estimate.hardware import GiB
from mp.estimate.mtp import mtp_depth_terms
from mp.estimate.params import model_params, state_bytes
from mp.estimate.planner import PlanResult, recompute_mode, split_name
from mp.estimate.storage import CUDA, Kernels


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_estimate(est: Estimate, kernels: Kernels = CUDA) -> str:
    """A full report of one estimate: model, memory per stage, activations per layer,
    FLOPs, communication per rank and step time."""
    setup, cfg, gpu = est.setup, est.setup.model, est.gpu
    heads = f"{cfg.num_attention_heads} heads"
    if cfg.multi_latent_attention:
        q = "" if cfg.q_lora_rank is None else f", queries from {cfg.q_lora_rank}"
        heads += (f" of multi-latent attention (keys and values from {cfg.kv_lora_rank}{q}; "
                  f"q/k {cfg.qk_head_dim} + {cfg.qk_pos_emb_head_dim} rotated, "
                  f"v {cfg.v_head_dim})")
    elif cfg.num_query_groups < cfg.num_attention_heads:
        heads += f" sharing {cfg.num_query_groups} keys and values"
    ffn = f"ffn {cfg.ffn_hidden_size}"
    if cfg.num_moe_experts is not None:
        moe_layers = sum(map(cfg.is_moe_layer, range(cfg.num_layers)))
        ffn = (f"{cfg.num_moe_experts} experts (top {cfg.moe_router_topk}, ffn "
               f"{cfg.moe_ffn_hidden_size}) in {moe_layers} layers"
               + (f", ffn {cfg.ffn_hidden_size} in the others" if moe_layers < cfg.num_layers
                  else ""))
    mtp = ""
    if cfg.mtp_num_layers:
        depths = cfg.mtp_num_layers
        main = model_params(dataclasses.replace(cfg, mtp_num_layers=None))
        mtp = (f", {depths} multi-token prediction {'depth' if depths == 1 else 'depths'} "
               f"({_count(est.parameters - main)} parameters)")
    lines = [
        f"{setup.world_size} x {gpu.name}: {setup.describe()}",
        (f"model: {_count(est.parameters)} parameters, {cfg.num_layers} layers{mtp}, hidden "
         f"{cfg.hidden_size}, {heads}, {ffn}, "
         f"sequence {cfg.seq_length}, vocabulary {cfg.vocab_size} padded to "
         f"{cfg.padded_vocab_size}, {cfg.precision}, {cfg.attention_backend} attention"),
        "",
        "Memory per rank (GiB), at each stage's peak:",
    ]
    shown = sorted({0, setup.pp - 1, est.peak_stage.pp_rank})
    rows = []
    for r in shown:
        st = est.stages[r]
        rows.append([str(r), _count(st.params.total), _gib(st.state.weights),
                     _gib(st.state.grads), _gib(st.state.optimizer),
                     f"{_gib(st.activations)} ({st.in_flight:g} mb)", _gib(st.transient),
                     _gib(st.peak)])
    lines.append(_table(["stage", "params", "weights", "grads", "optimizer",
                         "activations (in flight)", "transient", "peak"], rows))
    lines.append(f"peak {_gib(est.peak_bytes)} GiB of {gpu.memory_gib:g} GiB "
                 f"(stage {est.peak_stage.pp_rank})")
    host = max(stage.state.host for stage in est.stages)
    if host:
        lines.append(f"host memory per rank for the offloaded optimizer state (fp32 masters, "
                     f"moments, gradients): up to {_gib(host)} GiB")
    lines.append(_precision_line(est))
    lines += ["", _activation_section(est, kernels), "", _flops_section(est), "",
              _comm_section(est), "", _step_section(est)]
    return "\n".join(lines)


def _precision_line(est: Estimate) -> str:
    """The busiest stage's model state had the model been kept in each precision."""
    stage = est.peak_stage
    parts = []
    for precision in ("fp32", "bf16", "fp16"):
        model = dataclasses.replace(est.setup.model, precision=precision)
        state = state_bytes(dataclasses.replace(est.setup, model=model), stage.params)
        parts.append(f"{precision} {_gib(state.weights)} + {_gib(state.grads)} + "
                     f"{_gib(state.optimizer)}")
    return (f"model state of stage {stage.pp_rank} by precision (weights + grads + optimizer, "
            "GiB): " + "; ".join(parts))


def _activation_section(est: Estimate, kernels: Kernels) -> str:
    cfg, b = est.setup.model, est.setup.micro_batch_size
    kinds: dict = {}  # (MoE, sliding window, RoPE) -> the first layer of that kind
    for i in range(cfg.num_layers):
        kinds.setdefault((cfg.is_moe_layer(i), cfg.attention_window(i + 1),
                          cfg.applies_rope(i + 1)), i)
    mixed = len({moe for moe, _, _ in kinds}) > 1
    note = " (without full recompute)" if cfg.recompute_granularity == "full" else ""
    lines = []
    for (moe, window, rope), layer in kinds.items():
        terms = layer_terms(cfg, b, kernels, moe=moe, layer=layer)
        top = sorted(terms.items(), key=lambda kv: -kv[1])[:5]
        labels = []
        if moe or mixed:
            labels.append("mixture-of-experts layer, balanced routing" if moe else "dense layer")
        if cfg.window_size is not None:
            labels.append("full attention" if window is None else f"sliding window {window}")
        if cfg.no_rope_freq is not None:
            labels.append("RoPE" if rope else "no RoPE")
        kind = f" ({', '.join(labels)})" if labels else ""
        lines.append(f"Activations per layer{kind} and micro-batch on a rank{note}: "
                     f"{_bytes(sum(terms.values()))}; largest: "
                     + ", ".join(f"{name} {_bytes(v)}" for name, v in top))
    if cfg.mtp_num_layers:
        terms = mtp_depth_terms(cfg, b, kernels)
        top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"Multi-token prediction on the last stage, per depth and micro-batch: "
                     f"{_bytes(sum(terms.values()))} (its layer not recomputed by full "
                     "recompute); largest: " + ", ".join(f"{name} {_bytes(v)}" for name, v in top))
    s, h, a, t = (cfg.seq_length, cfg.hidden_size, cfg.num_attention_heads,
                  cfg.tensor_model_parallel_size)
    paper = {"none": korthikanti_layer_bytes(s, b, h, a),
             f"TP {t}": korthikanti_layer_bytes(s, b, h, a, t),
             f"TP {t} + SP": korthikanti_layer_bytes(s, b, h, a, t, True),
             "selective (TP + SP)": korthikanti_layer_bytes(s, b, h, a, t, True, "selective"),
             "full": korthikanti_layer_bytes(s, b, h, a, t, recompute="full")}
    return ("\n".join(lines) + "\nKorthikanti et al. 2022 for this model"
            + (" (the whole sequence on each rank: the paper has no context parallelism)"
               if est.setup.cp > 1 else "")
            + (" (its standard attention, not multi-latent)"
               if est.setup.model.multi_latent_attention else "") + ": "
            + ", ".join(f"{name} {_bytes(v)}" for name, v in paper.items()))


def _flops_section(est: Estimate) -> str:
    return (f"FLOPs per iteration: {est.flops:.3e} with recompute, {est.model_flops:.3e} model "
            f"(global batch {est.setup.global_batch_size} x {est.setup.model.seq_length})")


def _comm_section(est: Estimate) -> str:
    setup = est.setup
    stages = sorted({0, setup.pp - 1})
    rows = []
    for r in stages:
        for c in est.collectives[r]:
            wire = "-" if c.kind == "recv" else f"{seconds(setup, c, est.gpu) * 1e3:.2f}"
            rows.append([str(r), c.group, c.kind, c.what, _bytes(c.bytes), wire])
    if not rows:
        return "Communication: none (one GPU)"
    return "Communication per rank per iteration:\n" + _table(
        ["stage", "group", "kind", "what", "bytes", "ms on wire"], rows)


def _step_section(est: Estimate) -> str:
    st = est.step
    parts = ", ".join(f"{name} {value:.3f}" for name, value in (
        ("compute", st.compute), ("TP comm", st.tp_comm),
        *((("CP comm", st.cp_comm),) if est.setup.cp > 1 else ()),
        *((("EP comm", st.ep_comm),) if est.setup.ep > 1 else ()), ("PP comm", st.pp_comm),
        ("bubble", st.bubble), ("grad sync", st.grad_sync), ("optimizer", st.optimizer),
        *((("Newton-Schulz", st.newton_schulz),) if est.setup.optimizer == "muon" else ())))
    return (f"Step time {st.total:.3f} s at {est.efficiency:.0%} of {est.gpu.peak_tflops:g} "
            f"TFLOP/s ({parts}); {est.tokens_per_second:,.0f} tokens/s, MFU {est.mfu:.1%}, "
            f"bubble {est.bubble_fraction:.1%}")


def format_plan(result: PlanResult, top: int = 10) -> str:
    """The fastest ``top`` layouts that fit, as a table (with a ``split`` column, the
    pipeline's `mp.estimate.planner.PIPELINE_SPLITS` name, when one of them is uneven, a
    ``CP`` column when one of them is context-parallel: ``4``, or ``4/a2a``, ``4/p2p``,
    ``4/a2a+p2p 2x2`` (``[A, P]``) for those exchanges, and an ``EP`` column when one of them
    is expert-parallel: ``4``, or ``4/ETP1`` when the experts' TP is not the layers'; an
    ``order`` column, ``tp-pp-dp`` or ``tp-dp-pp``, when one of them is in Megatron's TP-PP-DP
    rank order; the ``recompute`` column is `mp.estimate.planner.recompute_mode`'s)."""
    if not result.fitting:
        return (f"none of the {result.valid} valid layouts fits in memory; try more GPUs, "
                "recompute, or a smaller micro-batch")
    shown = result.fitting[:top]
    splits = [split_name(e.setup) for e in shown]
    uneven = any(name != "even" for name in splits)
    context = any(e.setup.cp > 1 for e in shown)
    experts = any(e.setup.ep > 1 for e in shown)
    orders = any(e.setup.tp_pp_dp_mapping for e in shown)
    rows = []
    for i, (e, split) in enumerate(zip(shown, splits), 1):
        s = e.setup
        comm = s.model.cp_comm_type
        if comm == "a2a+p2p":
            comm += " {}x{}".format(*s.model.hierarchical_context_parallel_sizes)
        cp = f"{s.cp}/{comm}" if s.cp > 1 and comm != "all_gather" else str(s.cp)
        ep = str(s.ep) if s.etp == s.tp else f"{s.ep}/ETP{s.etp}"
        rows.append([str(i), str(s.tp), *([cp] if context else []), str(s.pp),
                     str(s.vpp), *([split] if uneven else []),
                     str(s.data_parallel_size), *([ep] if experts else []),
                     *(["tp-pp-dp" if s.tp_pp_dp_mapping else "tp-dp-pp"] if orders else []),
                     str(s.micro_batch_size), str(s.num_microbatches),
                     "on" if s.model.sequence_parallel else "off",
                     recompute_mode(s.model), _gib(e.peak_bytes),
                     f"{e.step.total:.2f}", f"{e.tokens_per_second:,.0f}", f"{e.mfu:.1%}",
                     f"{e.bubble_fraction:.1%}"])
    header = ["#", "TP", *(["CP"] if context else []), "PP", "VP",
              *(["split"] if uneven else []), "DP", *(["EP"] if experts else []),
              *(["order"] if orders else []), "mbs", "m",
              "SP",
              "recompute", "peak GiB", "step s", "tokens/s", "MFU", "bubble"]
    return (_table(header, rows) + f"\n{len(result.fitting)} of {result.valid} valid layouts "
            f"fit ({result.too_big} do not); peak = the busiest rank")


def memory_chart(estimates: list[Estimate], path: str, memory_fraction: float) -> None:
    """A stacked bar per layout (its busiest rank): weights, gradients, optimizer state,
    activations, transient; with the GPU's memory and the planner's limit. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("the memory chart needs matplotlib (pip install matplotlib)") \
            from error
    labels = [f"TP{e.setup.tp}" + (f" CP{e.setup.cp}" if e.setup.cp > 1 else "")
              + f" PP{e.setup.pp}" + (f"v{e.setup.vpp}" if e.setup.vpp > 1 else "")
              + f" DP{e.setup.data_parallel_size}"
              + (f" EP{e.setup.ep}" if e.setup.ep > 1 else "")
              + f"\nmbs{e.setup.micro_batch_size} "
              + recompute_mode(e.setup.model) for e in estimates]
    parts = {"weights": [], "gradients": [], "optimizer": [], "activations": [],
             "transient": []}
    for e in estimates:
        st = e.peak_stage
        for name, value in zip(parts, (st.state.weights, st.state.grads, st.state.optimizer,
                                       st.activations, st.transient)):
            parts[name].append(value / GiB)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(estimates)), 5))
    bottom = [0.0] * len(estimates)
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    gpu = estimates[0].gpu
    ax.axhline(gpu.memory_gib, color="black", linestyle="-", linewidth=1,
               label=f"{gpu.name} memory")
    ax.axhline(gpu.memory_gib * memory_fraction, color="black", linestyle="--", linewidth=1,
               label=f"limit ({memory_fraction:.0%})")
    ax.set_ylabel("GiB per GPU (busiest rank)")
    ax.set_title("Memory per GPU by layout")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
