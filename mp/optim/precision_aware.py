"""AdamW with its moments stored in bf16 or fp16: Megatron-Core's precision-aware optimizer.

Megatron's ``--use-precision-aware-optimizer`` with ``--exp-avg-dtype`` / ``--exp-avg-sq-dtype``
steps with Transformer Engine's ``FusedAdam``, which computes in fp32 and stores each state in
its own dtype. `PrecisionAwareAdamW` does the same math in plain torch, per parameter, in
chunks of ``chunk_size`` elements (so the fp32 temporaries stay a few chunk-sized tensors
whatever the model's size):

1. read the chunk's gradient (``p.decoupled_grad``, TE's name: the data-parallel buffer's bf16
   or fp32 elements, never copied whole to fp32; else ``p.grad``) as fp32, times
   ``grad_scale`` (the clipping coefficient, set by the caller for one step);
2. decode the stored moments to fp32, and update on fp32 temporaries exactly as
   ``torch.optim.AdamW`` does: ``p *= 1 - lr wd``; ``m = b1 m + (1 - b1) g``;
   ``v = b2 v + (1 - b2) g^2``; ``p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``
   (the parameter moves with the unrounded fp32 moments, as TE's kernel does);
3. store the moments back in their dtype, rounding to nearest (even).

Storage per dtype (TE's choices, one wart fixed):

- fp32: as is; bf16: a plain cast (bf16 has fp32's range, TE does no scaling either);
- fp16: scaled. TE keeps one fp32 factor per tensor, ``absmax / (65504 / 2)``, so the values
  fill fp16's range. Here each chunk of a state has its own factor, a power of two chosen so
  the chunk's absmax lands in ``(65504 / 4, 65504 / 2]``. A power of two makes the scaling
  exact: the stored value is the fp32 one rounded to fp16's 11-bit significand, whatever the
  factor, so results do not depend on how the state is cut (data-parallel shards, chunks);
  elements below ``absmax / 2^29`` of their chunk become fp16 subnormals (less precise) or 0.
  The factors cost 4 bytes per chunk (``<name>_scale`` in the state).

``state[p]`` holds ``step`` (fp32 scalar on the CPU, as torch's AdamW), ``exp_avg`` and
``exp_avg_sq`` shaped like ``p`` in their dtypes, and for fp16 ``exp_avg_scale`` /
``exp_avg_sq_scale`` ``[ceil(numel / chunk_size)]`` fp32. `unscaled_state` decodes them to
fp32; `load_state_dict` accepts fp32 (or stored and scaled) moments and re-encodes them, so
checkpoints can keep fp32 global tensors and load into any dtype.
"""

from __future__ import annotations

import math

import torch

#: Megatron's dtype names -> the dtypes this step can store a moment in.
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides ``step``
CHUNK_ELEMENTS = 1 << 22  # 16 MiB per fp32 temporary
_FP16_TARGET = torch.finfo(torch.float16).max / 2  # TE's headroom: absmax <= 65504 / 2


def _scale_key(name: str) -> str:
    return f"{name}_scale"


