"""``training.calculate_per_token_loss`` (Megatron's ``--calculate-per-token-loss``) against a
single process that takes the whole global batch in one forward and computes, itself, (sum of
every kept token's loss) / (number of kept tokens), on batches whose loss masks keep unequal
numbers of tokens per micro-batch and per data-parallel rank: the loss, the gradient norm
(clipping active) and the weights after a few steps, and the per-token evaluation loss over two
batches, agree at TP2 x DP2 (with and without SP and the distributed optimizer), PP2 x DP2 with
1F1B and interleaved, and with context parallelism (CP2 x DP2, TP2 x CP2 with SP and the
distributed optimizer, PP2 x CP2, TP2 x CP2 with SP and a2a, TP2 x CP2 with SP, p2p (ring
attention) and the distributed optimizer, and TP2 x CP2 x PP2 interleaved on 8 ranks); in fp16
with loss scaling within fp16's precision. The default mode still follows the mean of the
micro-batches' means, which differs on that data, at TP2 x DP2, CP2 x DP2 and TP2 x CP2."""

import pytest
import torch
from checks import assert_rel_close
from gpt_runs import (
    GLOBAL_BATCH,
    MBS,
    S,
    assemble,
    batch,
    global_batch,
    load_whole,
    pieces,
    setup,
    train_step,
)
from harness import run_distributed

from mp.pipeline_parallel.losses import microbatch_loss
from mp.training.evaluation import _sum_and_count, evaluate
from mp.training.gpt_step import forward_step

STEPS, EVAL_BATCHES = 3, (100, 101)
RTOL = 1e-5  # fp32 runs against the reference; the two modes must differ by far more


def _loss(token_losses: torch.Tensor, mask: torch.Tensor, per_token: bool) -> torch.Tensor:
    """The reference loss of ``[n, S]`` token losses: over all kept tokens, or the mean of the
    ``MBS``-sample micro-batches' own means (the same micro-batches at every DP size)."""
    if per_token:
        return (token_losses * mask).sum() / mask.sum()
    return torch.stack([(token_losses[i:i + MBS] * mask[i:i + MBS]).sum() / mask[i:i + MBS].sum()
                        for i in range(0, len(mask), MBS)]).mean()


def _reference(per_token: bool) -> dict:
    """One rank: each step's global batch in a single forward, the loss computed here."""
    models, optimizer, scheduler = setup(1, 1, seed=1)
    (model,) = models
    initial = assemble([pieces(models)])
    losses, norms = [], []
    for step in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        data = global_batch(step, masked=True)
        token_losses = model(data["tokens"], data["position_ids"], labels=data["labels"])
        loss = _loss(token_losses, data["loss_mask"], per_token)
        loss.backward()
        result = optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        norms.append(result.grad_norm)
    with torch.no_grad():
        data = [global_batch(seed, masked=True) for seed in EVAL_BATCHES]
        token_losses = torch.cat([model(d["tokens"], d["position_ids"], labels=d["labels"])
                                  for d in data])
        eval_loss = _loss(token_losses, torch.cat([d["loss_mask"] for d in data]), per_token)
    return {"losses": losses, "norms": norms, "eval": eval_loss.item(),
            "weights": pieces(models), "initial": initial}


def _parallel(initial: dict, tp: int, pp: int, per_token: bool, precision: str = "fp32",
              **kw) -> dict:
    """From the ``initial`` weights, ``STEPS`` `gpt_runs.train_step`s and a two-iteration
    `evaluate` at ``tp`` x ``pp``."""
    models, optimizer, scheduler = setup(tp, pp, 1, precision, calculate_per_token_loss=per_token,
                                         optimizer_args={"loss_scale": 1024.0}, **kw)
    load_whole(models, optimizer, initial)
    losses, norms = zip(*(train_step(models, optimizer, scheduler, step, per_token=per_token,
                                     masked=True) for step in range(STEPS)))
    micro = [m for seed in EVAL_BATCHES for m in batch(seed, masked=True)]
    eval_loss = evaluate(forward_step, [iter(micro) for _ in models], models,
                         eval_iters=len(EVAL_BATCHES),
                         num_microbatches=len(micro) // len(EVAL_BATCHES), seq_length=S,
                         micro_batch_size=MBS,
                         calculate_per_token_loss=per_token)["lm loss"]
    return {"losses": losses, "norms": norms, "eval": eval_loss, "weights": pieces(models)}


@pytest.fixture(scope="module")
def references() -> dict[bool, dict]:
    return {per_token: run_distributed(1, _reference, per_token)[0]
            for per_token in (True, False)}


