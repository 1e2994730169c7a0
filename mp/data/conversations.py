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
checks every line the first time a file is opened, so a bad line fails the run at its start
with the file, the line number and the rule, not hours later; it keeps only each line's byte
range and reads a line again when its sample is asked for. The byte ranges are cached on disk
(`mp.data.cache`: one rank builds, the others wait), named by the file's path, size and
modification time, so a restarted job opens a checked file without reading it again. Megatron
loads the file with the ``datasets`` library; this needs nothing beyond the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch.distributed as dist

from mp.data.cache import build_once, save_array
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


def line_ranges(path: str) -> np.ndarray:
    """Every line of the file at ``path`` read and checked (module doc): the byte ranges
    ``[lines, 2]`` (int64, start and end) of its non-blank lines. ValueError naming the file,
    the line and the rule."""
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
    return np.array(ranges, dtype=np.int64)


def cache_file(path: str, path_to_cache: str | None) -> str:
    """Where the byte ranges of the file at ``path`` are cached: under ``path_to_cache``
    (default ``cache/ConversationFile_lines`` beside the file), named by the md5 of its
    absolute path, size and modification time."""
    path = os.path.abspath(path)
    if path_to_cache is None:
        path_to_cache = os.path.join(os.path.dirname(path), "cache", "ConversationFile_lines")
    stat = os.stat(path)
    description = json.dumps({"class": "ConversationFile", "path": path,
                              "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    digest = hashlib.md5(description.encode()).hexdigest()
    return os.path.join(path_to_cache, f"{digest}-{os.path.basename(path)}-lines.npy")


class ConversationFile:
    """A JSON Lines file of conversations (module doc); ``file[i]`` is line ``i``'s messages
    (blank lines skipped), ``len(file)`` the number of lines.

    ``path_to_cache``: where the line index is cached (`cache_file`); a directory that cannot
    be written leaves every rank reading the file itself, with a notice (from the group's
    first rank). ``group``: the
    build-once collective's (default: the world); every rank of it must open the file.
    ``read_anew``: whether this rank read and checked the lines."""

    def __init__(self, path: str, path_to_cache: str | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"conversation file {path!r} does not exist")
        self.path = path
        cache = cache_file(path, path_to_cache)
        read: list[np.ndarray] = []

        def build() -> None:
            read.append(line_ranges(path))
            try:
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                save_array(cache, read[0])
            except OSError as error:
                if not dist.is_initialized() or dist.get_rank(group) == 0:  # said once
                    print(f"mp.data: cannot cache the line index of {path} in "
                          f"{os.path.dirname(cache)} ({error}); each rank reads the file "
                          "itself. --data-cache-path names a writable directory", flush=True)

        build_once(lambda: os.path.isfile(cache), build, f"the line index {cache}", group)
        self.read_anew = bool(read)
        self._ranges = read[0] if read else np.load(cache)
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
