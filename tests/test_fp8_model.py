"""FP8 in the GPT (``model.fp8``, Megatron's ``--fp8-format``; `mp.model.fp8_layers`): the
config and its Megatron flags, which linears run in FP8, and training at TP 2 (with sequence
parallelism, the distributed optimizer, PP 2, recompute) against one process on the same
weights. The amaxes are all-reduced over TP, so a TP layout quantizes as one process does and
only fp32 summation order differs: 1e-5, while FP8 itself moves the gradient norms far more
(checked, so the flag is known to act). One optimizer step: after it, weights that differ by
fp32 round-off may round to neighbouring FP8 values in the next forward (a legitimate 2^-4
change of one element, seen with ``fp8_wgrad`` off, whose fp32 weight gradients differ so)."""

import re

import pytest
import torch
from gpt_runs import assemble, assert_same_training, pieces, setup, train_from
from harness import run_distributed
from jobs import run_job
from test_config import TINY, error_of
from test_pretrain import TINY as SMALL_JOB

from mp.config import flag_notices, load_config, parse_args
from mp.generation_setup import generation_config
from mp.model import GPTModel, TransformerConfig
from mp.tensor_parallel.fp8 import Fp8Gemms, Fp8Recipe

STEPS = 1


def test_megatron_flags_set_the_fields():
    argv = ["--config", TINY, "--fp8-format", "e4m3", "--fp8-recipe", "tensorwise",
            "--no-fp8-wgrad", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2",
            "--num-layers-at-end-in-bf16", "0", "--fp8-margin", "0"]
    m = parse_args(argv, world_size=4).model
    assert (m.fp8, m.fp8_recipe, m.fp8_wgrad) == ("e4m3", "tensorwise", False)
    assert (m.first_last_layers_bf16, m.num_layers_at_start_in_bf16,
            m.num_layers_at_end_in_bf16) == (True, 2, 0)
    assert flag_notices(argv) == [
        "notice: --fp8-margin 0 has no effect in mp: it sets Transformer Engine's delayed "
        "scaling; mp's --fp8-recipe tensorwise scales each operand by its own amax at every "
        "product"]
    plain = load_config(TINY, [], 4).model
    assert (plain.fp8, plain.fp8_wgrad, plain.first_last_layers_bf16) == (None, True, False)


@pytest.mark.parametrize("args, message", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
     "fp8_recipe='delayed': mp implements 'tensorwise'"),
    (["--fp8-format", "e5m2"], "fp8='e5m2' must be one of 'e4m3', 'hybrid'"),
    (["--fp8-format", "hybrid", "--hidden-size", "120", "--ffn-hidden-size", "512"],
     "fp8='hybrid': hidden_size = 120 is not a multiple of 16"),
    (["--fp8-format", "hybrid", "--ffn-hidden-size", "488"],
     "ffn_hidden_size / tensor_model_parallel_size = 244 is not a multiple of 16"),
    (["--fp8-format", "hybrid", "--kv-channels", "12"],
     "query_projection_size / tensor_model_parallel_size = 24"),
    (["--fp8-format", "hybrid", "--num-attention-heads", "8", "--num-query-groups", "2",
      "--kv-channels", "4"], "qkv_size / tensor_model_parallel_size = 24"),
    (["--fp8-format", "hybrid", "--seq-length", "100", "--micro-batch-size", "2"],
     "a rank's tokens per micro-batch (training.micro_batch_size x model.seq_length / "
     "context_parallel_size = 200) are not a multiple of 16"),
    (["--num-layers-at-end-in-bf16", "-1"], "num_layers_at_end_in_bf16=-1 must be a "
     "non-negative integer"),
])
def test_bad_fp8_configs_are_refused(args, message):
    assert message in error_of(*args)


def _fp8_layers(config: TransformerConfig) -> list[list[str]]:
    """Per transformer layer, the names of its linears that run in FP8 (by the config's
    recipe)."""
    model = GPTModel(config)
    assert model.output_layer.gemms is None
    fp8 = [[(name, module.gemms) for name, module in layer.named_modules()
            if isinstance(getattr(module, "gemms", None), Fp8Gemms)]
           for layer in model.decoder.layers]
    assert all(gemms.recipe == Fp8Recipe(config.fp8, config.fp8_wgrad)
               for layer in fp8 for _, gemms in layer)
    return [sorted(name for name, _ in layer) for layer in fp8]


