"""Dropout on the LoRA inputs, with a fast path for fp32 CPU tensors.

torch draws CPU random numbers one element at a time: ``F.dropout`` on a 512 x 1536 activation takes
several milliseconds, more than the rank-128 LoRA matmuls that follow it. ``LoRADropout`` instead
uses a counter-based mask from the native library (``molf.optim.native``): element ``i`` is kept iff
a 32-bit hash of ``(key, i)`` is at least ``p * 2^32``. The two 32-bit keys are drawn from torch's
default CPU generator, so ``torch.manual_seed``, the Trainer's RNG checkpointing and activation
checkpointing's RNG replay all govern it as they govern ``F.dropout``; the backward pass regenerates
the mask from the keys, so no mask is stored. Elsewhere (CUDA, other dtypes, no C compiler,
``MOLF_NATIVE=0``) it is ``F.dropout``.

The masks differ from ``F.dropout``'s for the same seed (same distribution: each element dropped
with probability ``p``, independently across elements and calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molf.optim import native


class _CounterDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, key0: int, key1: int) -> Tensor:
        ctx.p, ctx.key = p, (key0, key1)
        return native.dropout(x.contiguous(), ctx.key, p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return native.dropout(grad.contiguous(), ctx.key, ctx.p), None, None, None


def _draw_key() -> tuple[int, int]:
    """Two 32-bit keys from torch's default CPU generator (one draw)."""
    value = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF


def _native_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and native.available()


def counter_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``, through the native counter-based kernel where it applies."""
    if not training or p == 0.0:
        return x
    if _native_ok(x) and p < 1.0:  # p = 1 drops everything: torch's zeros, not a division by 1 - p
        return _CounterDropout.apply(x, p, *_draw_key())
    return F.dropout(x, p, training)


class LoRADropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, ``train()``/``eval()`` and repr) whose fp32 CPU path is the native
    counter-based kernel; see the module docstring."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return counter_dropout(x, self.p, self.training)
