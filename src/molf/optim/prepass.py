"""Score pre-pass of the fused ``MoLFAdamW`` path: per-tensor score sums from the *would-be* moments.

The fused path scores every expert before touching any state, from

    m' = b1 m + (1 - b1) g          v' = b2 v + (1 - b2) g^2

without writing ``m'`` or ``v'`` (the fused AdamW kernel recomputes and stores them afterwards), so
each element of ``g``, ``m`` and ``v`` is read once here and once by the update. Backends:

- ``eager``: multi-tensor (``torch._foreach_*``) ops over batches of flat views of at most
  ``CHUNK`` elements, so the temporaries are bounded whatever the model size;
- ``compile``: one ``torch.compile(dynamic=True)`` reduction per tensor (compiled once for all
  shapes; opt-in, the first call compiles for tens of seconds);
- ``triton``: one deterministic Triton launch per bucket on CUDA (``molf.optim.triton_scores``).

Every backend forms the moments as torch's fused AdamW update stores them (fp32 math, one rounding
to the parameters' dtype) and computes the score terms in fp32.

The ``native`` backend (CPU, fp32) is not a pre-pass: its kernel updates the moments while it scores
and leaves the AdamW increment for the winners' update (``molf.optim.native``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from molf.optim.scores import SCORE_EPS, ScoreFn

BACKENDS = ("auto", "eager", "compile", "triton", "native")
CHUNK = 1 << 20  # elements per eager batch: bounds the temporaries (4 x 4 MiB in fp32)


@dataclass(frozen=True)
class _Piece:
    """A flat element range ``[start, stop)`` of tensor ``index`` of a bucket."""

    index: int
    start: int
    stop: int


@dataclass
class EagerPlan:
    """How a bucket's tensors are cut into bounded batches; built once per bucket.

    ``batches`` lists the pieces of every batch; ``owners`` ``(num_pieces,)`` is the tensor index of
    every piece in batch order, for the ``index_add_`` that sums the pieces of one tensor.
    """

    batches: list[list[_Piece]]
    owners: Tensor
    num_tensors: int


def eager_plan(numels: list[int], device: torch.device, chunk: int = CHUNK) -> EagerPlan:
    """Cut tensors of ``numels`` elements into pieces of at most ``chunk`` and pack them into batches."""
    batches: list[list[_Piece]] = [[]]
    filled = 0
    for index, numel in enumerate(numels):
        for start in range(0, numel, chunk):
            stop = min(numel, start + chunk)
            if filled + stop - start > chunk and batches[-1]:
                batches.append([])
                filled = 0
            batches[-1].append(_Piece(index, start, stop))
            filled += stop - start
    owners = torch.tensor([p.index for batch in batches for p in batch], dtype=torch.int64, device=device)
    return EagerPlan(batches, owners, len(numels))


def _flat(t: Tensor, piece: _Piece, whole: bool) -> Tensor:
    if whole:
        return t
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
    return flat[piece.start:piece.stop]


def _fp32_sums(score_fn: ScoreFn, ms: list[Tensor], vs: list[Tensor], owned: bool) -> Tensor:
    """``score_fn.tensor_sums`` of ``m`` and ``sqrt(v)``, computed in fp32 whatever the moments' dtype
    (``eps_s`` = 1e-8 underflows to 0 in fp16). ``owned``: ``vs`` may be overwritten."""
    if ms[0].dtype != torch.float32:
        ms, vs, owned = [m.float() for m in ms], [v.float() for v in vs], True
    if owned:
        torch._foreach_sqrt_(vs)
    else:
        vs = torch._foreach_sqrt(vs)
    return score_fn.tensor_sums(ms, vs, SCORE_EPS)


def _plan_sums(plan: EagerPlan, columns: Sequence[list[Tensor]], piece_sums: Callable[..., Tensor]) -> Tensor:
    """Per-tensor sums of ``piece_sums`` applied batch by batch to the plan's pieces of ``columns``."""
    sums = []
    for batch in plan.batches:
        pieces = []
        for tensors in columns:
            pieces.append([_flat(tensors[p.index], p, p.start == 0 and p.stop == tensors[p.index].numel())
                           for p in batch])
        sums.append(piece_sums(*pieces))
    total = torch.zeros(plan.num_tensors, dtype=torch.float32, device=plan.owners.device)
    return total.index_add_(0, plan.owners, torch.cat(sums))


