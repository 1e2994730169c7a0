"""Python's garbage collector at the same iterations on every rank (Megatron's ``--manual-gc``,
``--manual-gc-interval`` and ``--no-manual-gc-eval``).

Left alone, the collector runs whenever allocation counts cross its thresholds, at a different
moment on each rank, and a rank paused in a collection holds up all the others at the next
collective. With ``training.manual_gc`` the run turns automatic collection off
(``gc.disable``) and collects where every rank is at the same point: once at the start, after
every ``manual_gc_interval``-th iteration (0: never), and, with ``manual_gc_eval`` (the
default), fully before each evaluation and the youngest generation after it (what the
evaluation left behind), as Megatron does. Reference cycles are freed only then. When the run
returns or raises, the collector is switched back on if it was on before.
"""

from __future__ import annotations

import gc

from mp.config import TrainingConfig


class ManualGC:
    """The collection points of ``tr`` (all no-ops unless ``tr.manual_gc``); a context manager
    around the run."""

    def __init__(self, tr: TrainingConfig):
        self.on, self.interval = tr.manual_gc, tr.manual_gc_interval
        self.around_eval = tr.manual_gc_eval

    def __enter__(self) -> ManualGC:
        self._was_enabled = gc.isenabled()
        if self.on:
            gc.disable()
            gc.collect()
        return self

    def __exit__(self, *exc) -> None:
        if self.on and self._was_enabled:
            gc.enable()

    def after_iteration(self, iteration: int) -> None:
        """After the ``iteration``-th iteration (counted from 1)."""
        if self.on and self.interval and iteration % self.interval == 0:
            gc.collect()

    def before_evaluation(self) -> None:
        if self.on and self.around_eval:
            gc.collect()

    def after_evaluation(self) -> None:
        if self.on and self.around_eval:
            gc.collect(generation=0)
