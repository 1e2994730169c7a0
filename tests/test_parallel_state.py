"""Process-group layout against Megatron's documented layout, getters, and early errors."""

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed
from mp import parallel_state as ps


def test_layout_16_ranks_tp2_pp4_matches_megatron_docs():
    layout = ps.rank_layout(16, 2, 4)
    assert layout.tensor == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.data == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert layout.pipeline == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert layout.embedding == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert layout.model == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


def test_layout_16_ranks_tp2_cp2_pp2_follows_megatrons_order():
    """TP fastest, then CP, then DP, then PP: rank = t + 2 (c + 2 (d + 2 p))."""
    layout = ps.rank_layout(16, 2, 2, context_parallel_size=2)
    assert layout.tensor == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.context == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14],
                              [13, 15]]
    assert layout.data == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14],
                           [11, 15]]
    assert layout.data_with_context == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14],
                                        [9, 11, 13, 15]]
    assert layout.pipeline == [[r, r + 8] for r in range(8)]
    assert layout.model == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert layout.embedding == layout.pipeline
    without = ps.rank_layout(16, 2, 2)
    assert without.context == [[r] for r in range(16)]
    assert without.data_with_context == without.data


def test_tp_pp_dp_order_puts_pipelines_inside_data_parallelism():
    """Megatron's ``--use-tp-pp-dp-mapping`` (its order ``tp-pp-dp``): rank = t + 2 (p + 4 d)."""
    layout = ps.rank_layout(16, 2, 4, tp_pp_dp=True)
    assert layout.tensor == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.pipeline == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert layout.data == [[r, r + 8] for r in range(8)]
    assert layout.data_with_context == layout.data
    assert layout.embedding == [[0, 6], [1, 7], [8, 14], [9, 15]]
    assert layout.model == [list(range(8)), list(range(8, 16))]
    for sizes in ({"context_parallel_size": 2}, {"expert_model_parallel_size": 2}):
        with pytest.raises(ValueError, match=r"the TP-PP-DP rank order \(use_tp_pp_dp_mapping\) "
                                             r"takes neither context nor expert parallelism"):
            ps.rank_layout(16, 2, 2, tp_pp_dp=True, **sizes)


def test_hierarchical_context_groups_match_megatron_docs():
    """Megatron-Core's ``create_hierarchical_groups`` docstring: 16 CP ranks at sizes
    [2, 2, 4]; each level varies one digit of the CP index, the first level's fastest."""
    layout = ps.rank_layout(16, context_parallel_size=16,
                            hierarchical_context_parallel_sizes=[2, 2, 4])
    assert layout.hierarchical_context == (
        [[2 * i, 2 * i + 1] for i in range(8)],
        [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]])


def test_layout_8_ranks():
    l22 = ps.rank_layout(8, 2, 2)
    assert l22.tensor == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert l22.data == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert l22.pipeline == [[0, 4], [1, 5], [2, 6], [3, 7]]
    l41 = ps.rank_layout(8, 4, 1)
    assert l41.tensor == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert l41.data == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert l41.pipeline == [[r] for r in range(8)]
    assert l41.embedding == [[r] for r in range(8)]


@pytest.mark.parametrize("world,tp,pp,match", [
    (8, 3, 1, r"world_size=8 is not divisible by tensor_model_parallel_size=3 x "
              r"pipeline_model_parallel_size=1 = 3"),
    (8, 2, 3, "not divisible"),
    (8, 0, 1, "tensor_model_parallel_size=0 must be a positive integer"),
    (8, 2, 1, r"world_size=8 is not divisible by tensor_model_parallel_size=2 x "
              r"pipeline_model_parallel_size=1 x context_parallel_size=3 = 6"),
])
def test_layout_rejects_impossible_sizes(world, tp, pp, match):
    cp = 3 if "context" in match else 1
    with pytest.raises(ValueError, match=match):
        ps.rank_layout(world, tp, pp, cp)


