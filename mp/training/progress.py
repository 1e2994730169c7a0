"""A one-line progress bar for a person at a terminal (tqdm's look, no tqdm dependency)::

     45%|█████████████                 | 135/300 [01:02<01:16, 2.17 it/s] lm loss 3.2104
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class ProgressBar:
    """Redraws one line in place (``\\r``) as ``update`` is called with the current count;
    at most every ``min_interval`` seconds, except for the last step. Call ``clear`` before
    printing anything else on the same stream, and ``close`` at the end."""

    def __init__(self, total: int, initial: int = 0, stream: TextIO | None = None,
                 width: int = 30, min_interval: float = 0.1):
        self.total, self.initial = total, initial
        self.stream = sys.stdout if stream is None else stream
        self.width, self.min_interval = width, min_interval
        self.fill = "█" if "utf" in (getattr(self.stream, "encoding", None) or "").lower() \
            else "#"
        self.start = time.perf_counter()
        self.count, self.postfix, self._drawn_at, self._visible = initial, "", 0.0, False

    def update(self, count: int, postfix: str = "") -> None:
        self.count, self.postfix = count, postfix
        now = time.perf_counter()
        if count >= self.total or now - self._drawn_at >= self.min_interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = min(self.count / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * self.width)
        bar = self.fill * filled + " " * (self.width - filled)
        elapsed = now - self.start
        done = self.count - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.count) / rate) if rate > 0 else "?"
        line = (f"{100 * fraction:3.0f}%|{bar}| {self.count}/{self.total} "
                f"[{_clock(elapsed)}<{eta}, {rate:.2f} it/s] {self.postfix}")
        self.stream.write("\r" + line.rstrip() + "\033[K")
        self.stream.flush()
        self._drawn_at, self._visible = now, True

    def clear(self) -> None:
        """Erase the bar (it comes back on the next ``update``)."""
        if self._visible:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._visible = False

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._draw(time.perf_counter())
        self.stream.write("\n")
        self.stream.flush()
        self._visible = False
