"""The training, validation and test data iterators of a job (Megatron's
``build_train_valid_test_data_iterators``).

``data.data_path: [builtin]`` is the embedded corpus, tokenized once (by one rank, the others
waiting) into ``data.data_cache_path`` or ``~/.cache/mp``; ``data.train_data_path``,
``valid_data_path`` and ``test_data_path`` give each split its own datasets instead;
``data.mock_data`` reads random tokens instead (`mp.data.mock`), no tokenizer or file needed,
each split built where ``data.split`` gives it a share (all where it is unset).
``data.reset_position_ids`` and ``data.reset_attention_mask`` keep a sample's documents apart
(`mp.data.document_masks`). ``data.sft`` reads conversation files instead
(`mp.data.sft_dataset`; ``builtin``: the conversations of `mp.data.conversation_corpus`).
Sample counts follow Megatron: ``train_samples``, or ``train_iters x global_batch_size``,
training samples; for validation, ``eval_iters x global_batch_size`` for each evaluation the
run will do (every ``eval_interval`` iterations and one at the end); for the test, one
evaluation's. Each data-parallel rank reads its own micro-batches (the tensor-parallel ranks
of a replica read the same ones), training from ``consumed_train_samples``, validation and
test from the start, in ``data.dataloader_type``'s order (`mp.data.samplers`).

``data.full_validation`` (Megatron's ``--full-validation``): the validation split is built as
one epoch (every full window of its documents once, `mp.data.gpt_dataset`) and read in dataset
order; its iterator is a `ValidationPass`, which each evaluation restarts and reads through
once: every micro-batch of ``micro_batch_size x data_parallel_size`` samples of the split, the
last incomplete one left out (Megatron's sampler drops it too). Megatron instead sets
``eval_iters`` to the sampler's length, which counts samples, not global batches, and cycles
through the split many times over. ``data.multiple_validation_sets`` (Megatron's
``--multiple-validation-sets``): the validation iterator is a `ValidationSets`, one iterator per
``valid_data_path`` dataset, each sized like the single validation split would be. Megatron
requires ``--full-validation`` with it (its resumed runs would need a consumed-sample count per
set); mp's validation iterators start from the first sample in every run, so it needs none.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.config import BUILTIN_DATA_PATH, JobConfig
from mp.data.conversation_corpus import prepare_default_conversations
from mp.data.corpus import prepare_default_corpus
from mp.data.dataset_builder import build_gpt_datasets, build_sft_datasets, parse_split
from mp.data.document_masks import DocumentMasked
from mp.data.mock import MockGPTDataset
from mp.data.prompt_formats import get_prompt_format
from mp.data.samplers import build_pretraining_data_loader
from mp.data.tokenizer import build_tokenizer


class ValidationPass:
    """An iterator over ``loader``'s micro-batches that `restart` sends back to the first:
    one pass is one full validation (``data.full_validation``). ``num_microbatches`` is this
    rank's micro-batches in a pass (``len(loader)``, the same on every rank)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.num_microbatches = loader, len(loader)
        self._iterator = iter(loader)

    def restart(self) -> None:
        self._iterator = iter(self.loader)

    def __iter__(self) -> ValidationPass:
        return self

    def __next__(self) -> dict:
        return next(self._iterator)


class ValidationSets(list):
    """The validation iterators of ``data.multiple_validation_sets``, one per
    ``data.valid_data_path`` dataset, in order (Megatron's list of validation iterators)."""


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/mp``, else ``~/.cache/mp``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mp")


def num_evaluations(cfg: JobConfig, world_size: int) -> int:
    """Evaluations in a whole run: one every ``eval_interval`` iterations and one at the end
    (unless the last periodic one falls on the last iteration)."""
    tr = cfg.training
    if not tr.eval_iters:
        return 0
    iterations = cfg.train_iterations(world_size)
    periodic = iterations // tr.eval_interval if tr.eval_interval else 0
    ends_on_one = bool(tr.eval_interval) and iterations % tr.eval_interval == 0
    return periodic + (0 if ends_on_one else 1)


