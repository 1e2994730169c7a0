"""The embedded conversations for supervised fine-tuning: made from the standard library.

``data.sft`` with ``data.data_path: [builtin]`` fine-tunes on conversations that every machine
can make without a download, from the files of the embedded corpus (`mp.data.corpus`): for
each function or method with a docstring whose source is at most `MAX_FUNCTION_CHARS`
characters, the user asks for the function by its name, module and the docstring's first
paragraph, and the assistant answers with its source (dedented)::

    user:      Write `dedent` of `textwrap`: Remove any common leading whitespace from every
               line in `text`.
    assistant: def dedent(text):
                   ...

One conversation per line, file by file in corpus order. `prepare_default_conversations`
writes them once (by one rank, the others waiting) to a JSON Lines file named by a fingerprint
of the interpreter and the files, and returns its path.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import textwrap
from collections.abc import Iterator

import torch.distributed as dist

from mp.data.cache import atomic_path, build_once
from mp.data.corpus import DEFAULT_CORPUS_MAX_BYTES, stdlib_source_files

MAX_FUNCTION_CHARS = 1000
_LAYOUT = "v2"  # in the file's fingerprint: bump it when the conversations change


def function_conversations(path: str, module: str) -> Iterator[dict]:
    """The conversations of one source file (module doc), in `ast.walk`'s order: the
    module's own functions first, then those one level deeper (methods), and so on."""
    with open(path, encoding="utf-8", errors="replace") as file:
        source = file.read()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a few library files are templates, not Python
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        docstring = ast.get_docstring(node)
        code = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno])).rstrip()
        if not docstring or len(code) > MAX_FUNCTION_CHARS:
            continue
        summary = " ".join(docstring.split("\n\n")[0].split())
        yield {"messages": [
            {"role": "user", "content": f"Write `{node.name}` of `{module}`: {summary}"},
            {"role": "assistant", "content": code}]}


def prepare_default_conversations(output_dir: str, *,
                                  max_bytes: int = DEFAULT_CORPUS_MAX_BYTES,
                                  group: dist.ProcessGroup | None = None) -> str:
    """Write the embedded conversations into ``output_dir`` unless they are there; return the
    file's path. Collective over ``group`` under ``torch.distributed`` (`build_once`)."""
    files = stdlib_source_files(max_bytes)
    root = sysconfig.get_paths()["stdlib"]
    modules = [os.path.relpath(f, root)[:-len(".py")].replace(os.sep, ".") for f in files]
    digest = hashlib.sha256(f"{sys.version} {MAX_FUNCTION_CHARS} {_LAYOUT}".encode())
    for path, module in zip(files, modules):
        digest.update(f"{module}:{os.path.getsize(path)}\n".encode())
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    target = os.path.join(output_dir,
                          f"stdlib-py{version}-{digest.hexdigest()[:16]}-conversations.jsonl")

    def build() -> None:
        os.makedirs(output_dir, exist_ok=True)
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for path, module in zip(files, modules):
                for conversation in function_conversations(path, module):
                    out.write(json.dumps(conversation, ensure_ascii=False) + "\n")

    build_once(lambda: os.path.isfile(target), build, f"the default conversations {target}",
               group)
    return target
