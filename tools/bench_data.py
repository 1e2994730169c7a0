"""Data pipeline benchmarks: preprocessing throughput, index building, random sample reads.

    python tools/bench_data.py [--workers 1 2] [--seq-length 2048] [--skip-bpe]

Prints one table row per measurement:

- preprocessing the embedded corpus (``mp.data.corpus``: the standard library's source, one
  document per file) with the byte-level tokenizer, and with a GPT-2-style BPE of 8192 ids that
  is first trained on part of the same corpus (``tokenizers``), for each worker count; this is
  the engine of ``tools/preprocess_data.py``, timed from the first read to the renamed output;
- building the document / sample / shuffle indices for millions of samples of ``seq_length``
  over synthetic document lengths;
- reading random samples of ``seq_length`` through the mmap: a raw ``IndexedDataset.get``, a full
  ``GPTDataset`` item, the same with its documents kept apart (``--reset-position-ids
  --reset-attention-mask``: positions and segment ids), and a DataLoader of micro-batches of 8;
- supervised fine-tuning samples (``--sft``): random `SFTDataset` items of ``seq_length`` from
  the embedded conversations in the chatml format (read, tokenized and packed);
- the step's packed documents from a micro-batch of 8 such samples' segment ids
  (`mp.model.packed_documents.PackedDocuments`, made on the host in
  `mp.training.gpt_step.get_batch`).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from mp.data.conversation_corpus import prepare_default_conversations
from mp.data.conversations import ConversationFile
from mp.data.corpus import stdlib_source_files, tokenize_corpus
from mp.data.document_masks import DocumentMasked
from mp.data.gpt_dataset import GPTDataset, build_indices
from mp.data.indexed_dataset import IndexedDataset
from mp.data.prompt_formats import get_prompt_format
from mp.data.samplers import build_pretraining_data_loader
from mp.data.sft_dataset import SFTDataset
from mp.data.tokenizer import ByteLevelTokenizer, GPT2BPETokenizer
from mp.model.packed_documents import PackedDocuments


def row(what: str, amount: str, seconds: float, rate: str) -> None:
    print(f"| {what} | {amount} | {seconds:.3f} | {rate} |", flush=True)


def bench_preprocess(files: list[str], tokenizer, name: str, workers: list[int], out: str) -> str:
    """Rows with tokens/s of wall time, and the CPU seconds of the run (this process and its
    finished workers), which other jobs on the machine do not inflate."""
    prefix = ""
    for w in workers:
        cpu = _cpu_seconds()
        stats = tokenize_corpus(files, os.path.join(out, f"{name}-w{w}"), tokenizer, w)
        cpu = _cpu_seconds() - cpu
        prefix = stats.outputs["text"]
        row(
            f"preprocess corpus, {name}, {w} worker(s)",
            f"{stats.documents} docs, {stats.tokens:,} tokens, {stats.bytes_read / 1e6:.1f} MB",
            stats.seconds,
            f"{stats.tokens_per_second:,.0f} tokens/s ({cpu:.2f} CPU s)",
        )
    return prefix


def _cpu_seconds() -> float:
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_bpe(files: list[str], out: str) -> GPT2BPETokenizer:
    """A GPT-2-style byte-level BPE (8192 ids) trained on the first 2 MB of the corpus."""
    from tokenizers import ByteLevelBPETokenizer

    text, size = [], 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            text.append(f.read())
        size += len(text[-1])
        if size > 2_000_000:
            break
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        text, vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False
    )
    trainer.save_model(out)
    return GPT2BPETokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))


def bench_index_build(seq_length: int, num_samples: int, num_documents: int) -> None:
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(6.0, 1.0, num_documents), 100_000).astype(np.int32) + 1
    start = time.perf_counter()
    _, sample_index, _ = build_indices(
        lengths, np.arange(num_documents), num_samples, seq_length, 1
    )
    seconds = time.perf_counter() - start
    samples = sample_index.shape[0] - 1
    row(
        f"build indices, seq_length {seq_length}",
        f"{num_documents:,} docs, {int(lengths.sum()):,} tokens, {samples:,} samples",
        seconds,
        f"{samples / seconds:,.0f} samples/s",
    )


def bench_reads(prefix: str, seq_length: int, reads: int, cache: str) -> None:
    ds = IndexedDataset(prefix)
    rng = np.random.default_rng(0)
    long_enough = np.flatnonzero(ds.sequence_lengths > seq_length)
    picks = rng.choice(long_enough, reads)
    start = time.perf_counter()
    for i in picks:
        ds.get(int(i), 0, seq_length + 1)
    seconds = time.perf_counter() - start
    row(
        f"IndexedDataset.get of {seq_length + 1} tokens, random",
        f"{reads:,} reads",
        seconds,
        f"{reads / seconds:,.0f} samples/s ({1e6 * seconds / reads:.1f} us)",
    )

    gpt = GPTDataset(ds, np.arange(len(ds)), 10 * reads, seq_length, 1, path_to_cache=cache)
    picks = rng.integers(0, len(gpt), reads)
    _time_items(gpt, picks, f"GPTDataset item, seq_length {seq_length}, random",
                f"of {len(gpt):,}")

    masked = DocumentMasked(gpt, ByteLevelTokenizer().eod, True, True)
    _time_items(masked, picks[:reads // 10], f"GPTDataset item with document segments, "
                f"seq_length {seq_length}, random", f"of {len(gpt):,}")

    loader = build_pretraining_data_loader(gpt, 0, 8, 0, 1)
    batches = min(len(loader), reads // 8)
    start = time.perf_counter()
    for _, _ in zip(range(batches), loader):
        pass
    seconds = time.perf_counter() - start
    row(
        f"DataLoader micro-batches of 8 x {seq_length}",
        f"{batches:,} batches",
        seconds,
        f"{8 * batches / seconds:,.0f} samples/s",
    )


def bench_sft(seq_length: int, reads: int, out: str) -> None:
    conversations = ConversationFile(prepare_default_conversations(out))
    dataset = SFTDataset(conversations, np.arange(len(conversations)), 10 * reads, seq_length,
                         ByteLevelTokenizer(), get_prompt_format("chatml"), 1)
    picks = np.random.default_rng(1).integers(0, len(dataset), reads)
    _time_items(dataset, picks, f"SFTDataset item (chatml), seq_length {seq_length}, random",
                f"of {len(conversations):,} conversations")
    segments = torch.stack([dataset[int(i)]["segment_ids"] for i in picks[:8]])
    start = time.perf_counter()
    for _ in range(10):
        PackedDocuments(segments)
    seconds = (time.perf_counter() - start) / 10
    row(f"PackedDocuments of 8 x {seq_length} segment ids", "1 micro-batch", seconds,
        f"{8 / seconds:,.0f} samples/s")


def _time_items(dataset, picks: np.ndarray, what: str, of: str) -> None:
    start = time.perf_counter()
    for i in picks:
        dataset[int(i)]
    seconds = time.perf_counter() - start
    row(what, f"{len(picks):,} samples {of}", seconds,
        f"{len(picks) / seconds:,.0f} samples/s ({1e6 * seconds / len(picks):.1f} us)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--index-samples", type=int, default=5_000_000)
    parser.add_argument("--index-documents", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--skip-bpe", action="store_true", help="no BPE preprocessing rows")
    args = parser.parse_args(argv)
    files = stdlib_source_files()
    print(f"{os.cpu_count()} CPUs, 1-minute load average at start {os.getloadavg()[0]:.2f}\n")
    print("| measurement | amount | seconds | rate |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as out:
        prefix = bench_preprocess(files, ByteLevelTokenizer(), "byte-level", args.workers, out)
        if not args.skip_bpe:
            bench_preprocess(files, train_bpe(files, out), "BPE-8192", args.workers, out)
        bench_index_build(args.seq_length, args.index_samples, args.index_documents)
        bench_reads(prefix, args.seq_length, args.reads, os.path.join(out, "cache"))
        bench_sft(args.seq_length, args.reads // 10, out)


if __name__ == "__main__":
    main()
