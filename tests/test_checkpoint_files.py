"""A checkpoint on disk: damaged files are named and nothing is loaded; a rank killed in the
middle of writing leaves the previous checkpoint as the newest, loadable one; the pointer,
rotation and roll-back follow Megatron's habits; a checkpoint that does not fit the model says
which setting differs; the index is never unpickled beyond DCP's own classes."""

import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from harness import DistributedTestError, run_distributed

from mp import parallel_state as ps
from mp.checkpointing import (
    CheckpointError,
    CorruptCheckpointError,
    load_checkpoint,
    load_global_model,
    read_latest,
    resolve_checkpoint,
    save_checkpoint,
    save_global_model,
)
from mp.checkpointing.files import (
    MANIFEST_FILE,
    META_FILE,
    Retention,
    committed_iterations,
    describe_files,
    write_manifest,
)
from mp.model import GPTModel, TransformerConfig
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer


def _config(tp=1, layers=2, divisible=16, **model) -> TransformerConfig:
    return TransformerConfig(num_layers=layers, hidden_size=32, num_attention_heads=4,
                             vocab_size=200, seq_length=8, make_vocab_size_divisible_by=divisible,
                             tensor_model_parallel_size=tp, **model)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    """Some weights under global names (written from one process, no groups needed)."""
    g = torch.Generator().manual_seed(seed)
    return {"embedding.word_embeddings.weight": torch.randn(208, 32, generator=g),
            "decoder.final_layernorm.weight": torch.randn(32, generator=g)}


