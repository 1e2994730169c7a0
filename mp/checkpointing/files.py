"""A save directory on disk: names, the commit protocol, integrity, rotation.

::

    <save>/latest_checkpointed_iteration.txt   the newest committed iteration, e.g. "40"
    <save>/iter_0000040/                       a committed checkpoint
        .metadata, __<rank>_0.distcp           DCP's index and each rank's data file
        meta.json                              iteration, samples, schedule, scaler, layout, config
        manifest.json                          byte count and SHA-256 of every other file
    <save>/iter_0000060.tmp/                   a save in progress, or one that crashed

Commit protocol: every rank writes into ``iter_N.tmp``; when all have finished (a barrier),
rank 0 writes the manifest, renames the directory to ``iter_N`` and then replaces the pointer
file atomically (write a temporary file, fsync, ``os.replace``). The pointer is the commit: a
crash at any earlier point leaves it naming the previous checkpoint, which is untouched. Any
``*.tmp`` directory is garbage and is removed after the next commit. The names are
Megatron-LM's (``iter_%07d``, ``latest_checkpointed_iteration.txt``), so its tools and habits
(editing the pointer to roll back) carry over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mp.checkpointing.errors import CheckpointError, CorruptCheckpointError

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "manifest.json"
META_FILE = "meta.json"
TMP_SUFFIX = ".tmp"
_CHECKPOINT_DIR = re.compile(r"iter_(\d{7,})")
_HASH_BLOCK = 4 * 2**20


def checkpoint_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def staging_dir(save_dir: str | Path, iteration: int) -> Path:
    """Where the checkpoint of ``iteration`` is written before it is committed."""
    final = checkpoint_dir(save_dir, iteration)
    return final.with_name(final.name + TMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """Readers see the old content or ``text``, never a part of it, even across a crash."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_latest(save_dir: str | Path) -> int | None:
    """The iteration the pointer file names; None when there is no pointer."""
    path = Path(save_dir) / LATEST_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number; it holds {text[:40]!r}")
    return int(text)


def resolve_checkpoint(path: str | Path, iteration: int | None = None) -> Path:
    """``path`` itself when it is a committed checkpoint, else the checkpoint that the pointer
    file of save directory ``path`` names, or with ``iteration`` (Megatron's
    ``--ckpt-step``) that iteration's."""
    path = Path(path)
    if iteration is not None:
        return _iteration_checkpoint(path, iteration)
    if (path / MANIFEST_FILE).is_file():
        return path
    if path.name.endswith(TMP_SUFFIX):
        raise CheckpointError(f"{path} is a save that did not finish (no {MANIFEST_FILE}); "
                              "load its save directory to get the newest complete checkpoint")
    iteration = read_latest(path)
    if iteration is None:
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
        raise CheckpointError(f"no checkpoint at {path}: it has neither {MANIFEST_FILE} "
                              f"(a checkpoint) nor {LATEST_FILE} (a save directory)")
    directory = checkpoint_dir(path, iteration)
    if not (directory / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{path / LATEST_FILE} names iteration {iteration}, but "
                              f"{directory} is missing or has no {MANIFEST_FILE}")
    return directory


def _iteration_checkpoint(save_dir: Path, iteration: int) -> Path:
    """Save directory ``save_dir``'s committed checkpoint of ``iteration``."""
    if (save_dir / MANIFEST_FILE).is_file():
        raise CheckpointError(f"ckpt_step={iteration} picks an iteration of a save directory; "
                              f"{save_dir} is a checkpoint itself")
    directory = checkpoint_dir(save_dir, iteration)
    if not (directory / MANIFEST_FILE).is_file():
        held = committed_iterations(save_dir) if save_dir.is_dir() else []
        raise CheckpointError(f"ckpt_step={iteration}: {directory} is missing or has no "
                              f"{MANIFEST_FILE}; {save_dir} holds "
                              + (f"iterations {', '.join(map(str, held))}" if held
                                 else "no complete checkpoint"))
    return directory


