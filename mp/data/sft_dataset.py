"""Supervised fine-tuning samples: the conversations of one line of a conversation file, packed
into one sequence (Megatron's ``SFTDataset``, ``--sft``).

Item ``i`` reads line ``order[i]`` of its `ConversationFile` (``order``: the split's lines,
shuffled with ``numpy.random.RandomState(seed)`` once per epoch for as many epochs as
``num_samples`` needs; Megatron reads them in file order, epoch after epoch). Each
conversation of the line (`split_conversations`) is encoded by the prompt format
(`mp.data.prompt_formats`), ended by the end-of-document id, and appended; the sequence is
cut at ``seq_length + 1`` ids (later conversations dropped, the last one cut short) or padded
up to it with the end-of-document id. Then, like a `GPTDataset` item, each tensor
``[seq_length]``:

- ``tokens`` (int64): ids ``0..s-1``; ``labels`` (int64): ids ``1..s``, the next-token targets;
- ``loss_mask`` (float32): 1 where the label is trained (an assistant's words, module doc of
  `mp.data.prompt_formats`), 0 for context and padding;
- ``position_ids`` (int64): positions restarting at 0 with each conversation;
- ``segment_ids`` (int64): each token's conversation (the padding is a segment of its own),
  from which the training step makes the attention mask (`mp.data.document_masks`): a token
  attends to earlier tokens of its own conversation only.

So conversations packed together do not see each other, as Megatron's ``cu_seqlens`` make
them; here the mask does it, on every attention backend.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from mp.data.conversations import ConversationFile, split_conversations
from mp.data.document_masks import segment_positions
from mp.data.prompt_formats import PromptFormat
from mp.data.tokenizer import Tokenizer


class SFTDataset(Dataset):
    """``num_samples`` samples (None: each of ``lines`` once) of ``seq_length`` tokens from
    the lines ``lines`` of ``conversations`` (module doc)."""

    def __init__(self, conversations: ConversationFile, lines: np.ndarray,
                 num_samples: int | None, seq_length: int, tokenizer: Tokenizer,
                 prompt_format: PromptFormat, seed: int) -> None:
        if len(lines) == 0:
            raise ValueError(f"{conversations.path}: no lines for an SFT dataset")
        self.conversations, self.seq_length = conversations, seq_length
        self.tokenizer, self.prompt_format = tokenizer, prompt_format
        epochs = 1 if num_samples is None else max(1, -(-num_samples // len(lines)))
        rng = np.random.RandomState(seed)
        self.order = np.concatenate([rng.permutation(lines) for _ in range(epochs)])
        self.num_samples = len(lines) if num_samples is None else num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        length = self.seq_length + 1
        ids: list[int] = []
        trained: list[bool] = []
        segments: list[int] = []
        messages = self.conversations[int(self.order[idx])]
        for segment, conversation in enumerate(split_conversations(messages)):
            more, more_trained = self.prompt_format.encode(conversation, self.tokenizer)
            ids += more
            trained += more_trained
            segments += [segment] * len(more)
            if len(ids) >= length:
                break
        padding = max(0, length - len(ids))
        ids += [self.tokenizer.eod] * padding
        trained += [False] * padding
        segments += [segments[-1] + 1] * padding
        tokens = torch.tensor(ids[:length], dtype=torch.int64)
        segment_ids = torch.tensor(segments[:length - 1], dtype=torch.int64)
        return {"tokens": tokens[:-1], "labels": tokens[1:],
                "loss_mask": torch.tensor(trained[1:length], dtype=torch.float32),
                "position_ids": segment_positions(segment_ids), "segment_ids": segment_ids}