DATA = "__0_0.distcp"  # the data file of the one process that wrote it


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda d: _flip_a_byte(d / DATA),
                     lambda d: f"{d / DATA} does not match its SHA-256"),
    "truncated": (lambda d: os.truncate(d / DATA, 100),
                  lambda d: f"{d / DATA} has 100 bytes; the manifest recorded"),
    "deleted": (lambda d: os.remove(d / DATA),
                lambda d: f"{d / DATA} is missing"),
    "meta rewritten": (lambda d: (d / META_FILE).write_text('{"format": "mp-checkpoint"}'),
                       lambda d: f"{d / META_FILE} has 27 bytes; the manifest recorded"),
    "manifest edited": (lambda d: (d / MANIFEST_FILE).write_text(
        (d / MANIFEST_FILE).read_text().replace('"bytes": ', '"bytes": 1', 1)),
        lambda d: f"{d / MANIFEST_FILE} is damaged: its entries do not match its digest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_named_and_nothing_is_loaded(tmp_path, damage):
    path = save_global_model(tmp_path, _config(), _weights(1))
    weights, info = load_global_model(tmp_path)  # intact: loads, and equals what was saved
    assert info.path == path and all(torch.equal(weights[k], v) for k, v in _weights(1).items())
    harm, message = DAMAGE[damage]
    harm(path)
    with pytest.raises(CorruptCheckpointError) as caught:
        load_global_model(tmp_path)
    assert message(path) in str(caught.value)


class _Payload:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_the_index_is_not_unpickled_beyond_dcp_metadata(tmp_path, monkeypatch):
    path = save_global_model(tmp_path, _config(), _weights(1))
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    names = sorted(n for n in os.listdir(path) if n != MANIFEST_FILE)
    write_manifest(path, describe_files(path, names))  # even with a consistent manifest
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"posix\.system is not allowed in checkpoint "
                                              r"metadata"):
        load_global_model(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_where_checkpoints_are_found(tmp_path):
    with pytest.raises(CheckpointError, match="neither manifest.json .a checkpoint. nor "
                                              "latest_checkpointed_iteration.txt"):
        resolve_checkpoint(tmp_path)
    save_global_model(tmp_path, _config(), _weights(1), iteration=7)
    assert resolve_checkpoint(tmp_path) == tmp_path / "iter_0000007"
    assert resolve_checkpoint(tmp_path / "iter_0000007") == tmp_path / "iter_0000007"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("9\n")
    with pytest.raises(CheckpointError, match="names iteration 9, but .*iter_0000009 is "
                                              "missing"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("x")
    with pytest.raises(CheckpointError, match="should hold an iteration number; it holds 'x'"):
        resolve_checkpoint(tmp_path)


# --- on ranks: agreement on damage, a crash in the middle of a save, rotation ------------------

def _gpt(seed: int, tp: int = 2, **config) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(_config(tp, **config))


def _model(seed: int, tp: int = 2, **config) -> GPTModel:
    ps.initialize_model_parallel(tp)
    return _gpt(seed, tp, **config)


def _weights_of(model: GPTModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _save(path: str, iteration: int, seed: int) -> None:
    save_checkpoint(path, iteration, _model(seed))


def _load_and_report(path: str) -> str:
    try:
        load_checkpoint(path, _model(5))
    except CorruptCheckpointError as error:
        return str(error)
    return "loaded"


def test_every_rank_refuses_a_damaged_checkpoint_with_the_same_error(tmp_path):
    run_distributed(2, _save, str(tmp_path), 1, 1)
    directory = tmp_path / "iter_0000001"
    _flip_a_byte(directory / "__1_0.distcp")  # hashed by one rank only
    messages = run_distributed(2, _load_and_report, str(tmp_path))
    assert messages[0] == messages[1]
    assert f"{directory / '__1_0.distcp'} does not match its SHA-256" in messages[0]


def _save_then_die_writing(path: str) -> None:
    model = _model(1)
    save_checkpoint(path, 1, model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    if torch.distributed.get_rank() == 1:  # rank 1 dies half-way through its data file
        def die_writing(obj, file, *args, **kwargs):
            file.write(b"half of a tensor")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = die_writing
    save_checkpoint(path, 2, model)


def _load_after_crash(path: str) -> tuple[int, bool]:
    model = _model(7)
    info = load_checkpoint(path, model)
    expected = _weights_of(_gpt(1))
    same = all(torch.equal(p, expected[n]) for n, p in _weights_of(model).items())
    save_checkpoint(path, 2, model)  # the next save at that iteration goes through
    return info.iteration, same


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_newest(tmp_path):
    with pytest.raises(DistributedTestError, match="process exited with code -9"):
        run_distributed(2, _save_then_die_writing, str(tmp_path), timeout=60)
    assert read_latest(tmp_path) == 1
    unfinished = tmp_path / "iter_0000002.tmp"  # rank 1 had opened its data file; no commit
    assert (unfinished / "__1_0.distcp").is_file() and not (unfinished / MANIFEST_FILE).exists()
    assert not (tmp_path / "iter_0000002").exists()
    results = run_distributed(2, _load_after_crash, str(tmp_path))
    assert results == [(1, True), (1, True)]
    assert read_latest(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002",
                                            "latest_checkpointed_iteration.txt"]


def _save_many(path: str, keep_last: int) -> list[int]:
    model = _model(1)
    for iteration in range(1, 6):
        save_checkpoint(path, iteration, model, keep_last=keep_last)
    if torch.distributed.get_rank() == 0:  # roll back, as with Megatron: edit the pointer
        with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as pointer:
            pointer.write("4\n")
    torch.distributed.barrier()
    with pytest.raises(CheckpointError, match="iteration 4 is already the latest checkpoint"):
        save_checkpoint(path, 4, model)
    save_checkpoint(path, 5, model, keep_last=keep_last)  # replaces the abandoned iteration 5
    return [read_latest(path)]


def test_rotation_keeps_the_last_k_and_roll_back_works(tmp_path):
    assert run_distributed(2, _save_many, str(tmp_path), 2) == [[5], [5]]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000005",
                                            "latest_checkpointed_iteration.txt"]
    meta = json.loads((tmp_path / "iter_0000005" / META_FILE).read_text())
    assert meta["layout"]["tensor_model_parallel_size"] == 2 and meta["iteration"] == 5


def _load_mismatched(path: str, tp: int, layers: int, divisible: int, **model) -> str:
    try:
        load_checkpoint(path, _model(1, tp, layers=layers, divisible=divisible, **model))
    except CheckpointError as error:
        return str(error)
    return "loaded"


@pytest.mark.parametrize("tp,layers,divisible,message", [
    (2, 3, 16, "model.num_layers=2 in the checkpoint but 3 here"),
    (1, 2, 16, ("the checkpoint pads the vocabulary (vocab_size=200) to 224 rows but this "
                "layout pads it to 208 (a multiple of make_vocab_size_divisible_by=16 x "
                "tensor_model_parallel_size=1); model.make_vocab_size_divisible_by=32 pads it "
                "to 224 at tensor_model_parallel_size=1")),
    (1, 2, 32, "loaded"),
])
def test_a_checkpoint_that_does_not_fit_says_which_setting_differs(tmp_path, tp, layers,
                                                                   divisible, message):
    run_distributed(2, _save, str(tmp_path), 1, 1)
    world = 2 if tp == 2 else 1
    results = run_distributed(world, _load_mismatched, str(tmp_path), tp, layers, divisible)
    assert all(message in r for r in results), results[0]


NEWER_FIELDS = ("num_query_groups", "kv_channels", "rotary_percent",
                "layernorm_zero_centered_gamma")


def test_older_checkpoints_hold_the_defaults_of_newer_fields(tmp_path):
    """A checkpoint from before these fields were saved holds the model of their defaults
    (one key/value head per head, heads hidden / heads wide, whole-head RoPE, plain norms)."""
    run_distributed(2, _save, str(tmp_path), 1, 1)
    directory = tmp_path / "iter_0000001"
    meta = json.loads((directory / META_FILE).read_text())
    meta["model"] = {k: v for k, v in meta["model"].items() if k not in NEWER_FIELDS}
    (directory / META_FILE).write_text(json.dumps(meta))
    write_manifest(directory, describe_files(
        directory, sorted(n for n in os.listdir(directory) if n != MANIFEST_FILE)))
    assert run_distributed(1, _load_mismatched, str(tmp_path), 1, 2, 32) == ["loaded"]
    refusal = run_distributed(1, _load_mismatched, str(tmp_path), 1, 2, 32, kv_channels=16,
                              num_query_groups=2, rotary_percent=0.5,
                              layernorm_zero_centered_gamma=True)[0]
    for field, saved, here in (("num_query_groups", 4, 2), ("kv_channels", 8, 16),
                               ("rotary_percent", 1.0, 0.5),
                               ("layernorm_zero_centered_gamma", False, True)):
        assert f"model.{field}={saved} in the checkpoint but {here} here" in refusal


def _with_schedule(seed: int, decay_steps: int):
    model = _model(seed)
    optimizer = get_megatron_optimizer([model], lr=1e-3)
    return model, optimizer, OptimizerParamScheduler(optimizer, max_lr=1e-3,
                                                     lr_decay_steps=decay_steps)


def _save_with_schedule(path: str) -> None:
    save_checkpoint(path, 1, *_with_schedule(1, decay_steps=20))


def _load_other_schedule(path: str) -> tuple[str, bool]:
    model, optimizer, scheduler = _with_schedule(2, decay_steps=30)
    before = _weights_of(model)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, model, optimizer, scheduler)
    untouched = all(torch.equal(p, before[n]) for n, p in _weights_of(model).items())
    return str(caught.value), untouched and scheduler.num_steps == 0


def test_a_changed_schedule_is_named_and_nothing_is_loaded(tmp_path):
    run_distributed(2, _save_with_schedule, str(tmp_path))
    for message, untouched in run_distributed(2, _load_other_schedule, str(tmp_path)):
        assert "learning-rate schedule: lr_decay_steps=30 here but 20 in the checkpoint" \
            in message
        assert untouched


def test_a_deepspeed_save_directory_is_not_mistaken_for_an_empty_one(tmp_path):
    """A plain job pointed at a --deepspeed job's save directory stops with a clear error
    instead of starting over from iteration 0."""
    from mp.checkpointing.job import DEEPSPEED_LATEST, start_point
    from mp.config import parse_args

    (tmp_path / DEEPSPEED_LATEST).write_text("iter_0000002")
    cfg = parse_args(["--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                               "gpt-tiny.yaml"),
                      "--tensor-model-parallel-size", "1", "--load", str(tmp_path)])
    with pytest.raises(CheckpointError, match="holds a DeepSpeed checkpoint"):
        start_point(cfg)


@pytest.mark.parametrize("keep_last, retain, kept", [
    (None, 2, [2, 4, 6, 7]),  # the newest and those 2 divides
    (2, 4, [4, 6, 7]),  # and the newest 2
    (3, None, [5, 6, 7]),
    (None, None, [1, 2, 3, 4, 5, 6, 7]),
])
def test_retention_keeps_the_newest_and_those_the_retain_interval_divides(keep_last, retain,
                                                                          kept):
    iterations = list(range(1, 8))
    stale = Retention(keep_last, retain).stale(iterations)
    assert [i for i in iterations if i not in stale] == kept


def _save_and_retain(path: str) -> list[int]:
    model = _model(1)
    for iteration in range(1, 6):
        save_checkpoint(path, iteration, model, retain_interval=2)
    return committed_iterations(Path(path))


def test_saves_keep_the_retained_checkpoints(tmp_path):
    assert run_distributed(2, _save_and_retain, str(tmp_path)) == [[2, 4, 5]] * 2
    with pytest.raises(ValueError, match="retain_interval=0 must be a positive integer"):
        Retention(retain_interval=0)
