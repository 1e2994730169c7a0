"""Multi-token prediction (`mp.model.mtp`): its losses and every gradient against the
computation written out in the test (tokens, labels and the loss mask shifted by hand, the
full-vocabulary cross-entropy), training at tensor, sequence, pipeline (the embedding's copy
on the last stage, tied and untied), data and expert parallel layouts against one process,
packed documents against each document alone, and the config's rules."""

import pytest
import torch
import torch.nn.functional as F
from checks import assert_rel_close
from gpt_runs import (
    GLOBAL_BATCH,
    assemble,
    assert_same_training,
    load_whole,
    pieces,
    setup,
    train_from,
    train_step,
)
from harness import run_distributed

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.model import GPTModel, TransformerConfig
from mp.model.aux_losses import set_aux_loss_scale, take_tracked
from mp.model.packed_documents import PackedDocuments
from mp.model.rope import rotary_freqs

MTP = {"mtp_num_layers": 2, "mtp_loss_scaling_factor": 0.3, "position_embedding_type": "rope"}
B, S, VOCAB = 2, 12, 64


def _reference_losses(model: GPTModel, ids, labels, mask) -> tuple[torch.Tensor, list]:
    """(the main per-token losses ``[b, s]``, each depth's masked mean loss), by hand."""
    cfg = model.config
    freqs = rotary_freqs(S, cfg.rotary_dim, cfg.rotary_base, "cpu")
    weight = model.embedding.word_embeddings.weight

    def cross_entropy(hidden, targets):  # hidden [s, b, h] after a final norm
        logits = hidden.transpose(0, 1) @ weight.T  # tied: [b, s, V]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                               reduction="none").view(B, S)

    hidden = model.decoder(model.embedding(ids), None, freqs, final_norm=False)
    main = cross_entropy(model.decoder.final_layernorm(hidden), labels)
    depth_losses = []
    for k, layer in enumerate(model.mtp.layers, start=1):
        ahead = torch.zeros_like(ids)
        ahead[:, :S - k] = ids[:, k:]
        targets, kept = torch.zeros_like(labels), torch.zeros_like(mask)
        targets[:, :S - k], kept[:, :S - k] = labels[:, k:], mask[:, k:]
        joined = torch.cat((layer.enorm(model.embedding(ahead)), layer.hnorm(hidden)), -1)
        hidden = layer.transformer_layer(joined @ layer.eh_proj.weight.T, None, freqs)
        losses = cross_entropy(layer.final_layernorm(hidden), targets)
        depth_losses.append((losses * kept).sum() / kept.sum())
    return main, depth_losses


def _against_reference(overrides: dict):
    ps.initialize_model_parallel(1)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            vocab_size=VOCAB, seq_length=S, make_vocab_size_divisible_by=8,
                            hidden_dropout=0.0, attention_dropout=0.0, **{**MTP, **overrides})
    torch.manual_seed(0)
    model = GPTModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids, labels = (torch.randint(0, VOCAB, (B, S), generator=g) for _ in range(2))
    mask = (torch.rand(B, S, generator=g) < 0.7).float()
    set_aux_loss_scale(1.0)  # the attached losses backpropagate with gradient 1 x weight
    take_tracked()
    main = model(ids, labels=labels, loss_mask=mask)
    objective = (main * mask).sum() / mask.sum()
    objective.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    tracked = take_tracked()
    model.zero_grad()

    ref_main, depth_losses = _reference_losses(model, ids, labels, mask)
    assert_rel_close(main, ref_main, what="main per-token losses")
    for k, loss in enumerate(depth_losses, start=1):
        assert_rel_close(tracked[f"mtp_{k} loss"][0], loss, what=f"depth {k}'s loss")
    weight = cfg.mtp_loss_scaling_factor / cfg.mtp_num_layers
    ((ref_main * mask).sum() / mask.sum() + weight * sum(depth_losses)).backward()
    for name, p in model.named_parameters():
        assert_rel_close(grads[name], p.grad, what=f"grad of {name}")
    model.eval()  # evaluation: the main model's losses, no prediction depths
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels, loss_mask=mask), main.detach())
    assert take_tracked() == {}


@pytest.mark.parametrize("overrides", [
    {}, {"mtp_num_layers": 1, "normalization": "RMSNorm", "activation": "swiglu"},
    {"num_moe_experts": 4, "moe_ffn_hidden_size": 16}],
    ids=["two-depths", "one-depth-rms-swiglu", "experts"])
def test_losses_and_gradients_match_the_written_out_computation(overrides):
    run_distributed(1, _against_reference, overrides)