def _assert_follows(runs: list[dict], want: dict, rtol: float) -> None:
    got = runs[0]
    assert all(r["losses"] == got["losses"] and r["eval"] == got["eval"] for r in runs)
    for key in ("losses", "norms"):
        assert_rel_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=rtol, what=key)
    assert got["eval"] == pytest.approx(want["eval"], rel=rtol)
    weights, expected = assemble([r["weights"] for r in runs]), assemble([want["weights"]])
    assert weights.keys() == expected.keys()
    for name in expected:
        assert_rel_close(weights[name].float(), expected[name], rtol=rtol, what=name)


def test_the_two_modes_differ_on_this_data(references):
    data = global_batch(0, masked=True)["loss_mask"]
    counts = data.view(GLOBAL_BATCH // MBS, -1).sum(1)
    assert len(set(counts.tolist())) == len(counts), f"micro-batch token counts {counts}"
    per_token, mean = references[True], references[False]
    assert max(per_token["norms"]) > 1.0, "the test wants clipping active"
    for key in ("losses", "norms"):
        gap = torch.tensor(per_token[key]) - torch.tensor(mean[key])
        assert gap.abs().min() > 20 * RTOL * abs(mean[key][0]), f"{key}: {gap}"
    assert abs(per_token["eval"] - mean["eval"]) > 20 * RTOL * mean["eval"]
    for name, weight in assemble([mean["weights"]]).items():
        other = assemble([per_token["weights"]])[name]
        assert (weight - other).norm() > 20 * RTOL * weight.norm(), name


LAYOUTS = {
    "TP2xDP2": {"tp": 2, "pp": 1},
    "TP2xDP2-SP-distopt": {"tp": 2, "pp": 1, "sequence_parallel": True,
                           "distributed_optimizer": True},
    "PP2xDP2-1F1B": {"tp": 1, "pp": 2},
    "PP2xDP2-interleaved": {"tp": 1, "pp": 2, "vpp": 2},
    "CP2xDP2": {"tp": 1, "pp": 1, "cp": 2},
    "TP2xCP2-SP-distopt": {"tp": 2, "pp": 1, "cp": 2, "sequence_parallel": True,
                           "distributed_optimizer": True},
    "PP2xCP2-1F1B": {"tp": 1, "pp": 2, "cp": 2},
    "TP2xCP2-SP-a2a": {"tp": 2, "pp": 1, "cp": 2, "sequence_parallel": True,
                       "cp_comm_type": "a2a"},
    "TP2xCP2-SP-p2p-distopt": {"tp": 2, "pp": 1, "cp": 2, "sequence_parallel": True,
                               "cp_comm_type": "p2p", "distributed_optimizer": True},
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_per_token_loss_follows_the_single_process_reference(references, layout):
    want = references[True]
    _assert_follows(run_distributed(4, _parallel, want["initial"], per_token=True, **layout),
                    want, rtol=RTOL)


def test_every_parallelism_at_once_follows_the_reference(references):
    """TP2 x CP2 x PP2 (interleaved) on 8 ranks, with SP and the distributed optimizer."""
    want = references[True]
    _assert_follows(run_distributed(8, _parallel, want["initial"], per_token=True, tp=2, pp=2,
                                    cp=2, vpp=2, sequence_parallel=True,
                                    distributed_optimizer=True), want, rtol=RTOL)


@pytest.mark.parametrize("layout", ["TP2xDP2", "CP2xDP2", "TP2xCP2-SP-distopt"])
def test_default_mode_is_the_mean_of_micro_batch_means(references, layout):
    want = references[False]
    _assert_follows(run_distributed(4, _parallel, want["initial"], per_token=False,
                                    **LAYOUTS[layout]), want, rtol=RTOL)


def test_per_token_loss_with_fp16_loss_scaling(references):
    """The loss is scaled before backward and unscaled before the norm and clipping, after the
    division by the token count: the fp16 run follows the fp32 reference to fp16's precision."""
    want = references[True]
    _assert_follows(run_distributed(4, _parallel, want["initial"], 2, 1, True, "fp16"), want,
                    rtol=1e-2)


def test_a_micro_batch_that_keeps_no_token_adds_nothing():
    """Its mean backpropagates 0 (Megatron's divides 0 by 0) and the reported mean of
    micro-batch means leaves it out (fine-tuning samples cut before the assistant speaks)."""
    weight, store = torch.ones(3, requires_grad=True), []
    loss, count = microbatch_loss(((weight * 0).sum(), torch.tensor(0), {"lm loss": None}), 2,
                                  store, calculate_per_token_loss=False)
    loss.backward()
    assert loss.item() == 0 and torch.equal(weight.grad, torch.zeros(3)) and count == 0
    reported = [torch.tensor([6.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 3.0])]
    assert _sum_and_count(reported, per_token=False).tolist() == [4.0, 2.0]  # (3 + 1) / 2
    assert _sum_and_count(reported, per_token=True).tolist() == [9.0, 5.0]
