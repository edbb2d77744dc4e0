"""Triton score pre-pass for CUDA: every tensor of a bucket in one launch, deterministically.

``triton`` is imported by the functions that need it, never at import time of ``molf``, and is not
a dependency (``molf.optim.prepass`` falls back to the eager backend when it is missing).

Kernel 1 (one program per ``BLOCK`` elements of one tensor) reads ``g``, ``m``, ``v`` through a
table of raw pointers, forms the would-be moments ``m' = m + (1 - b1)(g - m)`` and
``v' = b2 v + (1 - b2) g^2`` in fp32, rounds them to the parameters' dtype as the update will store
them, and writes the block's fp32 score sum to a partial buffer. Kernel 2
(one program per tensor) adds the tensor's partials in a fixed order. No float atomics, so every
DDP rank computes bit-identical scores from identical inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from molf.optim.scores import SCORE_EPS, ScoreFn

BLOCK = 2048
_TERM_CODES = {"true_projected": 0, "projected": 1}  # scores with a Triton term; others run eager


@dataclass
class TritonPlan:
    """The per-bucket launch tables, rebuilt only when a state tensor moves.

    ``block_tensor`` ``(num_blocks,)`` int32: the tensor of each block; ``first_block``
    ``(P + 1,)`` int64: the first block of each tensor; ``ptrs`` ``(3, P)`` int64: the data pointers
    of ``g``, ``m``, ``v`` (the gradient row is refreshed when the gradients move).
    """

    state_ptrs: tuple[int, ...]
    grad_ptrs: tuple[int, ...]
    numels: Tensor
    block_tensor: Tensor
    first_block: Tensor
    ptrs: Tensor
    partials: Tensor


def supports(score_fn: ScoreFn, params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether the kernel covers this score, these dtypes and layouts (else the caller runs eager)."""
    dtype = params[0].dtype
    return (score_fn.name in _TERM_CODES and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(g.dtype == dtype and g.is_contiguous() for g in grads))


def _pointer_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """``(len(rows), P)`` int64 on ``device`` through pinned memory, without a host sync."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":  # CPU tensors: only under TRITON_INTERPRET=1 (the tests)
        return host
    return host.pin_memory().to(device, non_blocking=True)


def plan_for(plan: object | None, params: list[Tensor], exp_avgs: list[Tensor],
             exp_avg_sqs: list[Tensor]) -> TritonPlan:
    """Reuse ``plan`` while the moments stay where they were; rebuild the tables otherwise.

    ``plan`` may be another backend's plan (a bucket whose gradients the kernel turned down on an
    earlier step was scored eagerly); it is then replaced.
    """
    state_ptrs = tuple(t.data_ptr() for t in (*exp_avgs, *exp_avg_sqs))
    if isinstance(plan, TritonPlan) and plan.state_ptrs == state_ptrs:
        return plan
    device = params[0].device
    blocks = [-(-p.numel() // BLOCK) for p in params]
    first = torch.tensor([0] + blocks, dtype=torch.int64).cumsum(0)  # (P + 1,)
    num_blocks = sum(blocks)
    block_tensor = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32),
                                           torch.tensor(blocks))  # (num_blocks,)
    rows = [[0] * len(params), [t.data_ptr() for t in exp_avgs], [t.data_ptr() for t in exp_avg_sqs]]
    return TritonPlan(state_ptrs, (), torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device),
                      block_tensor.to(device), first.to(device), _pointer_table(rows, device),
                      torch.empty(num_blocks, dtype=torch.float32, device=device))


def tensor_sums(score_fn: ScoreFn, plan: TritonPlan, grads: list[Tensor], beta1: float, beta2: float) -> Tensor:
    """``(P,)`` fp32 score sums of the would-be moments; the gradients must be contiguous.

    Args:
        score_fn: EPD or PFN (see ``supports``).
        plan: ``plan_for`` of the bucket.
        grads: the bucket's gradients, in the plan's order.
        beta1, beta2: the group's Adam betas.
    """
    grad_ptrs = tuple(g.data_ptr() for g in grads)
    if grad_ptrs != plan.grad_ptrs:  # the caching allocator often hands back the same blocks
        plan.ptrs[0].copy_(_pointer_table([list(grad_ptrs)], plan.ptrs.device)[0])
        plan.grad_ptrs = grad_ptrs
    block_kernel, reduce_kernel = _kernels()
    dtype = _triton_dtype(grads[0].dtype)
    num_blocks, num_tensors = plan.partials.numel(), plan.numels.numel()
    block_kernel[(num_blocks,)](plan.ptrs, plan.numels, plan.block_tensor, plan.first_block, plan.partials,
                                num_tensors, float(beta1), float(beta2), SCORE_EPS,
                                TERM=_TERM_CODES[score_fn.name], DTYPE=dtype, BLOCK=BLOCK)
    sums = torch.empty(num_tensors, dtype=torch.float32, device=plan.partials.device)
    reduce_kernel[(num_tensors,)](plan.partials, plan.first_block, sums, CHUNK=256)
    return sums


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@functools.lru_cache(maxsize=None)
def _kernels():
    """Define the two kernels on first use (``triton`` imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def block_kernel(ptrs, numels, block_tensor, first_block, partials, num_tensors, beta1, beta2, eps_s,
                     TERM: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = (pid - tl.load(first_block + t)) * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < tl.load(numels + t)
        g_ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        m_ptr = tl.load(ptrs + num_tensors + t).to(tl.pointer_type(DTYPE))
        v_ptr = tl.load(ptrs + 2 * num_tensors + t).to(tl.pointer_type(DTYPE))
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        new_m = m + (1.0 - beta1) * (g - m)
        new_v = beta2 * v + (1.0 - beta2) * g * g
        # The moments as the update stores them: rounded to the parameters' dtype, to nearest, ties to
        # even. bf16 by hand, because Triton's interpreter truncates fp32 -> bf16 casts (NaN stays NaN).
        if DTYPE == tl.bfloat16:
            m_bits = new_m.to(tl.uint32, bitcast=True)
            v_bits = new_v.to(tl.uint32, bitcast=True)
            m_round = ((m_bits + 0x7FFF + ((m_bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            v_round = ((v_bits + 0x7FFF + ((v_bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            new_m = tl.where(new_m == new_m, m_round, new_m)
            new_v = tl.where(new_v == new_v, v_round, new_v)
        elif DTYPE == tl.float16:
            new_m = new_m.to(tl.float16).to(tl.float32)
            new_v = new_v.to(tl.float16).to(tl.float32)
        denom = tl.sqrt(new_v) + eps_s
        if TERM == 0:  # EPD: m'^2 / (sqrt(v') + eps_s)
            term = new_m * new_m / denom
        else:  # PFN: (m' / (sqrt(v') + eps_s))^2
            ratio = new_m / denom
            term = ratio * ratio
        tl.store(partials + pid, tl.sum(tl.where(mask, term, 0.0), axis=0))

    @triton.jit
    def reduce_kernel(partials, first_block, sums, CHUNK: tl.constexpr):
        t = tl.program_id(0)
        lo = tl.load(first_block + t)
        hi = tl.load(first_block + t + 1)
        acc = tl.zeros((CHUNK,), dtype=tl.float32)
        for start in range(lo, hi, CHUNK):  # fixed order: deterministic
            offsets = start + tl.arange(0, CHUNK)
            acc += tl.load(partials + offsets, mask=offsets < hi, other=0.0)
        tl.store(sums + t, tl.sum(acc, axis=0))

    return block_kernel, reduce_kernel
