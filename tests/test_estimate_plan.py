"""The layout planner and ``tools/estimate.py``: valid layouts only, memory respected, ranked
by throughput; the command line's output and its errors."""

import importlib.util
import os

import pytest

from mp.config import load_config
from mp.estimate import Setup, candidate_setups, estimate, gpu_spec, plan
from mp.estimate.collective import group_bandwidth
from mp.estimate.hardware import GiB
from mp.estimate.planner import split_name
from mp.estimate.report import format_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _tool():
    spec = importlib.util.spec_from_file_location("estimate_tool",
                                                  os.path.join(ROOT, "tools", "estimate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(name: str):
    return load_config(os.path.join(CONFIGS, f"{name}.yaml"), [], world_size=_gpus(name))


def _gpus(name: str) -> int:
    return {"gpt3-1.3b": 8, "gpt3-175b": 1024}[name]


def test_candidates_are_exactly_the_valid_layouts():
    """An independent count of gpt3-1.3b's layouts on 8 GPUs (16 heads, 24 layers, global
    batch 512): TP | 8 and TP <= 8; PP | 8/TP and PP | 24; v | 24/PP with PP > 1 and m % PP
    == 0; micro-batch in 1, 2, 4, 8 with 512 % (mbs x DP) == 0; 3 recompute modes."""
    job = _job("gpt3-1.3b")
    expected = set()
    for tp in (1, 2, 4, 8):
        for pp in (p for p in (1, 2, 4, 8) if (8 // tp) % p == 0 and 24 % p == 0):
            dp = 8 // (tp * pp)
            for mbs in (1, 2, 4, 8):
                if 512 % (mbs * dp):
                    continue
                m = 512 // (mbs * dp)
                vs = [1] + [v for v in range(2, 25) if pp > 1 and (24 // pp) % v == 0
                            and 24 % (pp * v) == 0 and m % pp == 0]
                for v in vs:
                    for mode in ("none", "selective", "full"):
                        expected.add((tp, pp, v, dp, mbs, m, mode))
    got = {(s.tp, s.pp, s.vpp, s.data_parallel_size, s.micro_batch_size, s.num_microbatches,
            s.model.recompute_granularity or "none") for s in candidate_setups(job, 8)}
    assert got == expected


def test_uneven_splits_add_the_pipelines_an_even_split_cannot_make():
    """23 layers on 8 GPUs: evenly only PP 1; counting the embedding or the loss as a layer,
    24 "layers" split over PP 2, 4 and 8 (25, with both, over none). Duplicates of an even
    split are left out."""
    job = load_config(os.path.join(CONFIGS, "gpt3-1.3b.yaml"), ["--num-layers", "23"],
                      world_size=8)
    setups = candidate_setups(job, 8, micro_batch_sizes=(1,), recompute_modes=("none",),
                              max_tensor_parallel=1, uneven_splits=True)
    assert {(s.pp, split_name(s)) for s in setups} == {
        (1, "even"), *((pp, split) for pp in (2, 4, 8) for split in ("emb", "loss"))}
    for s in setups:
        counts = s.model.chunk_layer_counts
        assert sum(map(sum, counts)) == 23
    keys = [(s.pp, s.vpp, s.model.chunk_layer_counts) for s in setups]
    assert len(keys) == len(set(keys))
    assert {(s.pp, split_name(s)) for s in candidate_setups(
        job, 8, micro_batch_sizes=(1,), recompute_modes=("none",), max_tensor_parallel=1)} \
        == {(1, "even")}


def test_context_parallel_candidates_are_exactly_the_valid_layouts():
    """CP sizes 1, 2, 4, 8, 16 for gpt3-1.3b (seq 2048, 16 heads, 24 layers) on 16 GPUs: CP
    divides 16 / TP (and 2 CP divides the sequence), TP | 16 / CP with TP <= 8, PP | 16 /
    (TP CP) and PP | 24; DP the rest, with 512 % DP == 0 at micro-batch 1."""
    job = load_config(os.path.join(CONFIGS, "gpt3-1.3b.yaml"), [], world_size=8)
    expected = set()
    for cp in (1, 2, 4, 8, 16):
        for tp in (t for t in (1, 2, 4, 8) if 16 % (t * cp) == 0):
            for pp in (p for p in (1, 2, 4, 8, 16) if (16 // (tp * cp)) % p == 0
                       and 24 % p == 0):
                expected.add((tp, cp, pp, 16 // (tp * cp * pp)))
    setups = candidate_setups(job, 16, micro_batch_sizes=(1,), recompute_modes=("none",),
                              context_parallel_sizes=(1, 2, 4, 8, 16))
    assert {(s.tp, s.cp, s.pp, s.data_parallel_size) for s in setups if s.vpp == 1} == expected
    assert all(s.world_size == 16 for s in setups)
    assert {s.cp for s in candidate_setups(job, 16, micro_batch_sizes=(1,),
                                           recompute_modes=("none",))} == {1}


def test_expert_parallel_candidates_are_exactly_the_valid_layouts():
    """Mixtral 8x7B (8 experts, 32 layers, 8 key/value heads) on 16 GPUs, CP 1 and 2: EP
    divides the 8 experts and DP x CP, which is what TP x PP leave; only EP 1 when asked."""
    job = load_config(os.path.join(CONFIGS, "mixtral-8x7b.yaml"), [], world_size=64)
    expected = set()
    for cp in (1, 2):
        for tp in (t for t in (1, 2, 4, 8) if 16 % (t * cp) == 0):
            for pp in (p for p in (1, 2, 4, 8, 16) if (16 // (tp * cp)) % p == 0):
                dp = 16 // (tp * cp * pp)
                expected |= {(tp, cp, pp, dp, ep) for ep in (1, 2, 4, 8)
                             if (dp * cp) % ep == 0}
    setups = candidate_setups(job, 16, micro_batch_sizes=(1,), recompute_modes=("none",),
                              context_parallel_sizes=(1, 2))
    got = {(s.tp, s.cp, s.pp, s.data_parallel_size, s.ep) for s in setups if s.vpp == 1}
    assert got == expected and any(key[-1] == 8 for key in got)
    assert {s.ep for s in candidate_setups(job, 16, micro_batch_sizes=(1,),
                                           recompute_modes=("none",),
                                           expert_parallel_sizes=(1,))} == {1}


def test_cli_says_what_document_masks_and_fp8_add(capsys):
    """A job that keeps documents or conversations apart is told that their masks are not
    counted, one in FP8 that its rate and copies are not, with the estimate and with the plan;
    a plain one is told neither."""
    tool = _tool()
    args = ["--config", os.path.join(CONFIGS, "gpt3-1.3b.yaml"), "--gpus", "8"]
    plan = ["--plan", "--top", "1", "--micro-batch-sizes", "1", "--recompute", "none"]
    for flags, noted in (([], ()), (["--sft"], ("masks",)),
                         (["--reset-attention-mask"], ("masks",)),
                         (["--sft", *plan], ("masks",)),
                         (["--fp8-format", "hybrid"], ("fp8",)),
                         (["--fp8-format", "e4m3", "--sft", *plan], ("masks", "fp8"))):
        assert tool.main([*args, *flags]) == 0
        out = capsys.readouterr().out
        assert (tool.DOCUMENT_MASKS_NOTE in out, tool.FP8_NOTE in out) == \
            ("masks" in noted, "fp8" in noted), flags


def test_cli_plan_and_estimate_of_a_mixture_of_experts_model(capsys):
    """Mixtral 8x7B on 64 H100s: the plan names each layout's EP, and the config's own layout
    reports its experts, EP's all-to-alls and the experts' gradient reduction."""
    tool = _tool()
    config = os.path.join(CONFIGS, "mixtral-8x7b.yaml")
    assert tool.main(["--config", config, "--gpus", "64", "--plan", "--top", "3",
                      "--micro-batch-sizes", "1", "--recompute", "none,full"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:6] == ["#", "TP", "PP", "VP", "DP", "EP"]
    assert all(int(row.split()[5]) > 1 for row in lines[3:6])
    assert tool.main(["--config", config, "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "8 experts (top 2, ffn 14336) in 32 layers" in out
    assert "EP8" in out.splitlines()[0] and "EP comm" in out
    assert "mixture-of-experts layer, balanced routing" in out
    rows = {tuple(line.split()[1:3]) for line in out.splitlines()
            if line.split()[:1] == ["0"]}
    assert {("ep", "all_to_all"), ("edp", "reduce_scatter"), ("edp", "all_gather")} <= rows


def test_planner_tries_each_split_of_a2a_p2p():
    """``a2a+p2p`` at every ``[A, P]`` with ``A P = CP``, both above 1 (CP 2 has none), its
    all-to-all's A x TP dividing the 8 key/value heads; a job that runs ``a2a+p2p`` itself
    still gets the other exchanges, without its levels."""
    job = load_config(os.path.join(CONFIGS, "gpt3-1.3b.yaml"),
                      ["--num-query-groups", "8", "--context-parallel-size", "4",
                       "--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes",
                       "2", "2", "--attention-dropout", "0"], world_size=32)
    setups = candidate_setups(job, 32, micro_batch_sizes=(1,), recompute_modes=("none",),
                              context_parallel_sizes=(2, 4, 8),
                              cp_comm_types=("all_gather", "a2a+p2p"))
    flat = [s for s in setups if s.pp == 1]
    levels = {(s.tp, s.cp, tuple(s.model.hierarchical_context_parallel_sizes))
              for s in flat if s.model.cp_comm_type == "a2a+p2p"}
    assert levels == {(tp, cp, (a, cp // a)) for cp in (4, 8) for a in (2, 4) if a < cp
                      for tp in (1, 2, 4, 8) if 32 % (tp * cp) == 0 and 8 % (tp * a) == 0}
    gathered = {(s.tp, s.cp) for s in flat if s.model.cp_comm_type == "all_gather"}
    assert gathered == {(tp, cp) for cp in (2, 4, 8) for tp in (1, 2, 4, 8)
                        if 32 % (tp * cp) == 0}
    assert all(s.model.hierarchical_context_parallel_sizes is None for s in flat
               if s.model.cp_comm_type == "all_gather")


def test_planner_tries_each_expert_tensor_parallel_size():
    """``expert_tensor_parallel_sizes`` (1, None): the experts split as the layers (ETP = TP,
    None) at every TP, and whole (ETP 1) where EP is a multiple of TP > 1 (mp's rule: the TP
    ranks hold different experts); ETP 1 at TP 1 is the default, once. The table names ETP 1
    beside EP."""
    job = load_config(os.path.join(CONFIGS, "mixtral-8x7b.yaml"), [], world_size=64)
    flat = [(s.tp, s.ep, s.model.expert_tensor_parallel_size) for s in candidate_setups(
        job, 16, micro_batch_sizes=(1,), recompute_modes=("full",), expert_parallel_sizes=(2, 4),
        expert_tensor_parallel_sizes=(1, None)) if s.pp == 1]
    default = [(s.tp, s.ep, None) for s in candidate_setups(
        job, 16, micro_batch_sizes=(1,), recompute_modes=("full",), expert_parallel_sizes=(2, 4))
        if s.pp == 1]
    assert sorted(flat, key=str) == sorted(
        default + [(tp, ep, 1) for tp in (2, 4, 8) for ep in (2, 4) if ep % tp == 0], key=str)
    fitting = plan(job, 16, gpu_spec("h100"), micro_batch_sizes=(1,), recompute_modes=("full",),
                   expert_parallel_sizes=(2,), expert_tensor_parallel_sizes=(1,))
    assert fitting.fitting and all(e.setup.etp == 1 for e in fitting.fitting)
    assert "2/ETP1" in format_plan(fitting, top=40)


def test_planner_tries_each_rank_order():
    """``tp_pp_dp_orders`` (False, True): every layout in Megatron's default order and, without
    context parallelism (the TP-PP-DP order's rule), in the TP-PP-DP one too, whose links
    differ (a pipeline of TP 4 x PP 2 shares a node, its DP spans both); the table says which
    order each row is in."""
    job = load_config(os.path.join(CONFIGS, "gpt3-1.3b.yaml"), [], world_size=8)
    setups = candidate_setups(job, 16, micro_batch_sizes=(1,), recompute_modes=("none",),
                              context_parallel_sizes=(1, 2), tp_pp_dp_orders=(False, True))
    layouts = [(s.tp, s.cp, s.pp, s.vpp) for s in setups]
    default = {layout for layout, s in zip(layouts, setups) if not s.tp_pp_dp_mapping}
    mapped = {layout for layout, s in zip(layouts, setups) if s.tp_pp_dp_mapping}
    assert mapped == {layout for layout in default if layout[1] == 1} and len(mapped) > 10
    gpu = gpu_spec("h100")
    pair = [s for s in setups if (s.tp, s.cp, s.pp, s.vpp) == (4, 1, 2, 1)]
    assert {(s.tp_pp_dp_mapping, group_bandwidth(s, "pp", gpu) == gpu.intra_node_gbps * 1e9,
             group_bandwidth(s, "dp", gpu) == gpu.intra_node_gbps * 1e9) for s in pair} == {
        (False, False, True), (True, True, False)}
    result = plan(job, 16, gpu, micro_batch_sizes=(1,), recompute_modes=("none",),
                  tp_pp_dp_orders=(True,))
    table = format_plan(result, top=3).splitlines()
    assert "order" in table[0].split() and all("tp-pp-dp" in row for row in table[2:5])


def test_planner_tries_each_cp_exchange():
    """With ``cp_comm_types`` both exchanges for every CP > 1 (CP 1 once): TP always divides
    the 4 key/value heads; a2a only where TP x CP does (its rule)."""
    job = load_config(os.path.join(CONFIGS, "gpt3-1.3b.yaml"), ["--num-query-groups", "4"],
                      world_size=8)
    setups = candidate_setups(job, 16, micro_batch_sizes=(1,), recompute_modes=("none",),
                              context_parallel_sizes=(1, 2, 4, 8),
                              cp_comm_types=("all_gather", "a2a"))
    layouts = {(s.tp, s.cp, s.model.cp_comm_type) for s in setups if s.pp == 1}
    tp_cp = [(tp, cp) for cp in (1, 2, 4, 8) for tp in (1, 2, 4) if 16 % (tp * cp) == 0]
    assert layouts == {(tp, cp, "all_gather") for tp, cp in tp_cp} | {
        (tp, cp, "a2a") for tp, cp in tp_cp if cp > 1 and 4 % (tp * cp) == 0}


def test_cli_plan_with_context_parallelism_on_a_long_sequence(capsys):
    """Llama 3 8B on 64 H100s at 131072 tokens a sequence (estimates): without context
    parallelism only full recompute fits; with CP 2-8 tried, the fastest layout splits the
    sequence and recomputes no matrix product, at a higher predicted throughput."""
    tool = _tool()
    args = ["--config", os.path.join(CONFIGS, "llama3-8b.yaml"), "--gpus", "64", "--plan",
            "--seq-length", "131072", "--max-position-embeddings", "131072",
            "--global-batch-size", "16", "--micro-batch-sizes", "1", "--top", "1"]
    assert tool.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "CP" not in lines[1].split()
    best_without = float(lines[3].split()[-3].replace(",", ""))
    assert lines[3].split()[-6] == "full"
    assert tool.main([*args, "--context-parallel-sizes", "1,2,4,8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, best = lines[1].split(), lines[3].split()
    assert header[:3] == ["#", "TP", "CP"]
    # nothing recomputed: the norms' rerun ties with none by the FLOPs, and recomputing less
    # wins a tie (`recompute_work`)
    assert int(best[2]) > 1 and best[header.index("recompute")] == "none"
    assert float(best[-3].replace(",", "")) > best_without
    # a2a's layouts are named; with 8 key/value heads TP x CP is at most 8
    assert tool.main([*args, "--context-parallel-sizes", "2,4,8", "--cp-comm-types", "a2a",
                      "--top", "40"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:-1]]
    assert rows and all(row[2].endswith("/a2a") for row in rows)
    assert all(int(row[1]) * int(row[2].split("/")[0]) <= 8 for row in rows)


def test_plan_keeps_what_fits_fastest_first():
    job = _job("gpt3-175b")
    gpu = gpu_spec("h100")
    result = plan(job, 1024, gpu, micro_batch_sizes=(1, 2))
    assert result.fitting and result.too_big > 0
    assert result.valid == len(result.fitting) + result.too_big
    for e in result.fitting:
        assert e.setup.world_size == 1024
        assert e.peak_bytes <= 0.9 * gpu.memory_gib * GiB
    speeds = [e.tokens_per_second for e in result.fitting]
    assert speeds == sorted(speeds, reverse=True)
    # the config's own layout (Megatron's TP 8 x PP 16, micro-batch 1) fits an 80 GB GPU
    assert estimate(Setup.from_job(job, 1024), gpu).fits(0.9)


def test_plan_with_no_room_says_so():
    result = plan(_job("gpt3-175b"), 64, gpu_spec("a100-40gb"), micro_batch_sizes=(1,))
    assert result.fitting == [] and result.valid > 0


def test_cli_plan(capsys, tmp_path):
    tool = _tool()
    assert tool.main(["--config", os.path.join(CONFIGS, "gpt3-1.3b.yaml"), "--gpus", "8",
                      "--gpu", "h100", "--plan", "--top", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("gpt3-1.3b.yaml on 8 x h100, global batch 512 x 2048")
    assert lines[1].split()[:5] == ["#", "TP", "PP", "VP", "DP"]
    assert [line.split()[0] for line in lines[3:6]] == ["1", "2", "3"]
    assert "valid layouts fit" in lines[6]


def test_cli_plan_with_uneven_splits_names_them(capsys):
    """A 94-layer GPT-3 175B on 1024 H100s: no even split fits (the estimate), while
    ``--uneven-pipeline`` finds layouts with the embedding and the loss counted as layers."""
    tool = _tool()
    args = ["--config", os.path.join(CONFIGS, "gpt3-175b.yaml"), "--gpus", "1024", "--plan",
            "--num-layers", "94", "--micro-batch-sizes", "1", "--recompute", "none"]
    assert tool.main(args) == 0
    assert "none of the" in capsys.readouterr().out
    assert tool.main([*args, "--uneven-pipeline", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:6] == ["#", "TP", "PP", "VP", "split", "DP"]
    assert lines[3].split()[4] == "emb+loss"


def test_cli_plan_refuses_the_layout_it_chooses(capsys):
    tool = _tool()
    assert tool.main(["--config", os.path.join(CONFIGS, "gpt3-1.3b.yaml"), "--gpus", "8",
                      "--plan", "--tensor-model-parallel-size", "2"]) == 2
    assert "--plan chooses model.tensor_model_parallel_size itself: drop it from the command " \
        "line" in capsys.readouterr().err


def test_cli_single_estimate_with_overrides(capsys):
    tool = _tool()
    assert tool.main(["--config", os.path.join(CONFIGS, "gpt3-175b.yaml"), "--gpus", "1024",
                      "--gpu", "h200", "--inter-node-gbps", "100",
                      "--recompute-granularity", "selective",
                      # the GPT-3 base config leaves it off
                      "--use-distributed-optimizer", "true"]) == 0
    out = capsys.readouterr().out
    assert "TP8 PP16 DP8, mbs 1 x 192, SP, recompute selective, distributed optimizer" in out
    for section in ("Memory per rank", "Activations per layer", "FLOPs per iteration",
                    "Communication per rank", "Step time"):
        assert section in out


def test_cli_single_estimate_with_context_parallelism(capsys):
    """Megatron's ``--context-parallel-size`` and ``--sequence-parallel`` are config overrides
    (the planner's own flag is ``--sequence-parallel-modes``)."""
    tool = _tool()
    assert tool.main(["--config", os.path.join(CONFIGS, "llama3-8b.yaml"), "--gpus", "64",
                      "--seq-length", "32768", "--max-position-embeddings", "32768",
                      "--global-batch-size", "16", "--tensor-model-parallel-size", "4",
                      "--context-parallel-size", "4", "--sequence-parallel"]) == 0
    out = capsys.readouterr().out
    assert "64 x h100: TP4 CP4 PP1 DP4, mbs 1 x 4, SP" in out
    assert "K, V gathered over CP" in out and "CP comm" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("0     cp")]
    assert [row[2] for row in rows] == ["all_gather", "reduce_scatter", "all_reduce"]


def test_cli_overrides_are_not_taken_for_its_own_flags(capsys):
    """``--micro-batch-size`` is the config's key, not an abbreviation of the planner's
    ``--micro-batch-sizes``."""
    tool = _tool()
    assert tool.main(["--config", os.path.join(CONFIGS, "gpt3-1.3b.yaml"), "--gpus", "1",
                      "--micro-batch-size", "8", "--global-batch-size", "8",
                      "--use-distributed-optimizer", "false"]) == 0
    assert "1 x h100: TP1 PP1 DP1, mbs 8 x 1, recompute none\n" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "8", "--tensor-model-parallel-size", "3"],
     "num_attention_heads=16 is not divisible by tensor_model_parallel_size=3"),
    (["--gpus", "12"], ("training.global_batch_size=512 is not divisible by "
                        "training.micro_batch_size x data_parallel_size = 4 x 12 = 48")),
    (["--gpus", "8", "--efficiency", "1.5"], "efficiency=1.5 must be in (0, 1]"),
    (["--gpus", "8", "--memory-gib", "0"], "memory_gib=0.0 must be > 0 (GPU 'h100')"),
])
def test_cli_errors_name_the_value_and_rule(capsys, argv, message):
    tool = _tool()
    assert tool.main(["--config", os.path.join(CONFIGS, "gpt3-1.3b.yaml"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_memory_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tool = _tool()
    chart = tmp_path / "plan.png"
    assert tool.main(["--config", os.path.join(CONFIGS, "gpt3-1.3b.yaml"), "--gpus", "8",
                      "--plan", "--top", "4", "--chart", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