def _corpus_datasets(cfg: JobConfig, samples: tuple[int, int, int]):
    """The training, validation and test datasets of ``samples`` samples each from
    ``data.data_path`` (the embedded corpus tokenized first when it is ``builtin``, or its
    conversations written with ``data.sft``) or from the per-split paths, and the
    end-of-document id."""
    data, tr = cfg.data, cfg.training
    tokenizer = build_tokenizer(data.tokenizer_type, vocab_file=data.vocab_file,
                                merge_file=data.merge_file, tokenizer_model=data.tokenizer_model,
                                eod_token=data.eod_token, vocab_size=data.vocab_size)
    if tokenizer.vocab_size > cfg.model.padded_vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size} tokens) does not "
                         f"fit model.vocab_size={cfg.model.vocab_size} (padded to "
                         f"{cfg.model.padded_vocab_size})")
    data_path, cache = data.data_path, data.data_cache_path or default_cache_dir()
    if data.sft:
        if data_path == [BUILTIN_DATA_PATH]:
            data_path = [prepare_default_conversations(cache)]
        return build_sft_datasets(
            data_path, data.split, cfg.model.seq_length, tr.seed, *samples,
            tokenizer=tokenizer, prompt_format=get_prompt_format(data.sft_tokenizer_prompt_format),
            per_split_data_path=data.per_split_data_path,
            multiple_validation_sets=data.multiple_validation_sets,
            path_to_cache=data.data_cache_path), tokenizer.eod
    if data_path == [BUILTIN_DATA_PATH]:
        data_path = [prepare_default_corpus(os.path.join(cache, "corpus"), tokenizer)]
    datasets = build_gpt_datasets(
        data_path, data.split, cfg.model.seq_length, tr.seed, *samples,
        per_split_data_path=data.per_split_data_path, eod=tokenizer.eod,
        eod_mask_loss=data.eod_mask_loss, path_to_cache=data.data_cache_path,
        mmap_bin_files=data.mmap_bin_files,
        multiple_validation_sets=data.multiple_validation_sets)
    return datasets, tokenizer.eod


def build_data_iterators(cfg: JobConfig, consumed_train_samples: int = 0
                         ) -> tuple[Iterator[dict], Iterator[dict] | None, Iterator[dict] | None]:
    """``(train, valid, test)`` iterators of micro-batch dicts
    (`mp.data.gpt_dataset.GPTDataset`'s items stacked to ``[micro_batch_size, seq_length]``);
    ``valid`` and ``test`` are None when the split or the run (``eval_iters`` 0) has none.
    ``valid`` is a `ValidationPass` with ``data.full_validation`` and a `ValidationSets` of
    them (or of plain iterators) with ``data.multiple_validation_sets``.
    Collective: every rank must call it."""
    data, tr = cfg.data, cfg.training
    batch, world = tr.global_batch_size, dist.get_world_size()
    valid_samples = None if data.full_validation else \
        num_evaluations(cfg, world) * tr.eval_iters * batch
    samples = (tr.train_samples if tr.counts_samples else tr.train_iters * batch,
               valid_samples, tr.eval_iters * batch)
    if data.mock_data:
        shares = (1.0,) * 3 if data.split is None else parse_split(data.split)
        datasets = [MockGPTDataset(n, cfg.model.seq_length, cfg.model.vocab_size, tr.seed + i)
                    if n and share else None
                    for i, (n, share) in enumerate(zip(samples, shares))]
    else:
        datasets, eod = _corpus_datasets(cfg, samples)
        if data.reset_position_ids or data.reset_attention_mask:
            def masked(ds):
                return None if ds is None else DocumentMasked(
                    ds, eod, data.reset_position_ids, data.reset_attention_mask)
            datasets = [[masked(d) for d in ds] if isinstance(ds, list) else masked(ds)
                        for ds in datasets]
    if datasets[0] is None:
        raise ValueError(f"data.split={data.split!r} leaves no documents for training")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    loaders = [build_pretraining_data_loader(ds, consumed, tr.micro_batch_size, dp_rank,
                                             dp_size, data.num_workers,
                                             dataloader_type=data.dataloader_type,
                                             data_sharding=data.data_sharding)
               for ds, consumed in ((datasets[0], consumed_train_samples), (datasets[2], 0))]
    valid = datasets[1]
    if isinstance(valid, list):
        valid = ValidationSets(_valid_iterator(cfg, d, f"data.valid_data_path {path!r}")
                               for d, path in zip(valid, data.valid_data_path))
    else:
        valid = _valid_iterator(cfg, valid, "the validation split")
    train, test = (None if loader is None else iter(loader) for loader in loaders)
    return train, valid, test


def _valid_iterator(cfg: JobConfig, dataset, what: str) -> Iterator[dict] | None:
    """An iterator over ``dataset``'s micro-batches for validation: from its first sample in
    ``data.dataloader_type``'s order, or with ``data.full_validation`` a `ValidationPass` in
    dataset order (an error when ``dataset`` does not fill one micro-batch on every
    data-parallel rank; ``what`` names it)."""
    if dataset is None:
        return None
    data, tr = cfg.data, cfg.training
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if not data.full_validation:
        return iter(build_pretraining_data_loader(
            dataset, 0, tr.micro_batch_size, dp_rank, dp_size, data.num_workers,
            dataloader_type=data.dataloader_type, data_sharding=data.data_sharding))
    if len(dataset) < tr.micro_batch_size * dp_size:
        raise ValueError(f"data.full_validation: {what} holds {len(dataset)} samples, fewer than "
                         f"one micro-batch on each data-parallel rank (training.micro_batch_size"
                         f" x data_parallel_size = {tr.micro_batch_size} x {dp_size})")
    return ValidationPass(build_pretraining_data_loader(
        dataset, 0, tr.micro_batch_size, dp_rank, dp_size, data.num_workers))
