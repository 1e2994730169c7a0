"""The learning-rate schedule: linear warm-up, then a decay to ``min_lr``.

Megatron's ``OptimizerParamScheduler`` semantics, counted in steps: iterations, or samples in
a run counted in samples (the loop then calls ``step(global_batch_size)``, as Megatron always
does):

- ``num_steps <= warmup``:  ``lr = init_lr + (max_lr - init_lr) * num_steps / warmup``
- ``constant``:             ``lr = max_lr``
- ``num_steps > decay``:    ``lr = min_lr``
- ``inverse-square-root``: ``lr = max(min_lr, max_lr * sqrt(max(warmup, 1) / max(n, 1)))``
- otherwise, with ``r = (num_steps - warmup) / (decay - warmup)``:
  ``lr = min_lr + (max_lr - min_lr) * c`` where ``c = 1 - r`` (linear) or
  ``c = (1 + cos(pi r)) / 2`` (cosine);
- ``WSD`` (warm-up, stable, decay): ``c = 1`` until the last ``wsd_decay_steps`` before
  ``decay``, then, with ``q`` their fraction done, ``c = 1 - q`` (linear),
  ``(1 + cos(pi q)) / 2`` (cosine), ``2 * 0.5^q - 1`` (exponential) or ``1 - sqrt(q)``
  (minus_sqrt), as ``lr_wsd_decay_style`` says.

As in Megatron, the training loop calls ``step()`` after each successful optimizer step, so the
first update runs at ``lr(0)`` (``init_lr`` when there is a warm-up) and a skipped fp16 step
does not advance the schedule. A group's ``lr_mult`` (default 1) scales its rate.

Groups marked ``is_decoupled_lr`` (the embedding and output weights with Megatron's
``--decoupled-lr``, `mp.optim.get_param_groups`) follow the same warm-up and decay from
``decoupled_lr`` to ``decoupled_min_lr`` (default ``min_lr``, as in Megatron) in place of
``max_lr`` and ``min_lr``. Both are saved with the other hyper-parameters.

The weight decay (Megatron's ``--weight-decay-incr-style``) moves from ``start_wd`` to
``end_wd >= start_wd`` over ``wd_incr_steps`` steps, with ``r = min(num_steps / wd_incr_steps,
1)``: ``wd = start_wd + (end_wd - start_wd) * c``, ``c = r`` (linear) or
``c = (1 + cos(pi (1 - r))) / 2`` (cosine); ``constant`` keeps ``start_wd == end_wd``. A group
gets ``wd`` times its ``wd_mult`` (default 1; `mp.optim.get_param_groups` gives 0 to biases and
norms). Without ``start_wd`` the scheduler leaves every group's ``weight_decay`` alone.

Resuming (`load_state_dict`) refuses hyper-parameters that differ from the saved ones, as
Megatron's default does, unless ``override_opt_param_scheduler`` (keep this scheduler's) or
``use_checkpoint_opt_param_scheduler`` (take the saved ones) says which win (Megatron's
``--override-opt_param-scheduler`` and ``--use-checkpoint-opt_param-scheduler``).
"""

from __future__ import annotations

import math
from typing import ClassVar

DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = {  # the annealing phase's coefficient of its fraction done, q
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (math.cos(math.pi * q) + 1.0),
    "exponential": lambda q: 2.0 * 0.5**q - 1.0,
    "minus_sqrt": lambda q: 1.0 - math.sqrt(q),
}
WD_INCR_STYLES = ("constant", "linear", "cosine")
# how to settle a resume whose hyper-parameters differ from the checkpoint's
_EITHER_FLAG = ("--override-opt_param-scheduler keeps this run's values, "
                "--use-checkpoint-opt_param-scheduler takes the checkpoint's")


