"""Test and benchmark helpers: count the calls that would force a host-device sync on an accelerator.

On CPU nothing ever waits, so ``count_host_syncs`` counts the *calls* that would block the host on a
GPU: reading values (``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``float(t)``), copies to the
host (``cpu()``, ``to("cpu")``) and ops whose output size depends on the data (``nonzero``,
``masked_select``, boolean-mask indexing). Use it around the code under test::

    with count_host_syncs() as syncs:
        optimizer.step()
    assert syncs.count <= 1
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch

_TENSOR_METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                   "masked_select")
_TORCH_FUNCTIONS = ("nonzero", "masked_select")


@dataclass
class SyncCounter:
    """Calls seen inside ``count_host_syncs``, by name (``Tensor.item``, ``Tensor.to(cpu)``, ...)."""

    calls: Counter = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.calls.values())


def _is_cpu_target(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, (str, torch.device)):
        return torch.device(target).type == "cpu"
    return False


def _counting(original, label: str, counter: SyncCounter, guard: list[bool]):
    def wrapper(*args, **kwargs):
        if guard[0]:  # a counted call made from inside another counted call is the same sync
            return original(*args, **kwargs)
        guard[0] = True
        try:
            counter.calls[label] += 1
            return original(*args, **kwargs)
        finally:
            guard[0] = False

    return wrapper


def _counting_to(original, counter: SyncCounter, guard: list[bool]):
    def to(self, *args, **kwargs):
        if not guard[0] and _is_cpu_target(args, kwargs):
            counter.calls["Tensor.to(cpu)"] += 1
        return original(self, *args, **kwargs)

    return to


def _counting_getitem(original, counter: SyncCounter, guard: list[bool]):
    def getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if not guard[0] and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            counter.calls["Tensor.__getitem__(bool mask)"] += 1
        return original(self, index)

    return getitem


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Patch ``torch.Tensor`` and ``torch`` for the duration of the block and count sync-inducing calls.

    Yields:
        A ``SyncCounter`` filled in as the block runs.
    """
    counter = SyncCounter()
    guard = [False]
    # (owner, name, the owner's own attribute or None when it is inherited from torch._C.TensorBase)
    saved = [(torch.Tensor, name, vars(torch.Tensor).get(name)) for name in (*_TENSOR_METHODS, "to", "__getitem__")]
    saved += [(torch, name, getattr(torch, name)) for name in _TORCH_FUNCTIONS]
    try:
        for name in _TENSOR_METHODS:
            setattr(torch.Tensor, name, _counting(getattr(torch.Tensor, name), f"Tensor.{name}", counter, guard))
        for name in _TORCH_FUNCTIONS:
            setattr(torch, name, _counting(getattr(torch, name), f"torch.{name}", counter, guard))
        torch.Tensor.to = _counting_to(torch.Tensor.to, counter, guard)
        torch.Tensor.__getitem__ = _counting_getitem(torch.Tensor.__getitem__, counter, guard)
        yield counter
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
