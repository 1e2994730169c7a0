"""The global batch size as training proceeds: constant, or ramped up (Megatron-LM's
``--rampup-batch-size START INCREMENT SAMPLES``, its ``num_microbatches_calculator``).

GPT-3 (Brown et al. 2020, section 2.3 and appendix B) grew its batch linearly from 32k tokens
to the full size over the first billions of tokens. With a ramp ``(start, increment,
samples)`` the batch is ``start`` at the beginning and grows by ``increment`` every
``samples / n`` consumed samples, where ``n = (global_batch_size - start) / increment`` is the
number of increments, until it reaches ``global_batch_size`` once ``samples`` have been
consumed::

    batch(c) = min(global_batch_size, start + increment * floor(c * n / samples))

The samples are the same ones in the same order whatever the batch sizes: the data sampler
deals them in dataset order in steps of ``micro_batch_size x DP``, and an iteration of batch
``B`` takes ``B / (micro_batch_size x DP)`` of those steps.

Unlike Megatron's calculator, the step count is computed in integers (Megatron divides by a
float ``samples / n``, which can move a boundary by one sample), the object holds no global
state (ask it with the consumed-sample count), and every batch size of the ramp is checked
before training starts (Megatron checks each when it is reached).
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.config.coerce import ConfigError


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch size and micro-batches per data-parallel rank at any consumed-sample
    count; ``rampup = (start, increment, samples)`` or None for a constant batch.

    Construction checks the rules (ConfigError naming the value): ``start`` below
    ``global_batch_size``, the difference a multiple of ``increment``, ``samples >= 1``, and
    every batch size of the ramp divisible by ``micro_batch_size x data_parallel_size``.
    """

    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    rampup: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.rampup is not None:
            self._check_rampup(*self.rampup)
        step = self.micro_batch_size * self.data_parallel_size
        for batch in self.batch_sizes():
            if batch % step:
                where = "training.global_batch_size" if batch == self.global_batch_size else \
                    f"a step of training.rampup_batch_size={list(self.rampup)}"
                raise ConfigError(
                    f"global batch size {batch} ({where}) is not divisible by training."
                    f"micro_batch_size x data_parallel_size = {self.micro_batch_size} x "
                    f"{self.data_parallel_size} = {step}")

    def _check_rampup(self, start: int, increment: int, samples: int) -> None:
        if not 1 <= start < self.global_batch_size:
            raise ConfigError(f"training.rampup_batch_size start={start} must lie in 1.."
                              f"{self.global_batch_size - 1} (below training.global_batch_size="
                              f"{self.global_batch_size}; equal to it is no ramp: drop the key)")
        if increment < 1 or (self.global_batch_size - start) % increment:
            raise ConfigError(
                f"training.rampup_batch_size increment={increment} must be >= 1 and divide "
                f"training.global_batch_size - start = {self.global_batch_size} - {start} = "
                f"{self.global_batch_size - start}")
        if samples < 1:
            raise ConfigError(f"training.rampup_batch_size samples={samples} must be >= 1")

    def batch_sizes(self) -> list[int]:
        """Every global batch size the run goes through, smallest first."""
        if self.rampup is None:
            return [self.global_batch_size]
        start, increment, _ = self.rampup
        return list(range(start, self.global_batch_size, increment)) + [self.global_batch_size]

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """The batch of the iteration that starts after ``consumed_samples`` samples."""
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        increments = (self.global_batch_size - start) // increment
        done = consumed_samples * increments // samples
        return min(self.global_batch_size, start + increment * done)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches per data-parallel rank in the iteration after ``consumed_samples``."""
        step = self.micro_batch_size * self.data_parallel_size
        return self.global_batch_size_at(consumed_samples) // step

    def iterations(self, train_samples: int) -> int:
        """The iterations of a run of ``train_samples``: as many as fit whole, each taking
        the batch of its start (Megatron's ``update_train_iters``). Counted a batch size at a
        time, so the cost grows with the ramp's increments, not its iterations."""
        consumed = iterations = 0
        while True:
            batch = self.global_batch_size_at(consumed)
            fit = (train_samples - consumed) // batch
            if consumed >= self.ramp_samples:
                return iterations + fit
            start, increment, samples = self.rampup
            increments = (self.global_batch_size - start) // increment
            done = (batch - start) // increment
            ends = -(-(done + 1) * samples // increments)  # first count with a larger batch
            at_this_batch = -(-(ends - consumed) // batch)
            if fit < at_this_batch:
                return iterations + fit
            iterations += at_this_batch
            consumed += at_this_batch * batch

    @property
    def ramp_samples(self) -> int:
        """The consumed-sample count from which the batch is ``global_batch_size``."""
        return 0 if self.rampup is None else self.rampup[2]
