"""``launch/pretrain_gpt.py`` end to end under ``torchrun`` on 4 CPU ranks (TP=2 x DP=2): a
short run on the embedded corpus lowers the loss; a rank that dies takes the whole job down
(2 ranks).
The launcher's job in the simulated ranks (`jobs.run_job`): interleaved pipelines with context
parallelism, mixture-of-experts pipelines and Megatron's Llama 3 example train; and in this
process, a bad config stops before any process group."""

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from harness import run_distributed
from jobs import LAUNCH, ROOT, exact_values, generated, launcher, refusal, run_job

from mp import parallel_state as ps

TINY = ["--config", os.path.join(ROOT, "configs", "gpt-tiny.yaml"),
        "--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "64",
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-iters", "5", "--log-interval", "5", "--eval-iters", "2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mp-cache"))


def torchrun(script: str, args: list[str], timeout: float,
             ranks: int = 4) -> subprocess.CompletedProcess:
    """Run ``script`` on ``ranks`` local ranks; on timeout kill torchrun and every rank it
    started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ranks), script, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own, out of reach of killpg: SIGTERM
        # makes torchrun stop them itself; SIGKILL only if it does not end
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_short_run_lowers_the_loss(cache_dir, tmp_path):
    start = time.monotonic()
    run = torchrun(LAUNCH, [*TINY, "--train-iters", "30", "--eval-interval", "15",
                            "--data-cache-path", cache_dir, "--num-workers", "1",
                            "--logging.tensorboard_dir", str(tmp_path / "tb")], timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "tensor_model_parallel_size: 2" in out  # the resolved config, printed once
    assert out.count("world 4 = TP 2 x PP 1 x DP 2") == 1
    logged = re.findall(r"^iteration (\d+)/30 \|.*?\| lm loss (\S+) \| lr (\S+) \|", out,
                        re.MULTILINE)
    losses = [float(loss) for _, loss, _ in logged]
    assert len(losses) == 6, out
    assert losses[-1] < 0.8 * losses[0], f"the loss did not fall: {losses}"
    validation = re.findall(r"^validation at iteration (15|30) \| lm loss (\S+) \| lm loss PPL",
                            out, re.MULTILINE)
    assert len(validation) == 2
    test = re.findall(r"^test at iteration (30) \| lm loss (\S+) \| lm loss PPL", out,
                      re.MULTILINE)
    assert len(test) == 1, out  # the builtin corpus's test split: the last of 969,30,1
    print(f"e2e: {time.monotonic() - start:.1f} s, lm loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # TensorBoard (a test dependency) holds each iteration's loss and rate (the default
    # --tensorboard-log-interval 1): each line's loss is the mean of its 5 iterations', and the
    # evaluations' values are the printed ones
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    written = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in ("lm loss", "learning-rate", "validation lm loss", "test lm loss")}
    assert [step for step, _ in written["lm loss"]] == list(range(1, 31))
    assert [step for step, _ in written["learning-rate"]] == list(range(1, 31))
    for it, loss, lr in logged:
        last = int(it)
        window = [value for step, value in written["lm loss"] if last - 5 < step <= last]
        assert sum(window) / 5 == pytest.approx(float(loss), rel=1e-3), f"lm loss at {it}"
        assert written["learning-rate"][last - 1][1] == pytest.approx(float(lr), rel=1e-3)
    for tag, printed in (("validation lm loss", validation), ("test lm loss", test)):
        assert [step for step, _ in written[tag]] == [int(it) for it, _ in printed], tag
        for (step, value), (_, text) in zip(written[tag], printed):
            assert value == pytest.approx(float(text), rel=1e-3), f"{tag} at {step}"


def _check_20_iterations_lower_the_loss(out: str, start_line: str) -> None:
    """The job printed ``start_line`` once and its loss fell by 20%."""
    assert out.count(start_line) == 1, out
    losses = [float(x) for x in re.findall(r"^iteration \d+/20 \|.*?\| lm loss (\S+) \|",
                                           out, re.MULTILINE)]
    assert len(losses) == 4, out
    assert losses[-1] < 0.8 * losses[0], f"the loss did not fall: {losses}"


def test_interleaved_pipeline_run_with_context_parallelism_lowers_the_loss(cache_dir):
    """PP=2 with two virtual stages per rank, split unevenly (stage 0 holds 2 of the 6 layers,
    one a chunk), each sequence split over 2 context-parallel ranks (TP=1, DP=1) that pass
    keys and values around a ring (Megatron's p2p), and the distributed optimizer: the job
    builds the stages, the interleaved schedule trains, the optimizer state is sharded over
    the CP ranks, and rank 0 (first stage) logs the last stage's loss."""
    out = run_distributed(4, run_job, [
        *TINY, "--use-distributed-optimizer", "--tensor-model-parallel-size", "1",
        "--context-parallel-size", "2", "--cp-comm-type", "p2p",
        "--pipeline-model-parallel-size", "2", "--num-layers", "6",
        "--decoder-first-pipeline-num-layers", "2", "--num-virtual-stages-per-pipeline-rank",
        "2", "--train-iters", "20", "--eval-interval", "20", "--data-cache-path", cache_dir])[0]
    _check_20_iterations_lower_the_loss(
        out, "world 4 = TP 1 x CP 2 (p2p) x PP 2 (layers 2+4) x DP 1")


def test_mixture_of_experts_pipeline_run_lowers_the_loss(cache_dir):
    """Every other layer a mixture of 4 experts (top 2, load-balancing and z losses) split
    over 2 expert-parallel ranks, at PP=2 x DP=2 with the distributed optimizer (Megatron's
    flags): the job builds the expert groups, trains, the loss falls, and the log line has
    the routers' losses (averaged over both stages' MoE layers)."""
    out = run_distributed(4, run_job, [
        *TINY, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
        "--num-layers", "4", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-layer-freq", "2", "--expert-model-parallel-size", "2",
        "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
        "--moe-token-dispatcher-type", "alltoall", "--use-distributed-optimizer",
        "--train-iters", "20", "--eval-interval", "20", "--data-cache-path", cache_dir])[0]
    _check_20_iterations_lower_the_loss(
        out, "world 4 = TP 1 x PP 2 x DP 2 | 4 experts, top 2, EP 2")
    balance = [float(x) for x in re.findall(r"^iteration .*\| load_balancing_loss (\S+) \| "
                                            r"z_loss \S+ \|", out, re.MULTILINE)]
    assert len(balance) == 4 and all(0.5 < b < 4 for b in balance), out


def _job_and_pipeline_ranks(args: list[str]) -> tuple[str, list[int]]:
    """`jobs.run_job` with exact lines, and this rank's pipeline group as the job made it."""
    module, seen = launcher(), []
    real = module.pretrain

    def recording(cfg):
        seen.append(ps.get_pipeline_model_parallel_ranks())
        return real(cfg)

    module.pretrain = recording
    try:
        return run_job(args, exact=True), seen[0]
    finally:
        module.pretrain = real


def test_the_tp_pp_dp_rank_order_trains_as_the_default_one(cache_dir):
    """``--use-tp-pp-dp-mapping`` at TP 2 x PP 2 x DP 2: each pipeline is other ranks
    (``t + 2 (p + 2 d)``, not ``t + 2 (d + 2 p)``), the losses, gradient norms and rates the
    same bit for bit."""
    args = [*TINY, "--pipeline-model-parallel-size", "2", "--train-iters", "6",
            "--eval-iters", "0", "--data-cache-path", cache_dir]
    runs = [run_distributed(8, _job_and_pipeline_ranks, flags)
            for flags in (args, [*args, "--use-tp-pp-dp-mapping"])]
    default, mapped = runs[0][0][0], runs[1][0][0]  # what rank 0 printed
    assert [pipe for _, pipe in runs[0]] == [[r % 4, r % 4 + 4] for r in range(8)]
    assert [pipe for _, pipe in runs[1]] == [[r - r % 4 + r % 2, r - r % 4 + r % 2 + 2]
                                             for r in range(8)]
    assert "world 8 = TP 2 x PP 2 x DP 2 (TP-PP-DP order) |" in mapped
    assert len(exact_values(default)) == 6
    assert exact_values(mapped) == exact_values(default)


@pytest.mark.parametrize("override,message", [
    (["--sequence-parallel", "--num-experts", "4", "--expert-model-parallel-size", "4"],
     "model.expert_model_parallel_size=4 x expert_tensor_parallel_size=2 does not divide "
     "tensor_model_parallel_size=2 x data_parallel_size=2 x context_parallel_size=1 "
     "(world_size=4)"),
    (["--tensor-model-parallel-size", "3"],
     "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (["--micro-batch-size", "3"],
     "training.global_batch_size=8 is not divisible by training.micro_batch_size x "
     "data_parallel_size = 3 x 2 = 6"),
    (["--load", "/nonexistent/ckpt", "--exit-on-missing-checkpoint"],
     "training.load='/nonexistent/ckpt' holds no checkpoint and training."
     "exit_on_missing_checkpoint is set: stopping before training")])
def test_bad_config_fails_before_any_process_group(override, message, monkeypatch, capsys):
    """The launcher's ``main`` here, in torchrun's world of 4 but with no rendezvous to
    join: it exits with status 2 and the reason, having made no process group."""
    assert message in refusal([*TINY, *override], monkeypatch, capsys)


def test_a_dying_rank_takes_the_job_down(cache_dir, tmp_path):
    script = tmp_path / "dies_on_rank1.py"
    script.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        import mp.training.training as training

        real_train_step = training.train_step
        calls = []

        def train_step(*args, **kwargs):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 3:
                raise RuntimeError("planted failure on rank 1")
            return real_train_step(*args, **kwargs)

        training.train_step = train_step
        sys.argv = [{LAUNCH!r}, *sys.argv[1:]]
        runpy.run_path({LAUNCH!r}, run_name="__main__")
    """))
    start = time.monotonic()
    run = torchrun(str(script), [*TINY, "--train-iters", "30", "--data-cache-path", cache_dir],
                   timeout=180, ranks=2)
    assert run.returncode != 0
    assert "planted failure on rank 1" in run.stdout + run.stderr
    assert time.monotonic() - start < 120


def _replaced(flags: list[str], values: dict[str, str]) -> list[str]:
    """``flags`` with the value after each flag of ``values`` replaced."""
    out = list(flags)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


def test_megatron_llama3_example_runs_scaled_down(cache_dir, tmp_path, capsys):
    """Megatron-LM's Llama 3 8B bf16 example on mock data, its flags as written but the sizes
    shrunk (and TP 2; heads 24 wide at hidden size 64): it trains in bf16 with the per-token
    loss, decoupled rates and bf16 gradient reduction, prints why the flags without effect
    have none, and its final checkpoint continues a NullTokenizer prompt (tools/generate.py)."""
    from test_config_megatron import MEGATRON_LLAMA3_8B

    flags = _replaced(MEGATRON_LLAMA3_8B, {
        "--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "128",
        "--num-attention-heads": "4", "--num-query-groups": "2", "--kv-channels": "24",
        "--seq-length": "64", "--max-position-embeddings": "64", "--global-batch-size": "8",
        "--train-samples": "96", "--lr-decay-samples": "96", "--lr-warmup-samples": "16",
        "--tensor-model-parallel-size": "2", "--vocab-size": "1000"})
    # the final validation scaled down too: 4 batches, not Megatron's default 100; no loader
    # processes (the simulated ranks may not start any; test_short_run_lowers_the_loss's job
    # has them)
    flags += ["--eval-iters", "4", "--num-workers", "0", "--save", str(tmp_path / "ckpt"), "--load",
              str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb"),
              "--data-cache-path", cache_dir, "--wandb-save-dir", str(tmp_path / "wandb")]
    # when wandb is installed: no network
    out = run_distributed(4, run_job, flags, env={"WANDB_MODE": "offline"})[0]
    assert out.count("world 4 = TP 2 x PP 1 x DP 2") == 1
    assert out.count("has no effect in mp") == 6
    losses = [float(x) for x in re.findall(r"^iteration \d+/12 \|.*?\| lm loss (\S+) \|", out,
                                           re.MULTILINE)]
    assert len(losses) == 12, out
    assert abs(losses[0] - math.log(1001)) < 0.1  # random tokens of NullTokenizer's vocabulary
    assert re.search(r"^iteration 12/12 \|.*\| decoupled lr \S+ \| grad norm \S+ \| num zeros "
                     r"\d+ \| params norm \S+ \|", out, re.MULTILINE), out
    printed = generated(["--load", str(tmp_path / "ckpt"), "--prompt", "1 2 3",
                         "--max-new-tokens", "4", "--greedy"], capsys)
    prompt, *_, continued = printed.strip().splitlines()
    assert prompt == "1 2 3", printed
    assert [int(token) <= 1000 for token in continued.split()] == [True] * 4, printed