def _packed_against_alone() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each depth's loss over a sample packing documents of 5 and 7 tokens (packed
    documents), and the same mean over each document alone: its mean loss times the places
    with a target ``k`` ahead in it, ``n - k``, summed, over their count."""
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = GPTModel(TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, seq_length=S,
        make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0, **MTP))
    g = torch.Generator().manual_seed(2)
    ids, labels = (torch.randint(1, VOCAB, (1, S), generator=g) for _ in range(2))
    lengths = (5, 7)
    segments = torch.repeat_interleave(torch.arange(2), torch.tensor(lengths))[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    take_tracked()
    with torch.no_grad():
        model.train()
        model(ids, positions, PackedDocuments(segments), labels=labels)
        packed = take_tracked()
        sums = [0.0] * MTP["mtp_num_layers"]
        for doc_ids, doc_labels in zip(ids.split(lengths, 1), labels.split(lengths, 1)):
            model(doc_ids, labels=doc_labels)
            alone = take_tracked()
            for k in range(1, len(sums) + 1):
                sums[k - 1] += alone[f"mtp_{k} loss"][0] * (doc_ids.size(1) - k)
    return [(packed[f"mtp_{k} loss"][0], sums[k - 1] / sum(n - k for n in lengths))
            for k in range(1, len(sums) + 1)]


def test_packed_documents_predict_within_each_document():
    for got, want in run_distributed(1, _packed_against_alone)[0]:
        assert_rel_close(got, want, what="a depth's loss")


STEPS = 3


def _initial_weights(**overrides) -> dict:
    models, _, _ = setup(1, 1, seed=5, **MTP, **overrides)
    return pieces(models)


def _train(tp: int, pp: int, ep: int, whole: dict, distributed_optimizer: bool = False,
           **overrides) -> dict:
    return train_from(whole, tp, pp, STEPS, masked=True, ep=ep,
                      distributed_optimizer=distributed_optimizer, **MTP, **overrides)


@pytest.mark.parametrize("world,tp,pp,ep,distributed_optimizer,overrides", [
    (2, 2, 1, 1, False, {"sequence_parallel": True}),
    (4, 2, 1, 1, True, {}),
    (2, 1, 2, 1, False, {}),
    (4, 2, 2, 1, False, {"sequence_parallel": True,
                         "untie_embeddings_and_output_weights": True}),
    (4, 1, 2, 2, True, {"num_moe_experts": 4, "moe_ffn_hidden_size": 16}),
], ids=["TP2-SP", "TP2xDP2-distributed-optimizer", "PP2-tied", "TP2-SPxPP2-untied",
        "PP2xEP2-experts-distributed-optimizer"])
def test_training_follows_one_process(world, tp, pp, ep, distributed_optimizer, overrides):
    """A few steps on batches whose loss masks keep a part of the tokens: losses, gradient
    norms (clipped) and every weight; under pipelining the last stage's copy of the embedding
    starts as the first stage's and their gradients are summed."""
    model = {k: v for k, v in overrides.items()
             if k in ("untie_embeddings_and_output_weights", "num_moe_experts",
                      "moe_ffn_hidden_size")}
    whole = assemble(run_distributed(1, _initial_weights, **model))
    serial = run_distributed(1, _train, 1, 1, 1, whole, **model)[0]
    runs = run_distributed(world, _train, tp, pp, ep, whole, distributed_optimizer,
                           **overrides)
    assert_same_training(runs, serial)


def _save(path: str, whole: dict) -> dict:
    """Two steps at TP 2 x PP 2 (untied: the last stage's embedding is a copy), saved."""
    models, optimizer, scheduler = setup(2, 2, seed=9, **MTP,
                                         untie_embeddings_and_output_weights=True)
    load_whole(models, optimizer, whole)
    for step in range(2):
        train_step(models, optimizer, scheduler, step, masked=True)
    save_checkpoint(path, 2, models, optimizer, scheduler,
                    consumed_train_samples=2 * GLOBAL_BATCH)
    return _next_step(models, optimizer, scheduler)


def _next_step(models, optimizer, scheduler) -> dict:
    loss, _ = train_step(models, optimizer, scheduler, 2, masked=True)
    return {"step": loss, "weights": pieces(models)}


def _load(path: str, tp: int, pp: int) -> dict:
    models, optimizer, scheduler = setup(tp, pp, seed=4, **MTP,
                                         untie_embeddings_and_output_weights=True)
    load_checkpoint(path, models, optimizer, scheduler)
    return _next_step(models, optimizer, scheduler)


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 1, 2)], ids=["one-rank", "PP2"])
def test_a_checkpoint_loads_at_other_layouts(tmp_path, world, tp, pp):
    """Saved at TP 2 x PP 2, where the last stage's embedding copy is not written; loaded
    at one rank and at PP 2: the next step's loss and the weights after it are the saving
    run's."""
    whole = assemble(run_distributed(1, _initial_weights,
                                     untie_embeddings_and_output_weights=True))
    path = str(tmp_path / "save")
    saved = run_distributed(4, _save, path, whole)
    loaded = run_distributed(world, _load, path, tp, pp)
    assert_rel_close(torch.tensor(loaded[0]["step"]), torch.tensor(saved[0]["step"]),
                     rtol=1e-6, what="the next step's loss")
    got, want = (assemble([r["weights"] for r in runs]) for runs in (loaded, saved))
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], rtol=1e-5, what=name)


def _config(**overrides) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                             vocab_size=VOCAB, seq_length=S, **{**MTP, **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"mtp_num_layers": 0}, "mtp_num_layers=0 must be a positive integer"),
    ({"mtp_loss_scaling_factor": -1.0}, "mtp_loss_scaling_factor=-1.0 must be >= 0"),
    ({"context_parallel_size": 2}, "mtp_num_layers=2 needs context_parallel_size=1, not 2"),
    ({"pipeline_model_parallel_size": 2, "position_embedding_type": "learned_absolute"},
     "needs position_embedding_type 'rope' or 'none': the last stage keeps a copy of the word "
     "embedding only"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_megatron_flags_set_the_fields():
    from test_config import TINY

    from mp.config import parse_args
    cfg = parse_args(["--config", TINY, "--mtp-num-layers", "2", "--mtp-loss-scaling-factor",
                      "0.3", "--position-embedding-type", "rope"], world_size=4).model
    assert (cfg.mtp_num_layers, cfg.mtp_loss_scaling_factor) == (2, 0.3)


def test_the_job_refuses_the_per_token_loss_with_auxiliary_losses():
    from test_config import TINY

    from mp.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"calculate_per_token_loss=true is not supported "
                                          r"with auxiliary losses \(mtp_1 loss; from"):
        load_config(TINY, ["--mtp-num-layers", "1", "--position-embedding-type", "rope",
                           "--calculate-per-token-loss"], world_size=4)
