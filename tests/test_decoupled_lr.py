"""``training.decoupled_lr`` / ``decoupled_min_lr`` (Megatron's ``--decoupled-lr``): the
optimizer group of the word-embedding and output-layer weights (Megatron's
``is_embedding_or_output_parameter``; with tied embeddings the shared matrix and a last stage's
copy of it), and training with it against ``torch.optim.AdamW`` given the same groups by hand,
each at its own rate from the closed-form schedule, on two data-parallel ranks: with torch's
AdamW, the distributed optimizer and apex's FusedAdam (a stand-in). The schedule itself is
checked in ``test_optim.py``, the exact resume in ``test_checkpoint_resume.py``."""

import pytest
import torch
from checks import assert_rel_close, own_rank_group
from gpt_runs import DECAY, EPS, LR, WARMUP, assemble, global_batch, gpt_config, pieces, setup
from gpt_runs import train_step as gpt_train_step
from harness import run_distributed
from test_optim import closed_form_lr, fake_apex_fused_adam

from mp import parallel_state as ps
from mp.model import GPTModel
from mp.optim import get_param_groups

DECOUPLED_LR, DECOUPLED_MIN_LR, STEPS = 10 * LR, LR / 5, 4
EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def _decoupled_names(pp: int, untie: bool) -> list[str]:
    """The names (in the chunk) of the parameters in this rank's decoupled group."""
    models, _, _ = setup(1, pp, seed=1, untie_embeddings_and_output_weights=untie)
    groups = get_param_groups(models, 0.1, decoupled_lr=DECOUPLED_LR)
    decoupled = [g for g in groups if g.get("is_decoupled_lr")]
    assert all(g["lr"] == DECOUPLED_LR and g["weight_decay"] == 0.1 for g in decoupled)
    assert sum(len(g["params"]) for g in groups) == \
        len({id(p) for m in models for p in m.parameters()})
    names = {id(p): n for m in models for n, p in m.module.named_parameters()}
    return sorted(names[id(p)] for g in decoupled for p in g["params"])


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_the_group_holds_the_embedding_and_output_weights(pp, untie):
    ranks = run_distributed(pp, _decoupled_names, pp, untie)
    if pp == 1:
        assert ranks == [[EMBEDDING, OUTPUT] if untie else [EMBEDDING]]
    else:  # the last stage's output weight is the tied copy, or its own
        assert ranks == [[EMBEDDING], [OUTPUT]]


def _reference_groups(model: torch.nn.Module) -> list[dict]:
    """The three AdamW groups of Megatron's rule, written out by name."""
    named = dict(model.named_parameters())
    special = [named[EMBEDDING], named[OUTPUT]]
    rest = [p for n, p in named.items() if n not in (EMBEDDING, OUTPUT)]
    return [{"params": [p for p in rest if p.dim() > 1], "weight_decay": 0.1,
             "peak": LR, "final": LR / 10},
            {"params": [p for p in rest if p.dim() == 1], "weight_decay": 0.0,
             "peak": LR, "final": LR / 10},
            {"params": special, "weight_decay": 0.1, "peak": DECOUPLED_LR,
             "final": DECOUPLED_MIN_LR}]


def _against_adamw(distributed_optimizer: bool, impl: str) -> dict:
    """``STEPS`` steps of the DP2 model with decoupled rates, and of a one-rank copy trained
    on whole global batches with AdamW, clipping and the closed-form rates applied here."""
    with fake_apex_fused_adam():
        models, optimizer, scheduler = setup(
            1, 1, seed=1, distributed_optimizer=distributed_optimizer, decoupled_lr=DECOUPLED_LR,
            decoupled_min_lr=DECOUPLED_MIN_LR, optimizer_args={"optimizer_impl": impl},
            untie_embeddings_and_output_weights=True)
        kind = type(optimizer.optimizer).__name__
    reference = GPTModel(gpt_config(1, 1, untie_embeddings_and_output_weights=True),
                         group=own_rank_group())
    reference.load_state_dict(models[0].module.state_dict())
    groups = _reference_groups(reference)
    adamw = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=EPS)
    for step in range(STEPS):
        gpt_train_step(models, optimizer, scheduler, step)
        data = global_batch(step)
        adamw.zero_grad()
        reference(data["tokens"], data["position_ids"], labels=data["labels"]).mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        for group in groups:
            group["lr"] = closed_form_lr(step, "cosine", group["peak"], group["final"], WARMUP,
                                         DECAY)
        adamw.step()
    return {"kind": kind, "rates": {g["lr"] for g in optimizer.param_groups},
            "dp": ps.get_data_parallel_world_size(), "weights": pieces(models),
            "reference": {n: p.detach().clone() for n, p in reference.named_parameters()}}


@pytest.mark.parametrize("distributed_optimizer,impl,kind", [
    (False, "torch", "AdamW"), (True, "torch", "AdamW"), (False, "apex", "_GroupStepAdam")],
    ids=["adamw", "distributed-optimizer", "apex-fused-adam"])
def test_training_matches_adamw_with_the_groups_set_by_hand(distributed_optimizer, impl, kind):
    ranks = run_distributed(2, _against_adamw, distributed_optimizer, impl)
    first = ranks[0]
    assert first["kind"] == kind and first["dp"] == 2
    rates = sorted(set().union(*(r["rates"] for r in ranks)))  # the next step's
    assert rates == pytest.approx(sorted(
        closed_form_lr(STEPS, "cosine", peak, final, WARMUP, DECAY)
        for peak, final in ((LR, LR / 10), (DECOUPLED_LR, DECOUPLED_MIN_LR))), rel=1e-12)
    weights, expected = assemble([r["weights"] for r in ranks]), first["reference"]
    assert weights.keys() == expected.keys()
    for name, want in expected.items():
        assert_rel_close(weights[name], want, rtol=1e-5, what=name)