def find_checkpoint(path: str | Path, iteration: int | None = None) -> Path | None:
    """Like `resolve_checkpoint`, but None when ``path`` holds no checkpoint at all (neither
    a manifest nor a pointer file): a save directory before its first save (with
    ``iteration``, that iteration must be there)."""
    path = Path(path)
    if iteration is None and not (path / MANIFEST_FILE).is_file() \
            and not (path / LATEST_FILE).is_file():
        return None
    return resolve_checkpoint(path, iteration)


# --- integrity ----------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def content_files(directory: Path) -> list[str]:
    """The files the manifest covers: every regular file but the manifest, sorted."""
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.is_file() and entry.name != MANIFEST_FILE)


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes": size, "sha256": hex}}`` of files in ``directory``."""
    return {name: {"bytes": (directory / name).stat().st_size,
                   "sha256": _sha256(directory / name)} for name in names}


def _entries_digest(files: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, files: dict[str, dict]) -> None:
    body = {"files": files, "digest": _entries_digest(files)}
    write_text_atomically(directory / MANIFEST_FILE, json.dumps(body, indent=1, sort_keys=True))


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's ``{name: {"bytes", "sha256"}}``, checked against its own digest."""
    path = directory / MANIFEST_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        files, digest = body["files"], body["digest"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"{path} is unreadable: {error}") from error
    if _entries_digest(files) != digest:
        raise CorruptCheckpointError(f"{path} is damaged: its entries do not match its digest")
    return files


def check_files(directory: Path, manifest: dict[str, dict], names: list[str]) -> list[str]:
    """What is wrong with files ``names`` of ``directory`` against the manifest (empty when
    all are intact), one line per bad file, each naming it."""
    problems = []
    for name in names:
        path, expected = directory / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{path} has {size} bytes; the manifest recorded "
                            f"{expected['bytes']} (truncated or overwritten)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{path} does not match its SHA-256 in the manifest (corrupted)")
    return problems


# --- commit and rotation -------------------------------------------------------------------

def _discard(directory: Path) -> None:
    """Remove a directory so that a crash half-way leaves only ``*.tmp`` garbage."""
    doomed = directory.with_name(directory.name + ".discarded" + TMP_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def commit(save_dir: Path, iteration: int) -> None:
    """Rename the finished staging directory into place, then move the pointer to it. A
    directory already there (from a run the pointer was rolled back from) is replaced."""
    final = checkpoint_dir(save_dir, iteration)
    if final.exists():
        _discard(final)
    os.rename(staging_dir(save_dir, iteration), final)
    fsync_dir(save_dir)
    write_text_atomically(save_dir / LATEST_FILE, f"{iteration}\n")


def committed_iterations(save_dir: Path) -> list[int]:
    """Iterations of the committed checkpoints in ``save_dir``, ascending."""
    found = []
    for entry in save_dir.iterdir():
        match = _CHECKPOINT_DIR.fullmatch(entry.name)
        if match and (entry / MANIFEST_FILE).is_file():
            found.append(int(match[1]))
    return sorted(found)


@dataclass(frozen=True)
class Retention:
    """Which committed checkpoints a save directory keeps: the newest ``keep_last`` (every one
    when None) and, with ``retain_interval`` (Megatron's ``--save-retain-interval``), those of
    the iterations it divides, the others going as soon as a newer one is committed."""

    keep_last: int | None = None
    retain_interval: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "retain_interval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")

    def stale(self, iterations: list[int]) -> list[int]:
        """The checkpoints of ``iterations`` (ascending, the newest last) to delete."""
        recent = self.keep_last or (1 if self.retain_interval else len(iterations))
        return [i for i in iterations[:-recent]
                if self.retain_interval is None or i % self.retain_interval]


def remove_stale(save_dir: Path, newest: int, retention: Retention) -> None:
    """After committing ``newest``: delete unfinished saves (``*.tmp``) and the checkpoints up
    to ``newest`` that ``retention`` does not keep. Checkpoints after ``newest`` (left by a run
    the pointer was rolled back from) are not touched."""
    for entry in save_dir.iterdir():
        if entry.is_dir() and entry.name.endswith(TMP_SUFFIX):
            shutil.rmtree(entry, ignore_errors=True)
    older = [i for i in committed_iterations(save_dir) if i <= newest]
    for iteration in retention.stale(older):
        _discard(checkpoint_dir(save_dir, iteration))
