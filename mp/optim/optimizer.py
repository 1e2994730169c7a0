"""An update rule over fp32 master weights, with loss scaling and global-norm clipping.

One class covers Megatron's ``FP32Optimizer`` and ``Float16OptimizerWithFloat16Params``:
an fp32 parameter is its own master; a bf16 or fp16 parameter gets an fp32 master copy that
the update rule (`mp.optim.update_rules`: ``--optimizer adam``, ``sgd`` or ``muon``) updates,
then copied back into the half-precision parameter. Gradients are read from ``param.main_grad``
(`mp.distributed.DistributedDataParallel`'s fp32 buffer), else ``param.grad`` (cast to fp32).

``step()`` per iteration:

1. attach the fp32 gradients to the masters;
2. fp16 only: divide them by the loss scale;
3. compute the global L2 norm over the model-parallel group (`get_grad_norm_fp32`); an inf or
   NaN in any gradient of any rank (counted in the norm or not) makes it non-finite on every
   rank, so the norm doubles as the inf check and all ranks agree without a second collective;
4. fp16 with a non-finite norm: skip the update (every rank skips) and back off the scale;
5. with ``log_num_zeros_in_grad``, count the zero gradient elements (`count_zeros_fp32`);
6. clip by the norm, run the update rule, copy masters into the half-precision parameters.

It returns ``StepResult(update_successful, grad_norm, num_zeros_in_grad)``.

With ``use_precision_aware_optimizer`` (Megatron's flag) AdamW is `PrecisionAwareAdamW`,
which keeps the moments in ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` (fp32, bf16 or fp16): the
gradients are handed to it in their buffer's dtype (``decoupled_grad``: a bf16 buffer is not
copied to fp32), and clipping becomes a factor of its step rather than an in-place multiply.
`calc_params_l2_norm` gives the norm of the updated masters by the same rule as the gradients'.

With ``cpu_offload`` (Megatron's ``--optimizer-cpu-offload``) the first ``offload_fraction`` of
this rank's elements (whole shards, in order) have their master in host memory, a copy even of
an fp32 parameter, and so their update rule's state: the norm and clipping work on the device
gradients, which are then copied into pinned host buffers, the host steps, and the masters
are copied back into the parameters.

The optimizer works on `mp.optim.param_shard.ParamShard`s: here every shard is a whole
parameter; `mp.optim.DistributedOptimizer` cuts them over the data-parallel ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from mp import parallel_state
from mp.distributed.torch_fsdp2 import dp_shard_range, local_tensor
from mp.optim.clip_grads import (
    clip_coefficient,
    clip_grad_by_total_norm_fp32,
    count_zeros_fp32,
    counts_in_grad_norm,
    get_grad_norm_fp32,
)
from mp.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from mp.optim.muon import MuonSettings, MuonUnit
from mp.optim.param_shard import ParamShard, copy_across, offloaded_shards
from mp.optim.precision_aware import MOMENTS
from mp.optim.update_rules import (
    build_update_rule,
    check_update_rule,
    state_items,
)


class StepResult(NamedTuple):
    update_successful: bool  # False when an fp16 step was skipped for an inf/NaN gradient
    grad_norm: float  # the global norm before clipping (inf/NaN when non-finite)
    num_zeros_in_grad: int | None = None  # with log_num_zeros_in_grad, on applied steps


class MixedPrecisionOptimizer:
    """AdamW on fp32 masters of ``param_groups``' parameters (see the module doc).

    Args:
        param_groups: ``torch.optim``-style groups of the model's parameters (any of fp32,
            bf16, fp16), e.g. from `get_param_groups`.
        lr, betas, eps: AdamW's (``lr`` is the initial rate; a scheduler sets it later).
        clip_grad: clip to this global L2 norm; 0 disables clipping (the norm is still
            computed and returned).
        grad_scaler: a `DynamicGradScaler` or `ConstantGradScaler` for fp16; None for
            fp32/bf16.
        model_parallel_group, tensor_model_parallel_group: default from ``parallel_state``.
        expert_parallel_group: where experts' norms are summed as well (their gradients
            differ across its ranks); default ``parallel_state.get_expert_grad_norm_group()``
            (the EP ranks at this TP rank; None with one: none).
        impl: ``"torch"`` (AdamW) or ``"apex"`` (apex's ``FusedAdam`` when importable).
        log_num_zeros_in_grad: count the zero gradient elements at each applied step.
        use_precision_aware_optimizer: step with `PrecisionAwareAdamW` (``impl`` must be
            ``"torch"``, ``optimizer`` adam), its moments stored in ``exp_avg_dtype`` and
            ``exp_avg_sq_dtype``.
        optimizer: the update rule, ``"adam"``, ``"sgd"`` (with ``sgd_momentum``) or
            ``"muon"`` (`mp.optim.update_rules`); Muon takes the groups marked ``"muon":
            True``, whose parameters make up ``muon_units`` (`mp.optim.muon.muon_units`), with
            the hyper-parameters ``muon``.
        cpu_offload, offload_fraction: keep the masters and state of the first
            ``offload_fraction`` of this rank's elements in host memory (see the module doc);
            not with Muon, apex or FSDP.
    """

    def __init__(self, param_groups: list[dict], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip_grad: float = 0.0,
                 grad_scaler: DynamicGradScaler | ConstantGradScaler | None = None,
                 model_parallel_group=None, tensor_model_parallel_group=None,
                 expert_parallel_group=None, impl: str = "torch",
                 log_num_zeros_in_grad: bool = False,
                 use_precision_aware_optimizer: bool = False,
                 exp_avg_dtype: torch.dtype = torch.float32,
                 exp_avg_sq_dtype: torch.dtype = torch.float32, optimizer: str = "adam",
                 sgd_momentum: float = 0.9, muon: MuonSettings | None = None,
                 muon_units: list[MuonUnit] = (), cpu_offload: bool = False,
                 offload_fraction: float = 1.0):
        if clip_grad < 0:
            raise ValueError(f"clip_grad={clip_grad} must be >= 0 (0 disables clipping)")
        if cpu_offload and (optimizer == "muon" or impl != "torch"):
            raise ValueError(f"cpu_offload with optimizer={optimizer!r}, impl={impl!r}: the "
                             "host steps with torch's AdamW or SGD only")
        check_update_rule(optimizer, impl, use_precision_aware_optimizer, exp_avg_dtype,
                          exp_avg_sq_dtype)
        self.precision_aware, self.update_rule = use_precision_aware_optimizer, optimizer
        self.clip_grad, self.grad_scaler = clip_grad, grad_scaler
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        self.model_parallel_group = (parallel_state.get_model_parallel_group()
                                     if model_parallel_group is None else model_parallel_group)
        self.expert_parallel_group = expert_parallel_group
        self.params: list[nn.Parameter] = [p for g in param_groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"{type(self).__name__} got no parameters")
        self.shards: list[ParamShard] = []
        main_groups = []
        ranges = [[(param, start, end) for param in group["params"]
                   for start, end in self._ranges(param)] for group in param_groups]
        sizes = [end - start for group in ranges for _, start, end in group]
        offloaded = offloaded_shards(sizes, offload_fraction if cpu_offload else 0.0)
        for group, group_ranges in zip(param_groups, ranges):
            shards = [ParamShard.make(param, start, end, next(offloaded))
                      for param, start, end in group_ranges]
            self.shards += shards
            main_groups.append({**group, "params": [shard.main for shard in shards]})
        if any(not getattr(p, "allreduce", True) for p in self.params) \
                and expert_parallel_group is None and self._experts_need_their_group:
            self.expert_parallel_group = parallel_state.get_expert_grad_norm_group()
        # where each shard's gradient goes in the norm: "dense", "expert" or "other" (not
        # counted on this rank)
        tp_group = tensor_model_parallel_group
        self._norm_kind = ["other" if not counts_in_grad_norm(s.param, tp_group)
                           else "dense" if getattr(s.param, "allreduce", True) else "expert"
                           for s in self.shards]
        self._copied = [s for s in self.shards if not s.main_is_param or s.offloaded]
        main_of = {id(s.param): s.main for s in self.shards}
        self.optimizer = build_update_rule(  # groups this rank holds none of stay, empty
            main_groups, optimizer=optimizer, lr=lr, betas=betas,
            eps=eps, impl=impl, precision_aware=use_precision_aware_optimizer,
            exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype,
            sgd_momentum=sgd_momentum, muon=muon,
            muon_units=[u.with_tensors(main_of[id(t)] for t in u.tensors) for u in muon_units
                        if id(u.tensors[0]) in main_of])

    #: whether experts' norms need a sum over the expert-parallel group (not when the norm
    #: is summed over every rank, as the distributed optimizer's is)
    _experts_need_their_group = True

    def _ranges(self, param: nn.Parameter) -> list[tuple[int, int]]:
        """The ``[start, end)`` element ranges of ``param`` this rank updates: all of it, or
        an FSDP parameter's rows held here (`dp_shard_range`)."""
        return [dp_shard_range(param) if local_tensor(param) is not param
                else (0, param.numel())]

    @property
    def model_params(self) -> list[nn.Parameter]:
        """The parameter of each shard (`main_params` holds their masters, in order)."""
        return [s.param for s in self.shards]

    @property
    def main_params(self) -> list[torch.Tensor]:
        return [s.main for s in self.shards]

    @property
    def param_groups(self) -> list[dict]:
        """The update rule's groups (of master parameters): schedulers set ``lr`` here."""
        return self.optimizer.param_groups

    def get_loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale``: what backward must start from (the schedules' hook)."""
        return loss if self.grad_scaler is None else loss * self.grad_scaler.scale

    def zero_grad(self) -> None:
        """Drop ``.grad`` of model and master parameters (``main_grad`` buffers belong to the
        data-parallel wrapper, which zeroes them)."""
        for param in self.params + self.main_params:
            param.grad = None

    def _attach_main_grads(self):
        """Give every master its fp32 gradient, but the offloaded ones (`_grads_to_host`).
        Returns (``{"dense", "expert", "other"}`` -> the grads of each `_norm_kind`, masters
        whose ``.grad`` was borrowed here and must be released after the step, (offloaded
        shard, its fp32 gradient on the device) pairs)."""
        grads, borrowed, to_host = {"dense": [], "expert": [], "other": []}, [], []
        for shard, kind in zip(self.shards, self._norm_kind):
            grad = getattr(shard.param, "main_grad", None)
            if grad is None:
                grad = shard.param.grad
                if grad is None:
                    continue
            main = shard.main
            if shard.offloaded:  # the norm and clipping on the device, then the copy
                to_host.append((shard, shard.of(grad).float()))
                grads[kind].append(to_host[-1][1])
            elif self.precision_aware:  # bf16 buffers stay bf16; fp16 ones are unscaled in fp32
                grad = shard.of(grad)
                main.decoupled_grad = grad.float() if grad.dtype == torch.float16 else grad
                borrowed.append(main)
                grads[kind].append(main.decoupled_grad)
            elif grad is not main.grad:
                main.grad = shard.of(grad).float()  # no copy when fp32 (main_grad buffers)
                borrowed.append(main)
                grads[kind].append(main.grad)
            else:
                grads[kind].append(main.grad)
        return grads, borrowed, to_host

    def _grads_to_host(self, to_host: list[tuple[ParamShard, torch.Tensor]],
                       borrowed: list[torch.Tensor]) -> None:
        """Copy the offloaded shards' gradients (unscaled and clipped) into their pinned
        host buffers and give them to the host masters."""
        for shard, grad in to_host:
            setattr(shard.main, "decoupled_grad" if self.precision_aware else "grad",
                    shard.copy_to_host_grad(grad))
            borrowed.append(shard.main)
        if any(grad.is_cuda for _, grad in to_host):
            torch.cuda.current_stream().synchronize()  # the host step reads them next

    @torch.no_grad()
    def step(self) -> StepResult:
        grads, borrowed, to_host = self._attach_main_grads()
        try:
            return self._step(grads, to_host, borrowed)
        finally:
            # a borrowed main_grad left on an fp32 parameter would make the next backward
            # accumulate into the buffer twice
            for main in borrowed:
                if self.precision_aware:
                    main.decoupled_grad = None
                else:
                    main.grad = None

    def _step(self, by_kind: dict[str, list[torch.Tensor]],
              to_host: list[tuple[ParamShard, torch.Tensor]],
              borrowed: list[torch.Tensor]) -> StepResult:
        grads = [grad for kind in by_kind.values() for grad in kind]
        experts = dict(expert_grads=by_kind["expert"],
                       expert_parallel_group=self.expert_parallel_group)
        if self.grad_scaler is not None and grads:
            torch._foreach_mul_(grads, self.grad_scaler.inv_scale)
        grad_norm = get_grad_norm_fp32(by_kind["dense"], self.model_parallel_group,
                                       other_grads=by_kind["other"], **experts,
                                       device=self.params[0].device)
        if self.grad_scaler is not None:
            found_inf = not math.isfinite(grad_norm)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return StepResult(False, grad_norm)
        num_zeros = count_zeros_fp32(by_kind["dense"], self.model_parallel_group, **experts,
                                     device=self.params[0].device) \
            if self.log_num_zeros_in_grad else None
        if self.clip_grad > 0 and self.precision_aware:  # a factor of the fp32 step
            self.optimizer.grad_scale = clip_coefficient(self.clip_grad, grad_norm)
        elif self.clip_grad > 0:
            clip_grad_by_total_norm_fp32(grads, self.clip_grad, grad_norm)
        self._grads_to_host(to_host, borrowed)
        self.optimizer.step()
        self.copy_main_params_to_model()
        return StepResult(True, grad_norm, num_zeros)

    @torch.no_grad()
    def calc_params_l2_norm(self) -> float:
        """The L2 norm of the whole model's fp32 masters (the parameters themselves in fp32
        runs), summed over the model-parallel group with the gradient norm's rule: sharded
        parameters on every rank, TP-replicated ones on TP rank 0, a stage's shared copy never
        (and the distributed optimizer's shards on their owners). Megatron's
        ``calc_params_l2_norm`` (which also reads the masters in bf16 runs)."""
        mains = {kind: [s.main for s, k in zip(self.shards, self._norm_kind) if k == kind]
                 for kind in ("dense", "expert")}
        return get_grad_norm_fp32(mains["dense"], self.model_parallel_group,
                                  expert_grads=mains["expert"],
                                  expert_parallel_group=self.expert_parallel_group,
                                  device=self.params[0].device)

    def _rule_of(self, shard: ParamShard) -> torch.optim.Optimizer:
        """The optimizer that updates ``shard`` (Muon's chain holds two)."""
        chained = getattr(self.optimizer, "optimizer_of", None)
        return self.optimizer if chained is None else chained(shard.main)

    def state_items(self, shard: ParamShard) -> tuple[str, ...]:
        """What `shard_state` holds for ``shard``: AdamW's moments and ``step``, or a
        ``momentum_buffer`` (`mp.optim.update_rules.state_items`)."""
        return state_items(self._rule_of(shard))

    def shard_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        """The update rule's state of ``shard`` (fp32, shaped like its master; ``step`` a
        scalar): `adam_state`, or the momentum buffer (zeros before the first step, which is
        what SGD without dampening and Muon start from)."""
        rule = self._rule_of(shard)
        if "step" in state_items(rule):
            return self.adam_state(shard)
        buffer = rule.state.get(shard.main, {}).get("momentum_buffer")
        return {"momentum_buffer": torch.zeros_like(shard.main) if buffer is None else buffer}

    def load_shard_state(self, states: dict[ParamShard, dict[str, torch.Tensor]]) -> None:
        """Give the update rule the state of ``states`` (`shard_state`'s form)."""
        adam = {shard: value for shard, value in states.items() if "step" in value}
        for shard, value in states.items():
            if "momentum_buffer" in value:
                self._rule_of(shard).state[shard.main]["momentum_buffer"] = \
                    value["momentum_buffer"].to(shard.main.device)
        if adam:
            self.load_adam_state(adam)

    def adam_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        """AdamW's ``exp_avg``, ``exp_avg_sq`` (fp32, decoded from the precision-aware
        optimizer's dtypes) and ``step`` (fp32 scalar) for ``shard``; zeros and step 0 before
        the first step. (torch keeps ``step`` per parameter, apex's FusedAdam per group.)"""
        if self.precision_aware:
            return self.optimizer.unscaled_state(shard.main)
        adamw = self._rule_of(shard)
        state = adamw.state.get(shard.main, {})
        step = state.get("step")
        if step is None:  # apex's count, or nothing before the first step
            group = next(g for g in adamw.param_groups
                         if any(p is shard.main for p in g["params"]))
            step = group.get("step", 0)
        return {"step": torch.as_tensor(step, dtype=torch.float32).detach().cpu(),
                **{m: state.get(m, torch.zeros_like(shard.main)) for m in MOMENTS}}

    def load_adam_state(self, states: dict[ParamShard, dict[str, torch.Tensor]]) -> None:
        """Give AdamW the moments and step counts of ``states`` (`adam_state`'s form), through
        its own ``load_state_dict``, which places them as its kernels want."""
        adamw = self._rule_of(next(iter(states)))
        order = {id(p): i for i, p in enumerate(p for g in adamw.param_groups
                                                for p in g["params"])}
        saved = adamw.state_dict()
        saved["state"] = {order[id(shard.main)]: dict(value) for shard, value in states.items()}
        for group in saved["param_groups"]:
            if "step" in group:  # apex: one count per group, the same for all its params
                steps = [states[s]["step"] for s in self.shards
                         if s in states and order[id(s.main)] in group["params"]]
                group["step"] = int(steps[0]) if steps else group["step"]
        adamw.load_state_dict(saved)

    @torch.no_grad()
    def copy_main_params_to_model(self) -> None:
        """Copy the masters into the model's parameters: after each step, and after a
        checkpoint loaded the masters."""
        copy_across([s.of(s.param) for s in self._copied], [s.main for s in self._copied])

    @torch.no_grad()
    def load_finished(self) -> None:
        """After a checkpoint loaded the weights and masters: the offloaded masters of fp32
        parameters take the loaded weights, the half-precision parameters the loaded masters
        (`copy_main_params_to_model`)."""
        fp32 = [s for s in self._copied if s.main_is_param]
        copy_across([s.main for s in fp32], [s.of(s.param) for s in fp32])
        self.copy_main_params_to_model()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the masters from the model's parameters (Megatron's name and meaning):
        after weights were written into the model alone, as a model-only checkpoint load
        does; otherwise the next step would put the stale masters back."""
        copy_across([s.main for s in self._copied], [s.of(s.param) for s in self._copied])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
                "main_params": [s.main for s in self._copied]}

    def load_state_dict(self, state: dict) -> None:
        """Restore AdamW's moments, the loss scale and the fp32 masters (which are the
        authoritative weights: half-precision parameters are refreshed from them)."""
        saved = state["main_params"]
        if len(saved) != len(self._copied):
            raise ValueError(f"optimizer state holds {len(saved)} fp32 master parameters; "
                             f"this optimizer has {len(self._copied)} fp32 copies of "
                             "half-precision parameters")
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["grad_scaler"] is None) != (self.grad_scaler is None):
            raise ValueError("optimizer state and this optimizer disagree on loss scaling "
                             "(fp16 against fp32/bf16)")
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        with torch.no_grad():
            for shard, value in zip(self._copied, saved):
                shard.main.copy_(value)
        self.copy_main_params_to_model()