def eager_tensor_sums(score_fn: ScoreFn, plan: EagerPlan, grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], beta1: float, beta2: float) -> Tensor:
    """Per-tensor score sums of the would-be moments, batch by batch.

    The moments are formed in the parameters' dtype, as the update will store them; the score terms
    are computed in fp32.

    Args:
        score_fn: the routing score; its ``tensor_sums`` is applied to ``m'`` and ``sqrt(v')``.
        plan: ``eager_plan`` of the tensors' element counts.
        grads, exp_avgs, exp_avg_sqs: the bucket's gradients and (not yet updated) moments.
        beta1, beta2: the group's Adam betas.

    Returns:
        ``(P,)`` fp32 sums, one per tensor.
    """
    def piece_sums(gs: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> Tensor:
        new_m = torch._foreach_lerp(ms, gs, 1 - beta1)  # same formula as the moment update
        if gs[0].dtype == torch.float32:
            new_v = torch._foreach_mul(vs, beta2)
            torch._foreach_addcmul_(new_v, gs, gs, 1 - beta2)
        else:  # formed in fp32 and rounded once, as torch's fused AdamW stores it (two foreach ops round twice)
            g32 = [g.float() for g in gs]
            new_v = torch._foreach_mul([v.float() for v in vs], beta2)
            torch._foreach_addcmul_(new_v, g32, g32, 1 - beta2)
            new_v = [v.to(gs[0].dtype) for v in new_v]
        return _fp32_sums(score_fn, new_m, new_v, owned=True)

    return _plan_sums(plan, (grads, exp_avgs, exp_avg_sqs), piece_sums)


def moment_tensor_sums(score_fn: ScoreFn, plan: EagerPlan, exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> Tensor:
    """Per-tensor score sums of already updated moments in a low-precision dtype, in fp32 batch by
    batch (so the fp32 copies stay bounded)."""
    return _plan_sums(plan, (exp_avgs, exp_avg_sqs), lambda ms, vs: _fp32_sums(score_fn, ms, vs, owned=False))


@functools.lru_cache(maxsize=None)
def _compiled_sum(score_fn: ScoreFn):
    """One compiled reduction per score function; ``dynamic=True`` so every shape shares it."""

    def tensor_sum(g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float) -> Tensor:
        # The moments as stored: torch's lerp and fused AdamW formulas in fp32, rounded once to the
        # moments' dtype; then fp32 score math.
        m32, g32, weight = m.float(), g.float(), 1 - beta1
        new_m = m32 + weight * (g32 - m32) if weight < 0.5 else g32 - (g32 - m32) * (1 - weight)
        new_m = new_m.to(m.dtype).float()
        sqrt_v = torch.sqrt((v.float() * beta2 + (1 - beta2) * g32 * g32).to(v.dtype).float())
        if score_fn.term is None:
            return score_fn.tensor_sums([new_m], [sqrt_v], SCORE_EPS)
        return score_fn.term(new_m, sqrt_v, SCORE_EPS).sum(dtype=torch.float32).view(1)

    # emulate_precision_casts: inductor would otherwise skip the roundings to the moments' dtype (the
    # math above is fp32, so there is nothing else for it to round).
    return torch.compile(tensor_sum, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def compiled_tensor_sums(score_fn: ScoreFn, grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], beta1: float, beta2: float) -> Tensor:
    """``eager_tensor_sums`` with one compiled single-pass reduction per tensor (no temporaries)."""
    fn = _compiled_sum(score_fn)
    return torch.cat([fn(g.reshape(-1), m.reshape(-1), v.reshape(-1), beta1, beta2)
                      for g, m, v in zip(grads, exp_avgs, exp_avg_sqs)])


def resolve_backend(backend: str, device: torch.device) -> str:
    """The score backend to run on ``device``: ``auto`` is ``native`` on the CPU where the native
    kernels build, else ``eager``.

    The Triton kernel is opt-in until it has been validated on GPU hardware (it is tested in Triton's
    interpreter on CPU and by the ``gpu``-marked tests).

    Raises:
        ValueError: for ``triton`` off CUDA or without the ``triton`` package, and for ``native`` off
            the CPU or where its kernels cannot be built (the message says why).
    """
    from molf.optim import native

    if backend == "auto":
        return "native" if device.type == "cpu" and native.available() else "eager"
    if backend == "native" and device.type != "cpu":
        raise ValueError(f"score_backend='native' runs on the CPU only (got {device}); use 'auto' or 'eager'")
    if backend == "native" and not native.available():
        raise ValueError(f"score_backend='native' is unavailable: {native.unavailable_reason()}; "
                         "use score_backend='auto' or 'eager'")
    if backend == "triton" and not (device.type == "cuda" and triton_available()):
        raise ValueError(f"score_backend='triton' needs CUDA parameters and the triton package (got {device}); "
                         "use score_backend='auto' or 'eager'")
    return backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (it is not a dependency of molf)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
