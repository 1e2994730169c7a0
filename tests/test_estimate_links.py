"""Which link each group's traffic takes in the estimate (`mp.estimate.collective.
group_bandwidth`: NVLink when the whole group shares a node) against the groups the job makes
(`mp.rank_layout`), in Megatron's default order and in its TP-PP-DP order."""

import dataclasses
import os

import pytest

from mp.estimate import Setup, gpu_spec
from mp.estimate.collective import group_bandwidth
from mp.model import TransformerConfig
from mp.rank_layout import rank_layout

KINDS = {"tp": "tensor", "pp": "pipeline", "dp": "data", "dp_cp": "data_with_context",
         "mp": "model", "embedding": "embedding"}


@pytest.mark.parametrize("tp_pp_dp", [False, True], ids=["tp-cp-dp-pp", "tp-pp-dp"])
@pytest.mark.parametrize("tp,pp,dp", [(4, 2, 4), (2, 4, 4), (8, 2, 2), (1, 8, 4), (2, 2, 8)])
def test_a_group_takes_nvlink_exactly_when_its_ranks_share_a_node(tp, pp, dp, tp_pp_dp):
    gpu = gpu_spec("h100")  # 8 GPUs a node: ranks 8 n .. 8 n + 7
    cfg = TransformerConfig(num_layers=8, hidden_size=64, num_attention_heads=8, vocab_size=128,
                            seq_length=32, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp)
    setup = Setup(cfg, data_parallel_size=dp, tp_pp_dp_mapping=tp_pp_dp)
    layout = rank_layout(tp * pp * dp, tp, pp, tp_pp_dp=tp_pp_dp)
    for kind, field in KINDS.items():
        one_node = all(len({rank // gpu.gpus_per_node for rank in group}) == 1
                       for group in getattr(layout, field))
        expected = gpu.intra_node_gbps if one_node else gpu.inter_node_gbps
        assert group_bandwidth(setup, kind, gpu) == expected * 1e9, (kind, layout)


def test_the_order_comes_from_the_job_and_refuses_cp_and_ep():
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=128,
                            seq_length=32, context_parallel_size=2)
    with pytest.raises(ValueError, match=r"the TP-PP-DP rank order \(use_tp_pp_dp_mapping\) "
                                         "takes neither context nor expert parallelism"):
        Setup(cfg, tp_pp_dp_mapping=True)
    from mp.config import parse_args

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-tiny.yaml")
    job = parse_args(["--config", config, "--use-tp-pp-dp-mapping",
                      "--pipeline-model-parallel-size", "2"], world_size=8)
    assert Setup.from_job(job, 8).tp_pp_dp_mapping
    assert not Setup.from_job(dataclasses.replace(
        job, training=dataclasses.replace(job.training, use_tp_pp_dp_mapping=False)), 8
    ).tp_pp_dp_mapping
