"""Conversation files for supervised fine-tuning: JSON Lines, one sample per line (Megatron's
``SFTLowLevelDataset``).

Each non-blank line is an object whose ``"messages"`` is a list of ``{"role", "content"}``
messages, roles ``system``, ``user`` and ``assistant``, contents strings (other keys are
ignored)::

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "2 + 2?"},
                  {"role": "assistant", "content": "4"}]}

A line may hold several conversations packed together: each ``system`` message starts a new
one (`split_conversations`, Megatron's rule). Within a conversation an assistant message
follows a user message and is not empty (Megatron's checks). `ConversationFile` reads and
checks every line when it is opened, so a bad line fails the run at its start with the file,
the line number and the rule, not hours later; it keeps only each line's byte range and
reads a line again when its sample is asked for. Megatron loads the file with the
``datasets`` library; this needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mp.data.prompt_formats import ROLES


def split_conversations(messages: list[dict]) -> list[list[dict]]:
    """``messages`` cut before each system message (the conversations of one line)."""
    conversations: list[list[dict]] = []
    for message in messages:
        if message["role"] == "system" or not conversations:
            conversations.append([])
        conversations[-1].append(message)
    return conversations


def check_messages(value, where: str) -> list[dict]:
    """``value`` (a parsed line) checked against the module doc's rules; its messages.
    ValueError naming ``where`` and the rule otherwise."""
    messages = value.get("messages") if isinstance(value, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: expected an object with a non-empty "messages" list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} must be an object with a role among "
                             f"{', '.join(ROLES)} and a string content, not {message!r:.80}")
        if message["role"] != "assistant":
            continue
        if not message["content"]:
            raise ValueError(f"{where}: message {i} is an empty assistant message")
        if i == 0 or messages[i - 1]["role"] != "user":
            raise ValueError(f"{where}: message {i} is an assistant message that does not "
                             "follow a user message")
    return messages


class ConversationFile:
    """A JSON Lines file of conversations (module doc); ``file[i]`` is line ``i``'s messages
    (blank lines skipped), ``len(file)`` the number of lines."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"conversation file {path!r} does not exist")
        self.path = path
        ranges = []
        with open(path, "rb") as file:
            start = 0
            for number, line in enumerate(file, 1):
                if line.strip():
                    check_messages(_parse(line, f"{path}:{number}"), f"{path}:{number}")
                    ranges.append((start, start + len(line)))
                start += len(line)
        if not ranges:
            raise ValueError(f"conversation file {path!r} holds no conversations")
        self._ranges = np.array(ranges, dtype=np.int64)
        self._fd, self._pid = None, None

    @property
    def path_prefix(self) -> str:
        """The file's path (the name `mp.data.dataset_builder` uses in its messages)."""
        return self.path

    def __len__(self) -> int:
        return len(self._ranges)

    def __getitem__(self, index: int) -> list[dict]:
        if self._pid != os.getpid():  # opened in each data-loader worker of its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = self._ranges[index]
        return _parse(os.pread(self._fd, int(end - start), int(start)), self.path)["messages"]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}


def _parse(line: bytes, where: str):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: not a JSON object: {error}") from None