def encode(values: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Store fp32 ``values`` (any shape) into ``out`` (same numel, its dtype), rounding to
    nearest; fp16 (``scale``: a 0-d fp32 tensor) by a power-of-two factor, ``out * scale``
    being the value."""
    if scale is None:
        out.copy_(values.view_as(out))
        return
    absmax = values.abs().amax()
    shift = torch.floor(torch.log2(_FP16_TARGET / absmax))
    shift = torch.nan_to_num(shift, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-126, 126)
    out.copy_((values * torch.exp2(shift)).view_as(out))
    scale.copy_(torch.exp2(-shift))


def decode(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 values of ``stored`` (times its fp16 ``scale``): a new tensor."""
    values = stored.float()
    return values if scale is None else values.mul_(scale)


class PrecisionAwareAdamW(torch.optim.Optimizer):
    """AdamW on fp32 parameters whose moments are stored in ``exp_avg_dtype`` and
    ``exp_avg_sq_dtype`` (fp32, bf16 or fp16); see the module doc.

    Args:
        params: parameters or ``torch.optim`` groups (fp32 tensors: the masters).
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay).
        exp_avg_dtype, exp_avg_sq_dtype: the moments' storage dtypes.
        chunk_size: elements per fp32 temporary (and per fp16 scale factor).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *,
                 exp_avg_dtype: torch.dtype = torch.float32,
                 exp_avg_sq_dtype: torch.dtype = torch.float32,
                 chunk_size: int = CHUNK_ELEMENTS):
        for name, dtype in (("exp_avg_dtype", exp_avg_dtype),
                            ("exp_avg_sq_dtype", exp_avg_sq_dtype)):
            if dtype not in STATE_DTYPES.values():
                raise ValueError(f"{name}={dtype} must be one of torch.float32, "
                                 "torch.bfloat16, torch.float16")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      chunk_size=chunk_size))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"PrecisionAwareAdamW updates fp32 masters; got a "
                                     f"{p.dtype} tensor of shape {tuple(p.shape)}")
        self.dtypes = {"exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype}
        self.chunk_size = chunk_size
        self.grad_scale = 1.0  # multiplies the gradients of the next step only (clipping)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            chunks = math.ceil(p.numel() / self.chunk_size)
            for name, dtype in self.dtypes.items():
                state[name] = torch.zeros_like(p, dtype=dtype)
                if dtype == torch.float16:
                    state[_scale_key(name)] = torch.ones(chunks, dtype=torch.float32,
                                                         device=p.device)
        return state

    def _chunks(self, p: torch.Tensor):
        """``(index, start, end)`` of each chunk of ``p``'s flat elements."""
        for index, start in enumerate(range(0, p.numel(), self.chunk_size)):
            yield index, start, min(start + self.chunk_size, p.numel())

    def _read(self, state: dict, name: str, index: int, start: int, end: int) -> torch.Tensor:
        scale = state.get(_scale_key(name))
        return decode(state[name].view(-1)[start:end],
                      None if scale is None else scale[index])

    def _write(self, state: dict, name: str, index: int, start: int, end: int,
               values: torch.Tensor) -> None:
        scale = state.get(_scale_key(name))
        encode(values, state[name].view(-1)[start:end], None if scale is None else scale[index])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient (see the module doc)."""
        loss = None if closure is None else closure()
        grad_scale, self.grad_scale = self.grad_scale, 1.0
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            decay = 1.0 - lr * group["weight_decay"]
            for p in group["params"]:
                grad = getattr(p, "decoupled_grad", None)
                grad = p.grad if grad is None else grad
                if grad is None:
                    continue
                state = self._init_state(p)
                state["step"] += 1
                t = float(state["step"])
                step_size = lr / (1.0 - beta1**t)
                bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
                flat, grad = p.view(-1), grad.reshape(-1)
                for index, start, end in self._chunks(p):
                    g = grad[start:end].float()
                    if grad_scale != 1.0:
                        g.mul_(grad_scale)
                    m = self._read(state, "exp_avg", index, start, end)
                    v = self._read(state, "exp_avg_sq", index, start, end)
                    m.lerp_(g, 1.0 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                    chunk = flat[start:end]
                    chunk.mul_(decay)
                    chunk.addcdiv_(m, denom, value=-step_size)
                    self._write(state, "exp_avg", index, start, end, m)
                    self._write(state, "exp_avg_sq", index, start, end, v)
        return loss

    def unscaled_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """``p``'s ``step`` and moments in fp32 (new tensors shaped like ``p``); zeros and
        step 0 before its first step."""
        state = self.state.get(p)
        if not state:
            return {"step": torch.zeros((), dtype=torch.float32),
                    **{name: torch.zeros_like(p) for name in MOMENTS}}
        out = {"step": state["step"].clone()}
        for name in MOMENTS:
            out[name] = torch.empty_like(p)
            for index, start, end in self._chunks(p):
                out[name].view(-1)[start:end] = self._read(state, name, index, start, end)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` (which casts every state to the parameter's fp32),
        then the moments re-encoded in this optimizer's dtypes: each entry holds fp32
        moments, or stored ones with their ``<name>_scale`` factors (`state_dict`'s form)."""
        saved_chunks = [group.get("chunk_size", self.chunk_size)
                        for group in state_dict["param_groups"] for _ in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for group in self.param_groups:
            group["chunk_size"] = self.chunk_size
        for p, saved_chunk in zip(params, saved_chunks):
            if p not in self.state:
                continue
            loaded = dict(self.state[p])
            self.state[p].clear()
            fresh = self._init_state(p)
            fresh["step"].copy_(loaded["step"])
            for name in MOMENTS:
                values = loaded[name].reshape(-1)
                scale = loaded.get(_scale_key(name))
                if scale is not None:  # stored fp16 chunks of the saving run, and their factors
                    values = values * scale.repeat_interleave(saved_chunk)[:values.numel()]
                for index, start, end in self._chunks(p):
                    self._write(fresh, name, index, start, end, values[start:end])
