"""``training.grad_reduce_in_bf16`` (Megatron's ``--grad-reduce-in-bf16``): in a bf16 run at
TP2 x DP2 with sequence parallelism the gradient buffers are bf16 while the masters and AdamW's
moments stay fp32, and a step's update follows the one of fp32 gradient buffers to bf16's
precision, with and without the distributed optimizer; fp32 and fp16 jobs are refused by the
config rules. The bytes of the bf16 reductions are checked in ``test_estimate_comm.py``."""

import pytest
import torch
from checks import assert_rel_close
from gpt_runs import assemble, masters, setup, train_step
from harness import run_distributed
from test_training import job

from mp.config import ConfigError

STEPS = 2  # the warm-up starts at lr 0: the second step is the first to move the weights


def _bf16_run(grad_dtype: torch.dtype, distributed_optimizer: bool) -> dict:
    models, optimizer, scheduler = setup(2, 1, seed=1, precision="bf16", grad_dtype=grad_dtype,
                                         distributed_optimizer=distributed_optimizer,
                                         sequence_parallel=True)
    grads = {p.main_grad.dtype for m in models for p in m.module.parameters()}
    for step in range(STEPS - 1):
        train_step(models, optimizer, scheduler, step)
    before = masters(models, optimizer)
    _, norm = train_step(models, optimizer, scheduler, STEPS - 1)
    state = {t.dtype for s in optimizer.shards for t in optimizer.optimizer.state[s.main].values()
             if t.dim() > 0}
    return {"grads": grads, "buffers": {m.grad_buffer.dtype for m in models},
            "state": state | {s.main.dtype for s in optimizer.shards}, "norm": norm,
            "before": before, "after": masters(models, optimizer)}


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_bf16_reduction_follows_the_fp32_one(distributed_optimizer):
    fp32, bf16 = (run_distributed(4, _bf16_run, dtype, distributed_optimizer)
                  for dtype in (torch.float32, torch.bfloat16))
    for runs, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        assert all(r["grads"] == r["buffers"] == {dtype} for r in runs)
        assert all(r["state"] == {torch.float32} for r in runs)  # masters and moments
    assert bf16[0]["norm"] == pytest.approx(fp32[0]["norm"], rel=1e-3)
    updates = []
    for runs in (fp32, bf16):
        before, after = (assemble([r[key] for r in runs]) for key in ("before", "after"))
        updates.append({name: after[name] - before[name] for name in after})
    want, got = updates
    for name in want:
        assert want[name].abs().max() > 0, f"{name} did not move"
        assert_rel_close(got[name], want[name], rtol=2e-2, what=f"update of {name}")
    assert any(not torch.equal(got[name], want[name]) for name in want), \
        "bf16 and fp32 reductions agree to the bit: nothing was reduced in bf16"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_refused_unless_bf16(precision):
    cfg = job(grad_reduce_in_bf16=True)
    cfg.model.precision = precision
    with pytest.raises(ConfigError, match=f"training.grad_reduce_in_bf16=true needs "
                                          f"model.precision='bf16' \\(got '{precision}'\\)"):
        cfg.validate(1)
    cfg.model.precision = "bf16"
    cfg.validate(1)