class OptimizerParamScheduler:
    """Sets ``lr`` (and, with ``start_wd``, ``weight_decay``) of every param group of
    ``optimizer`` from the step count.

    ``optimizer`` is anything with ``param_groups`` (a ``torch.optim`` optimizer or
    `MixedPrecisionOptimizer`). The values for the current count are applied at construction.
    """

    def __init__(self, optimizer, *, max_lr: float, min_lr: float = 0.0,
                 lr_warmup_steps: float = 0, lr_decay_steps: int, lr_decay_style: str = "cosine",
                 init_lr: float = 0.0, wsd_decay_steps: int | None = None,
                 lr_wsd_decay_style: str = "exponential", decoupled_lr: float | None = None,
                 decoupled_min_lr: float | None = None, start_wd: float | None = None,
                 end_wd: float | None = None, wd_incr_steps: int | None = None,
                 wd_incr_style: str = "constant", override_opt_param_scheduler: bool = False,
                 use_checkpoint_opt_param_scheduler: bool = False):
        if lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style={lr_decay_style!r} must be one of "
                             f"{', '.join(map(repr, DECAY_STYLES))}")
        if lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"lr_wsd_decay_style={lr_wsd_decay_style!r} must be one of "
                             f"{', '.join(map(repr, WSD_DECAY_STYLES))}")
        if lr_decay_style == "WSD" and not (
                wsd_decay_steps is not None and 0 < wsd_decay_steps <= lr_decay_steps):
            raise ValueError(f"lr_decay_style='WSD' needs wsd_decay_steps in [1, "
                             f"lr_decay_steps={lr_decay_steps}], got {wsd_decay_steps}")
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"min_lr={min_lr} must lie in [0, max_lr={max_lr}]")
        if decoupled_min_lr is not None and (decoupled_lr is None
                                             or not 0.0 <= decoupled_min_lr <= decoupled_lr):
            raise ValueError(f"decoupled_min_lr={decoupled_min_lr} must lie in [0, "
                             f"decoupled_lr={decoupled_lr}] (it needs decoupled_lr)")
        if decoupled_lr is None and any(g.get("is_decoupled_lr") for g in optimizer.param_groups):
            raise ValueError("the optimizer has a param group marked is_decoupled_lr (the "
                             "embedding and output weights) but decoupled_lr=None")
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps} must be >= 0")
        if lr_decay_style != "constant" and lr_decay_steps < max(1, lr_warmup_steps):
            raise ValueError(f"lr_decay_steps={lr_decay_steps} must be >= 1 and >= "
                             f"lr_warmup_steps={lr_warmup_steps} (lr_decay_style="
                             f"{lr_decay_style!r})")
        _check_wd_schedule(start_wd, end_wd, wd_incr_steps, wd_incr_style)
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ValueError("override_opt_param_scheduler and use_checkpoint_opt_param_scheduler "
                             "are both set: on resume this run's values win, or the "
                             "checkpoint's, not both")
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = init_lr, max_lr, min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        self.decoupled_lr, self.decoupled_min_lr = decoupled_lr, decoupled_min_lr
        self.start_wd, self.end_wd = start_wd, end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def get_lr(self, num_steps: int | None = None, param_group: dict | None = None) -> float:
        """The rate after ``num_steps`` steps (default: the current count) of ``param_group``
        (before its ``lr_mult``): the decoupled schedule's for a group marked
        ``is_decoupled_lr``, else (and by default) the base one."""
        n = self.num_steps if num_steps is None else num_steps
        max_lr, min_lr = self.max_lr, self.min_lr
        if param_group is not None and param_group.get("is_decoupled_lr", False):
            max_lr = self.decoupled_lr
            min_lr = self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr
        if self.lr_warmup_steps > 0 and n <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * n / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(min_lr, max_lr * math.sqrt(max(self.lr_warmup_steps, 1) / max(n, 1)))
        if self.lr_decay_style == "WSD":
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            coeff = 1.0 if n <= anneal_start else WSD_DECAY_STYLES[self.lr_wsd_decay_style](
                (n - anneal_start) / self.wsd_decay_steps)
        else:
            ratio = (n - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
            coeff = 1.0 - ratio if self.lr_decay_style == "linear" else \
                0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def get_wd(self, num_steps: int | None = None) -> float | None:
        """The weight decay after ``num_steps`` steps (default: the current count), before a
        group's ``wd_mult``; None without a weight-decay schedule (``start_wd``)."""
        n = self.num_steps if num_steps is None else num_steps
        if self.wd_incr_style == "constant" or n > self.wd_incr_steps:
            return self.end_wd
        ratio = n / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else \
            0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def step(self, increment: int = 1) -> None:
        """Advance the count by ``increment`` steps and set every group's ``lr`` (and, with a
        weight-decay schedule, ``weight_decay``)."""
        self.num_steps += increment
        wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(param_group=group) * group.get("lr_mult", 1.0)
            if wd is not None:
                group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    _HYPERPARAMETERS = ("init_lr", "max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps",
                        "lr_decay_style", "wsd_decay_steps", "lr_wsd_decay_style",
                        "decoupled_lr", "decoupled_min_lr", "start_wd", "end_wd",
                        "wd_incr_steps", "wd_incr_style")
    # hyper-parameters older checkpoints did not save, at the values they then had (their
    # constant weight decay, start_wd = end_wd, was not recorded: it is not compared)
    _ADDED_LATER: ClassVar[dict] = {"wsd_decay_steps": None,
                                    "lr_wsd_decay_style": "exponential",
                                    "decoupled_lr": None, "decoupled_min_lr": None,
                                    "wd_incr_steps": None, "wd_incr_style": "constant"}

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps,
                **{name: getattr(self, name) for name in self._HYPERPARAMETERS}}

    def saved_differences(self, state: dict) -> dict[str, tuple]:
        """``{name: (this value, saved value)}`` for each hyper-parameter that ``state`` (a
        `state_dict`, perhaps from before a hyper-parameter existed) sets differently."""
        pairs = {name: (getattr(self, name), state.get(name, self._ADDED_LATER.get(name)))
                 for name in self._HYPERPARAMETERS if name in state or name in self._ADDED_LATER}
        return {name: pair for name, pair in pairs.items() if pair[0] != pair[1]}

    def mismatches(self, state: dict) -> list[str]:
        """Why `load_state_dict` refuses ``state``: a line naming both values of each
        `saved_differences` entry, none when ``override_opt_param_scheduler`` or
        ``use_checkpoint_opt_param_scheduler`` says which values win."""
        if self.override_opt_param_scheduler or self.use_checkpoint_opt_param_scheduler:
            return []
        return [f"learning-rate schedule: {name}={mine!r} here but {saved!r} in the checkpoint "
                f"({_EITHER_FLAG})"
                for name, (mine, saved) in self.saved_differences(state).items()]

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step count, with this scheduler's hyper-parameters under
        ``override_opt_param_scheduler``, the saved ones under
        ``use_checkpoint_opt_param_scheduler``; otherwise differing ones raise ValueError
        (`mismatches`)."""
        problems = self.mismatches(state)
        if problems:
            raise ValueError("; ".join(problems))
        if self.use_checkpoint_opt_param_scheduler:
            for name, (_, saved) in self.saved_differences(state).items():
                setattr(self, name, saved)
        self.num_steps = 0
        self.step(int(state["num_steps"]))


def _check_wd_schedule(start_wd: float | None, end_wd: float | None, wd_incr_steps: int | None,
                       wd_incr_style: str) -> None:
    """Megatron's rules for the weight decay's schedule (ValueError naming the values)."""
    if wd_incr_style not in WD_INCR_STYLES:
        raise ValueError(f"wd_incr_style={wd_incr_style!r} must be one of "
                         f"{', '.join(map(repr, WD_INCR_STYLES))}")
    if start_wd is None and end_wd is None and wd_incr_style == "constant":
        return  # no weight-decay schedule: the groups keep their own
    if start_wd is None or end_wd is None or not 0.0 <= start_wd <= end_wd:
        raise ValueError(f"start_wd={start_wd} and end_wd={end_wd} must satisfy 0 <= start_wd "
                         f"<= end_wd (wd_incr_style={wd_incr_style!r})")
    if wd_incr_style == "constant" and start_wd != end_wd:
        raise ValueError(f"wd_incr_style='constant' needs start_wd == end_wd, got {start_wd} "
                         f"and {end_wd}")
    if wd_incr_style != "constant" and (wd_incr_steps is None or wd_incr_steps < 1):
        raise ValueError(f"wd_incr_style={wd_incr_style!r} needs wd_incr_steps >= 1, got "
                         f"{wd_incr_steps}")