def _check_groups(tp: int, pp: int, vpp, cp: int = 1, tp_pp_dp: bool = False):
    ps.initialize_model_parallel(tp, pp, vpp, context_parallel_size=cp,
                                 use_tp_pp_dp_mapping=tp_pp_dp)
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = ps.rank_layout(world, tp, pp, cp, tp_pp_dp=tp_pp_dp)

    def mine(groups):
        return next(g for g in groups if rank in g)

    for kind, size, my_rank, group, ranks in [
        ("tensor", ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
         ps.get_tensor_model_parallel_group(), layout.tensor),
        ("context", ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(),
         ps.get_context_parallel_group(), layout.context),
        ("data", ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
         ps.get_data_parallel_group(), layout.data),
        ("data x context", ps.get_data_parallel_world_size(with_context_parallel=True),
         ps.get_data_parallel_rank(with_context_parallel=True),
         ps.get_data_parallel_group(with_context_parallel=True), layout.data_with_context),
        ("pipeline", ps.get_pipeline_model_parallel_world_size(),
         ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_group(),
         layout.pipeline),
        ("model", ps.get_model_parallel_world_size(), ps.get_model_parallel_rank(),
         ps.get_model_parallel_group(), layout.model),
    ]:
        expected = mine(ranks)
        assert size == len(expected), kind
        assert my_rank == expected.index(rank), kind
        # the group really connects exactly these ranks: sum the global ranks over it
        t = torch.tensor([rank], dtype=torch.int64)
        dist.all_reduce(t, group=group)
        assert t.item() == sum(expected), kind

    pipe = mine(layout.pipeline)
    p = pipe.index(rank)
    assert ps.get_pipeline_model_parallel_next_rank() == pipe[(p + 1) % pp]
    assert ps.get_pipeline_model_parallel_prev_rank() == pipe[(p - 1) % pp]
    assert ps.get_pipeline_model_parallel_first_rank() == pipe[0]
    assert ps.get_pipeline_model_parallel_last_rank() == pipe[-1]
    assert ps.get_tensor_model_parallel_src_rank() == mine(layout.tensor)[0]
    assert ps.get_data_parallel_src_rank() == mine(layout.data)[0]
    assert ps.get_context_parallel_global_ranks() == mine(layout.context)
    assert ps.is_rank_in_embedding_group() == (p in (0, pp - 1))
    if ps.is_rank_in_embedding_group():
        t = torch.tensor([rank])
        dist.all_reduce(t, group=ps.get_embedding_group())
        assert t.item() == sum({pipe[0], pipe[-1]})
    assert ps.is_pipeline_first_stage(ignore_virtual=True) == (p == 0)
    assert ps.is_pipeline_last_stage(ignore_virtual=True) == (p == pp - 1)
    if vpp is not None:
        assert ps.get_virtual_pipeline_model_parallel_world_size() == vpp
        for v in range(vpp):
            ps.set_virtual_pipeline_model_parallel_rank(v)
            assert ps.get_virtual_pipeline_model_parallel_rank() == v
            assert ps.is_pipeline_first_stage() == (p == 0 and v == 0)
            assert ps.is_pipeline_last_stage() == (p == pp - 1 and v == vpp - 1)
        with pytest.raises(ValueError, match="outside"):
            ps.set_virtual_pipeline_model_parallel_rank(vpp)
    return rank


@pytest.mark.parametrize("world,tp,pp,vpp,cp,tp_pp_dp", [
    (8, 2, 2, None, 1, False), (8, 4, 1, None, 1, False), (8, 2, 4, 2, 1, False),
    (8, 1, 8, None, 1, False), (4, 2, 1, None, 1, False), (2, 1, 2, 3, 1, False),
    (1, 1, 1, None, 1, False), (8, 2, 2, None, 2, False), (8, 1, 1, None, 4, False),
    (8, 2, 2, None, 1, True), (8, 1, 2, 2, 1, True),
])
def test_groups_and_getters(world, tp, pp, vpp, cp, tp_pp_dp):
    assert run_distributed(world, _check_groups, tp, pp, vpp, cp, tp_pp_dp) == list(range(world))


def _check_errors_before_any_collective():
    with pytest.raises(RuntimeError, match="not initialized: call mp.parallel_state"):
        ps.get_tensor_model_parallel_rank()
    with pytest.raises(ValueError, match="world_size=4 is not divisible by "
                                         "tensor_model_parallel_size=3"):
        ps.initialize_model_parallel(3)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size=2 needs "
                                         "pipeline_model_parallel_size > 1"):
        ps.initialize_model_parallel(2, 1, 2)
    assert not ps.model_parallel_is_initialized()
    ps.initialize_model_parallel(2, 2)
    with pytest.raises(RuntimeError, match="already initialized"):
        ps.initialize_model_parallel(2, 2)
    with pytest.raises(RuntimeError, match="without virtual_pipeline_model_parallel_size"):
        ps.set_virtual_pipeline_model_parallel_rank(0)
    ps.destroy_model_parallel()
    assert not ps.model_parallel_is_initialized()


def test_wrong_sizes_fail_on_every_rank_without_hanging():
    run_distributed(4, _check_errors_before_any_collective)


def _deepspeed_mpu_view(tp: int, pp: int):
    ps.initialize_model_parallel(tp, pp)
    mpu = ps  # DeepSpeed takes the module itself as its mpu
    return (mpu.get_model_parallel_world_size(), mpu.get_data_parallel_world_size(),
            mpu.get_model_parallel_group() is not None, mpu.get_data_parallel_group() is not None,
            mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank())


def test_works_as_deepspeed_mpu():
    out = run_distributed(4, _deepspeed_mpu_view, 2, 1)
    assert [o[:4] for o in out] == [(2, 2, True, True)] * 4
    assert [o[4:] for o in out] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def _collective_with_a_missing_peer(timeout_s: float) -> str | None:
    with pytest.raises(ValueError, match="distributed_timeout_minutes=0 must be > 0"):
        ps.initialize_model_parallel(distributed_timeout_minutes=0)
    ps.initialize_model_parallel(1, distributed_timeout_minutes=timeout_s / 60)
    message = None
    if dist.get_rank() == 0:  # rank 1 stays alive but never joins the all-reduce
        with pytest.raises(RuntimeError) as error:
            dist.all_reduce(torch.ones(1), group=ps.get_data_parallel_group())
        message = str(error.value)
    dist.barrier()  # over the default group: rank 1 waits here until rank 0 gives up
    return message


def test_a_group_made_with_a_short_timeout_gives_up_on_a_missing_peer():
    # with the default timeout (10 minutes) rank 0 would still be waiting when the harness
    # gives up after 60 s, failing the test
    message, _ = run_distributed(2, _collective_with_a_missing_peer, 2.0, timeout=60)
    assert "Timed out waiting 2000ms" in message, message