def _check_fp8_layers():
    from mp import parallel_state as ps
    ps.initialize_model_parallel(1)
    shape = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=64,
                 seq_length=16, activation="swiglu")
    dense = ["mlp.linear_fc1", "mlp.linear_fc2", "mlp.linear_gate",
             "self_attention.dense", "self_attention.query_key_value"]
    assert _fp8_layers(TransformerConfig(**shape, fp8="hybrid")) == [dense] * 4
    assert _fp8_layers(TransformerConfig(**shape, fp8="e4m3", fp8_wgrad=False)) == [dense] * 4
    assert _fp8_layers(TransformerConfig(**shape, fp8="hybrid", first_last_layers_bf16=True)) \
        == [[], dense, dense, []]
    assert _fp8_layers(TransformerConfig(**shape, fp8="hybrid", first_last_layers_bf16=True,
                                         num_layers_at_start_in_bf16=0,
                                         num_layers_at_end_in_bf16=2)) == [dense, dense, [], []]
    assert _fp8_layers(TransformerConfig(**shape)) == [[]] * 4
    generation = generation_config(TransformerConfig(**shape, fp8="hybrid").__dict__, 1)
    assert generation.fp8 is None  # one token at a time: no multiple of 16


def test_which_linears_run_in_fp8():
    run_distributed(1, _check_fp8_layers)


def _initial_weights() -> dict:
    models, _, _ = setup(1, 1, seed=3)
    return pieces(models)


@pytest.mark.parametrize("world,tp,pp,overrides", [
    (2, 2, 1, {}),
    (4, 2, 1, {"sequence_parallel": True, "distributed_optimizer": True}),
    (4, 2, 2, {"sequence_parallel": True, "recompute_granularity": "full",
               "recompute_method": "uniform"}),
    (2, 2, 1, {"sequence_parallel": True, "recompute_granularity": "selective",
               "fp8_wgrad": False}),
], ids=["TP2", "TP2-SPxDP2-distributed-optimizer", "TP2-SPxPP2-full-recompute",
        "TP2-SP-selective-recompute-no-fp8-wgrad"])
def test_training_follows_one_process(world, tp, pp, overrides):
    """An optimizer step (Adam, clipping): loss, gradient norm and every weight."""
    whole = assemble(run_distributed(1, _initial_weights))
    fp8 = {"fp8": "hybrid", "fp8_wgrad": overrides.pop("fp8_wgrad", True)}
    serial = run_distributed(1, train_from, whole, 1, 1, STEPS, **fp8)[0]
    plain = run_distributed(1, train_from, whole, 1, 1, STEPS)[0]
    norms, plain_norms = torch.tensor(serial["norms"]), torch.tensor(plain["norms"])
    moved = ((norms - plain_norms).abs() / plain_norms).max()
    assert moved > 1e-4, "FP8 changed no gradient norm: it is not in effect"
    assert moved < 0.05, "FP8's gradients are far off the model's own precision"
    assert_same_training(run_distributed(world, train_from, whole, tp, pp, STEPS, **fp8,
                                         **overrides), serial)


def test_pretraining_job_in_fp8_lowers_the_loss(tmp_path):
    """The launcher's job, bf16 with FP8 products at TP 2 x DP 2 with sequence parallelism
    (Megatron's flags): it trains and says so in its printed config."""
    out = run_distributed(4, run_job, [
        *SMALL_JOB, "--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise",
        "--sequence-parallel", "--train-iters", "20", "--eval-interval", "20",
        "--data-cache-path", str(tmp_path)])[0]
    assert "fp8: hybrid" in out, out
    losses = [float(x) for x in re.findall(r"^iteration \d+/20 \|.*?\| lm loss (\S+) \|",
                                           out, re.MULTILINE)]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], out
