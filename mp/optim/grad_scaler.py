"""Dynamic loss scaling for fp16 training (Megatron's ``DynamicGradScaler``).

The loss is multiplied by ``scale`` before backward so that small fp16 gradients do not flush
to zero; the optimizer divides the gradients by it again. When a step's gradients hold an inf
or NaN the step is skipped and, after ``hysteresis`` such steps (not necessarily consecutive:
the count is refilled only when the scale grows), the scale is multiplied by
``backoff_factor``, never going below ``min_scale``. After ``growth_interval`` consecutive good
steps it is multiplied by ``growth_factor`` and the hysteresis count is refilled.
`ConstantGradScaler` keeps one scale (Megatron's ``--loss-scale``); steps with an inf or NaN
are still skipped.
"""

from __future__ import annotations


class DynamicGradScaler:
    """The loss scale and its update rule; ``update(found_inf)`` once per optimizer step."""

    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2):
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(f"min_scale={min_scale} must lie in (0, initial_scale="
                             f"{initial_scale}]")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor={growth_factor} must be > 1")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={backoff_factor} must lie in (0, 1)")
        for name, value in (("growth_interval", growth_interval), ("hysteresis", hysteresis)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.scale = float(initial_scale)
        self.min_scale, self.growth_factor = float(min_scale), float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


class ConstantGradScaler:
    """A fixed loss scale, with `DynamicGradScaler`'s interface."""

    def __init__(self, scale: float):
        if scale <= 0:
            raise ValueError(f"loss_scale={scale} must be > 0")
        self.scale = float(scale)

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        """Nothing changes: the scale is fixed."""

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
