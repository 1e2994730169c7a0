"""``logging.log_params_norm`` and ``log_num_zeros_in_grad`` (Megatron's ``--log-params-norm``,
``--log-num-zeros-in-grad``): the parameters' L2 norm (before and after a step) and the count of
zero gradient elements at TP2 x DP2 (with and without the distributed optimizer) and PP2 x DP2
equal the values computed directly from the whole tensors of a one-rank model holding the same
weights: TP-replicated parameters counted once, shards summed over TP and PP, a tied
embedding's last-stage copy left out. Untied, the embedding rows of tokens absent from the
batch have exactly zero gradients. The log line carries both values."""

import contextlib
import io
import math
import re

import pytest
from gpt_runs import assemble, batch, load_whole, pieces, run, setup
from harness import run_distributed
from test_training import job, micro_batches

from mp import parallel_state as ps
from mp.device import get_device
from mp.training import gpt_step
from mp.training.logger import TrainingLogger
from mp.training.pretrain import set_random_seed, setup_model_and_optimizer
from mp.training.training import train


def _norm(tensors) -> float:
    return math.sqrt(sum(t.double().square().sum().item() for t in tensors))


def _step(tp: int, pp: int, untie: bool, initial: dict | None = None,
          distributed_optimizer: bool = False) -> dict:
    """The optimizer's norms and zero count around one step (from ``initial`` weights), and
    on one rank the same values computed here from the tensors themselves. q/k norms
    (replicated over TP: counted once). No biases: the key projection's (and a LayerNorm
    k_layernorm's) would have gradients that are zero only up to rounding."""
    models, optimizer, scheduler = setup(tp, pp, seed=1, add_bias_linear=False,
                                         qk_layernorm=True, normalization="RMSNorm",
                                         untie_embeddings_and_output_weights=untie,
                                         distributed_optimizer=distributed_optimizer,
                                         optimizer_args={"log_num_zeros_in_grad": True})
    if initial is None:  # the one-rank reference: its own weights
        initial = assemble([pieces(models)])
    else:
        load_whole(models, optimizer, initial)
    scheduler.step()  # past the warm-up's rate 0
    measured = {"before": optimizer.calc_params_l2_norm()}
    run(models, batch(0), forward_only=False)
    zeros = sum(int((p.main_grad == 0).sum()) for m in models for p in m.module.parameters())
    measured["zeros"] = optimizer.step().num_zeros_in_grad
    measured["after"] = optimizer.calc_params_l2_norm()
    own = {"before": _norm(initial.values()), "zeros": zeros,
           "after": _norm(assemble([pieces(models)]).values())} if tp * pp == 1 else None
    return {"measured": measured, "own": own, "initial": initial}


@pytest.fixture(scope="module", params=[False, True], ids=["tied", "untied"])
def reference(request):
    untie = request.param
    result = run_distributed(1, _step, 1, 1, untie)[0]
    assert result["measured"]["zeros"] == result["own"]["zeros"]
    for key in ("before", "after"):
        assert result["measured"][key] == pytest.approx(result["own"][key], rel=1e-6)
    assert (result["own"]["zeros"] > 0) == untie, result["own"]
    return untie, result


@pytest.mark.parametrize("tp,pp,distributed_optimizer", [
    (2, 1, False), (2, 1, True), (1, 2, False)],
    ids=["TP2xDP2", "TP2xDP2-distopt", "PP2xDP2"])
def test_norms_and_zeros_equal_the_one_rank_model(reference, tp, pp, distributed_optimizer):
    untie, want = reference
    ranks = run_distributed(4, _step, tp, pp, untie, want["initial"], distributed_optimizer)
    for rank, result in enumerate(ranks):
        got = result["measured"]
        assert got["zeros"] == want["own"]["zeros"], f"rank {rank}"
        assert got["before"] == pytest.approx(want["own"]["before"], rel=1e-6), f"rank {rank}"
        assert got["after"] == pytest.approx(want["own"]["after"], rel=1e-5), f"rank {rank}"


def _logged() -> tuple[str, float]:
    """What ``train`` prints for 2 iterations with both values switched on, and the final
    parameters' norm."""
    cfg = job(train_iters=2, lr_warmup_iters=1)
    cfg.logging.log_interval, cfg.logging.log_params_norm = 1, True
    cfg.logging.log_num_zeros_in_grad = True
    ps.initialize_model_parallel(1)
    set_random_seed(cfg.training.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg)
    logger = TrainingLogger(cfg, 1, get_device(), enabled=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(gpt_step.forward_step, model, optimizer, scheduler, micro_batches(2), None, cfg,
              logger)
    logger.close()
    return printed.getvalue(), optimizer.calc_params_l2_norm()


def test_the_log_line_carries_both():
    out, final = run_distributed(1, _logged)[0]
    found = re.findall(r"^iteration (\d)/2 \|.* \| grad norm \S+ \| num zeros (\d+) \| "
                       r"params norm (\S+) \| loss scale 1 \|", out, re.MULTILINE)
    assert [i for i, _, _ in found] == ["1", "2"], out
    assert found[-1][2] == f"{final:.3f}"
