"""Measure what the estimates predict: bytes saved for backward, bytes per collective.

The estimator is only worth what its checks are worth; these two meters read the real thing.

- `SavedTensorMeter`: the bytes autograd keeps for backward inside a ``with`` block, counted
  through ``torch.autograd.graph.saved_tensors_hooks``. A storage counts once however many
  saved tensors view it (q, k and v are views of one fused QKV output), and the storages of
  excluded tensors (the parameters: weights are not activations) do not count. A storage is
  counted at its size when read: an output freed after its consumers saved it, to be
  recomputed in backward (`mp.tensor_parallel.CheckpointWithoutOutput`), counts nothing.
- `CollectiveMeter`: every ``torch.distributed`` collective and point-to-point call made inside
  a ``with`` block, with its kind, the global ranks of its group and its size in bytes: the
  tensor of an all-reduce, broadcast or send/recv; the gathered (full) buffer of an
  all-gather; the full input of a reduce-scatter or an all-to-all. That is the per-call ``bytes`` of
  `mp.estimate.comm.Collective`, so the two compare directly. ``broadcast_object_list`` is
  logging (the training loss, sent from the last pipeline stage to the others): it runs, but
  neither it nor the broadcasts it makes inside count in ``calls``; it is listed in
  ``logging`` as ``(name, group ranks)`` instead.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d


class SavedTensorMeter:
    """``with SavedTensorMeter(exclude=model.parameters()) as meter: loss = model(x)`` then
    ``meter.bytes``; ``meter.entries`` lists ``(shape, dtype, storage bytes when saved,
    counted)`` per saved tensor in the order autograd saved them, for reading a
    difference."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: set = set()
        self._kept: list[torch.Tensor] = []  # keep storages alive so no address is reused
        self.entries: list[tuple[tuple[int, ...], torch.dtype, int, bool]] = []
        self._hooks = None

    @property
    def bytes(self) -> int:
        """The bytes the counted storages hold now."""
        return sum(t.untyped_storage().nbytes() for t in self._kept)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        nbytes = tensor.untyped_storage().nbytes()
        counted = key not in self._excluded and key not in self._seen
        if counted:
            self._seen.add(key)
            self._kept.append(tensor)
        self.entries.append((tuple(tensor.shape), tensor.dtype, nbytes, counted))
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> int:
    """The storage itself (not its address: a freed storage's address can be reused while
    the meter keeps the storage)."""
    if tensor.device.type == "meta":
        raise ValueError("SavedTensorMeter cannot tell storages apart on the meta device")
    return tensor.untyped_storage()._cdata


# function name in torch.distributed -> (kind, the argument whose size the call has); the
# single-tensor all-gather and reduce-scatter under this torch's names (`mp.comm`): torch
# 2.13's deprecated old names call the new ones, so only one of each pair is wrapped
_GATHER, _SCATTER = (("all_gather_single", "reduce_scatter_single")
                     if hasattr(distributed_c10d, "all_gather_single")
                     else ("all_gather_into_tensor", "reduce_scatter_tensor"))
_SIZED_BY = {
    "all_reduce": ("all_reduce", "tensor"),
    "broadcast": ("broadcast", "tensor"),
    _GATHER: ("all_gather", "output_tensor"),
    _SCATTER: ("reduce_scatter", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "send": ("send", "tensor"),
    "recv": ("recv", "tensor"),
    "isend": ("send", "tensor"),
    "irecv": ("recv", "tensor"),
}
# calls the estimate does not model: they fail the measurement rather than go uncounted
# (``batch_isend_irecv`` is not among them: it runs each ``P2POp``'s isend or irecv, counted)
_UNMODELLED = ("all_gather", "reduce_scatter", "all_to_all", "reduce", "gather", "scatter",
               "all_gather_object")
# logging, not training communication: run, listed in ``logging``, not counted in ``calls``
_LOGGING = ("broadcast_object_list",)
# the modules a caller may reach the functions through; ``P2POp`` checks its ``op`` against
# distributed_c10d's own ``isend``/``irecv``, so both must hold the same wrapper
_NAMESPACES = (dist, distributed_c10d)


class CollectiveMeter:
    """``with CollectiveMeter() as meter: <one training iteration>``, then ``meter.calls``: a
    list of ``(kind, group ranks, bytes)``, and ``meter.totals()``: bytes summed per
    ``(kind, group ranks)``. ``torch.distributed``'s functions are wrapped for the block (code
    that calls ``dist.all_reduce(...)`` looks the attribute up at call time, so it is seen)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self.logging: list[tuple[str, tuple[int, ...]]] = []
        self._in_logging = False
        self._originals: dict[tuple[object, str], object] = {}

    def __enter__(self) -> CollectiveMeter:
        for name, (kind, argument) in _SIZED_BY.items():
            self._wrap(name, self._recorder(kind, argument))
        for name in _UNMODELLED:
            self._wrap(name, self._refuser(name))
        for name in _LOGGING:
            self._wrap(name, self._logger(name))
        return self

    def __exit__(self, *exc) -> None:
        for (namespace, name), original in self._originals.items():
            setattr(namespace, name, original)
        self._originals.clear()

    def totals(self) -> dict[tuple[str, tuple[int, ...]], int]:
        sums: dict = collections.defaultdict(int)
        for kind, ranks, nbytes in self.calls:
            sums[kind, ranks] += nbytes
        return dict(sums)

    def _wrap(self, name: str, make) -> None:
        original = getattr(distributed_c10d, name)
        wrapper = make(original)
        for namespace in _NAMESPACES:
            self._originals[namespace, name] = getattr(namespace, name)
            setattr(namespace, name, wrapper)

    def _recorder(self, kind: str, argument: str):
        def make(original):
            signature = inspect.signature(original)

            def call(*args, **kwargs):
                if self._in_logging:
                    return original(*args, **kwargs)
                bound = signature.bind(*args, **kwargs).arguments
                tensor, group = bound[argument], bound.get("group")
                ranks = tuple(dist.get_process_group_ranks(group) if group is not None
                              else range(dist.get_world_size()))
                self.calls.append((kind, ranks, tensor.numel() * tensor.element_size()))
                return original(*args, **kwargs)
            return call
        return make

    def _logger(self, name: str):
        def make(original):
            signature = inspect.signature(original)

            def call(*args, **kwargs):
                group = signature.bind(*args, **kwargs).arguments.get("group")
                self.logging.append((name, tuple(dist.get_process_group_ranks(group)
                                                 if group is not None
                                                 else range(dist.get_world_size()))))
                self._in_logging = True
                try:
                    return original(*args, **kwargs)
                finally:
                    self._in_logging = False
            return call
        return make

    @staticmethod
    def _refuser(name: str):
        def make(original):
            def call(*args, **kwargs):
                raise RuntimeError(f"CollectiveMeter: torch.distributed.{name} is not modelled "
                                   "by mp.estimate.comm; model it there before measuring it")
            return call
        return make
