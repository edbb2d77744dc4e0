"""``MoLFAdamW``: AdamW that routes each module's update to its top-K experts (DESIGN section 1).

Buckets (one per param group, device, dtype and expert/non-expert) are built once and cached; the
step never loops over modules in Python. Two implementations of the same rule:

Fused (the default where ``torch._fused_adamw_`` supports the parameters), two passes over memory:

1. scores  - a pre-pass reads ``g``, ``m``, ``v`` once and sums the score of the *would-be* moments
   per tensor (``molf.optim.prepass``: eager, compiled or Triton), scattered into ``(modules, experts)``;
2. select  - top-K per module on the device; the winner mask is copied to the host (the one sync);
3. update  - torch's fused AdamW kernel on the winners (their lr and weight decay) and on the losers
   with ``lr = weight_decay = 0`` (moments only; ``p - 0 * x`` leaves ``p`` unchanged), and on the
   non-expert parameters as plain AdamW. With ``topk`` >= experts this is bit-identical to
   ``torch.optim.AdamW(fused=True)``.

On the CPU with fp32 experts the fused path's expert buckets run natively (``molf.optim.native``,
the ``auto`` choice where a C compiler is available): pass 1 updates the moments, sums the scores and
writes the AdamW increment over the gradient; after the selection, pass 2 adds the increment to the
winners only. Same rule, same bit-identity with ``topk`` >= experts, five arrays read per element
instead of seven.

Foreach (``fused=False``): moments for every parameter, scores from the updated moments, selection,
then AdamW on the winners with the op sequence of ``torch.optim.AdamW(foreach=True)``, to which it
is bit-identical with ``topk`` >= experts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import compress
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from molf.model.molf_linear import MoLFLinear
from molf.model.wrap import molf_modules
from molf.optim import native, prepass
from molf.optim.scores import SCORE_EPS, get_score_fn, select_topk


@dataclass
class RoutingDecision:
    """The routing of one optimizer step, for the routing logger.

    ``scores`` and ``winners`` are ``(num_modules, num_experts)`` on the parameters' device; modules
    with fewer experts are padded with ``-inf`` scores and ``False`` winners.
    """

    scores: Tensor
    winners: Tensor
    module_names: list[str]
    expert_names: list[str]
    step: int


class _ExpertIndex:
    """Static expert bookkeeping: which (module, expert) cell each expert parameter belongs to."""

    def __init__(self, modules: Sequence[tuple[str, MoLFLinear]]) -> None:
        self.module_names = [name for name, _ in modules]
        per_module = [m.expert_names() for _, m in modules]
        self.expert_names = max(per_module, key=len) if per_module else []
        self.num_modules, self.num_experts = len(modules), len(self.expert_names)
        self.cell_of: dict[int, int] = {}  # id(param) -> m * E + e
        self.numel = torch.ones(self.num_modules * self.num_experts)
        self.valid = torch.zeros(self.num_modules * self.num_experts, dtype=torch.bool)
        self._modules = list(modules)  # for the names in error messages (``params_of``)
        for m_idx, (module_name, module) in enumerate(modules):
            for e_idx, params in enumerate(module.expert_params()):
                cell = m_idx * self.num_experts + e_idx
                self.numel[cell] = float(sum(p.numel() for p in params))
                self.valid[cell] = True
                for p in params:
                    if id(p) in self.cell_of:
                        other = self.module_names[self.cell_of[id(p)] // self.num_experts]
                        raise ValueError(f"{module_name} and {other} share an expert parameter (a tied weight); "
                                         "each expert must be its own: leave one of the modules unwrapped")
                    self.cell_of[id(p)] = cell
        # (M * E,) how many tensors each expert has (0 for padding cells).
        self.num_tensors = np.bincount(list(self.cell_of.values()), minlength=self.num_modules * self.num_experts)

    def params_of(self, cell: int) -> list[tuple[str, Tensor]]:
        """``(qualified name, parameter)`` of every tensor of the expert in ``cell``."""
        module_name, module = self._modules[cell // self.num_experts]
        local_names = {id(p): n for n, p in module.named_parameters()}
        return [(f"{module_name}.{local_names.get(id(p), '?')}", p)
                for p in module.expert_params()[cell % self.num_experts]]


@dataclass
class _Bucket:
    """Parameters of one param group on one device with one dtype, experts or plain, with their state."""

    group_index: int
    params: list[Tensor]
    states: list[dict]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    cells: np.ndarray | None  # (P,) expert cell per tensor; None for non-expert parameters
    cell_index: Tensor | None  # the same on the device, for index_add_
    steps: list[Tensor] | None = None  # fused path: the float32 step tensors of ``states``
    sqrts: list[Tensor] | None = None  # foreach path: sqrt(v) of this step, shared by scores and update
    plan: object | None = None  # the score plan of the bucket's backend (fused path; foreach in bf16/fp16)
    native: native.NativePlan | None = None  # native path (CPU fp32 experts): the kernels' work items
    increments: list[Tensor] | None = None  # native path: this step's AdamW increments (the gradients)

    def cell_index_on(self, device: torch.device) -> Tensor:
        if self.cell_index.device != device:
            self.cell_index = torch.as_tensor(self.cell_index, device=device)  # once: buckets are cached
        return self.cell_index

    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]


def fused_supported(params: Iterable[Tensor]) -> bool:
    """Whether ``torch._fused_adamw_`` supports every tensor of ``params`` (device type and dtype)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


class MoLFAdamW(Optimizer):
    """AdamW with Top-K optimizer routing among the experts of each ``MoLFLinear``.

    For every parameter with a gradient, at step ``t``::

        m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2          (all experts)
        EPD_e = lr_e(t) / N_e * sum_e m^2 / (sqrt(v) + 1e-8)               (or PFN, see scores.py)
        winners = top-K experts of each module (ties -> lower index, non-finite never wins)
        p <- p (1 - lr wd);  p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)   (winners only)

    Parameters outside ``MoLFLinear`` experts get the same AdamW update every step. ``lr`` and
    ``weight_decay`` are read from each param group at step time, so an LR scheduler's factor applies
    to the scores and the update alike. With ``topk`` >= the number of experts this is exactly
    ``torch.optim.AdamW(fused=True)`` (fused path) or ``torch.optim.AdamW(foreach=True)`` (foreach
    path), bit for bit. The two paths' scores agree to the last few bits (the fused path computes
    them from the would-be moments in its own pass), so a near-tie may route differently.

    Non-finite gradients: an expert whose gradient has an inf/NaN gets a non-finite score, so it
    cannot win that step and its weights are untouched; its moments and step count are then reset to
    zero (they would otherwise stay NaN forever) and ``nonfinite_resets`` counts the event. The other
    experts of the module are unaffected. Non-expert parameters follow ``torch.optim.AdamW``.

    Host syncs: exactly one per step (the winner mask and finiteness flags are copied to the host
    together), none per module.

    Gradients: on the native CPU path (``score_backend`` ``auto`` or ``native``), ``step()`` uses the
    expert parameters' ``.grad`` as scratch: afterwards it holds the AdamW increment, not the
    gradient. Read or clip gradients before ``step()`` (as the HF Trainer does) and zero them after.

    Args:
        params: parameters or param groups (e.g. from ``build_param_groups``); groups may carry
            ``names`` and ``kind`` and any AdamW scalar.
        modules: the model (its ``MoLFLinear`` modules are found) or ``molf_modules(model)``.
        lr, betas, eps, weight_decay: AdamW defaults for groups that do not set them.
        score_fn: registered score name (``true_projected`` = EPD, ``projected`` = PFN).
        topk: experts updated per module per step.
        fused: ``None`` picks the fused path when torch's fused AdamW supports every parameter's
            device and dtype, ``True`` requires it, ``False`` uses the foreach path.
        score_backend: how the fused path scores: ``auto`` (``native`` for CPU fp32 experts where a C
            compiler builds the kernels, else ``eager``), ``native``, ``eager``, ``compile``
            (``torch.compile``; compiles on the first step) or ``triton`` (CUDA only; opt-in until
            validated on GPU hardware).

    Raises:
        ValueError: for invalid hyper-parameters, an unknown score or backend, ``fused=True`` on
            unsupported parameters, or an expert whose parameters are missing from the param groups
            or split across groups.
    """

    def __init__(
        self,
        params: Iterable,
        modules: nn.Module | Sequence[tuple[str, MoLFLinear]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        score_fn: str = "true_projected",
        topk: int = 1,
        fused: bool | None = None,
        score_backend: str = "auto",
    ) -> None:
        if not (lr >= 0 and eps > 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"invalid MoLFAdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay} "
                             "(lr, wd >= 0; eps > 0, as 0 divides 0 by 0 where a gradient is zero; betas in [0, 1))")
        if topk < 1:
            raise ValueError(f"topk must be >= 1 (experts updated per module per step), got {topk}")
        if score_backend not in prepass.BACKENDS:
            raise ValueError(f"score_backend must be one of {prepass.BACKENDS}, got {score_backend!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, molf_step=0))
        supported = fused_supported(p for g in self.param_groups for p in g["params"])
        if fused and not supported:
            raise ValueError("fused=True: torch's fused AdamW does not support these parameters' device or dtype; "
                             "pass fused=None (automatic) or fused=False")
        self.fused = supported if fused is None else fused
        if not self.fused and score_backend != "auto":
            warnings.warn(f"score_backend={score_backend!r} is ignored: without the fused path the scores come "
                          "from the updated moments by foreach ops", stacklevel=2)
        self.score_backend = score_backend
        self.score_fn = get_score_fn(score_fn)
        self.topk = topk
        pairs = molf_modules(modules) if isinstance(modules, nn.Module) else list(modules)
        self._experts = _ExpertIndex(pairs)
        self._expert_groups = self._check_expert_groups()
        self._bucket_cache: dict[tuple, list[_Bucket]] = {}
        self._device_consts: dict[torch.device, tuple[Tensor, dict[int, Tensor]]] = {}
        # ids of a step's expert buckets -> the (M, E) experts to score, on the device (see ``_live``).
        self._live_cache: dict[tuple[int, ...], Tensor] = {}
        self.last_routing: RoutingDecision | None = None
        self.nonfinite_resets = 0

    @classmethod
    def from_config(cls, model: nn.Module, cfg, **kwargs) -> "MoLFAdamW":
        """Build the optimizer of ``model`` from an ``OptimConfig`` (or a ``TrainingConfig``).

        ``kwargs`` (``fused``, ``score_backend``) go to the constructor; ``score_backend`` defaults to
        ``cfg.molf_score_backend`` when the config has one.
        """
        from molf.optim.param_groups import build_param_groups

        kwargs.setdefault("score_backend", getattr(cfg, "molf_score_backend", "auto"))

        return cls(build_param_groups(model, cfg), model, lr=cfg.learning_rate,
                   betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                   weight_decay=cfg.weight_decay, score_fn=cfg.molf_score_fn, topk=cfg.molf_topk, **kwargs)

    @property
    def module_names(self) -> list[str]:
        return self._experts.module_names

    @property
    def expert_names(self) -> list[str]:
        return self._experts.expert_names

    def _check_expert_groups(self) -> np.ndarray:
        """Group index of every expert cell (-1 for padding); every expert lies wholly in one group.

        Raises:
            ValueError: if an expert's parameters are missing from the groups or split across groups.
        """
        cells = self._experts.cell_of
        expected = self._experts.num_tensors
        found = np.zeros_like(expected)
        groups = np.full(expected.shape, -1)
        split = np.zeros(expected.shape, dtype=bool)
        for gi, group in enumerate(self.param_groups):
            in_group = np.array([cells[id(p)] for p in group["params"] if id(p) in cells], dtype=np.int64)
            np.add.at(found, in_group, 1)
            split[in_group] |= groups[in_group] >= 0  # already seen in an earlier group
            groups[in_group] = gi
        bad = np.flatnonzero((found != expected) | split)
        if bad.size:
            name = self._experts.module_names[bad[0] // self._experts.num_experts]
            expert = self._experts.expert_names[bad[0] % self._experts.num_experts]
            if split[bad[0]]:
                raise ValueError(f"expert {expert} of {name} is split across param groups; every parameter of an "
                                 "expert must be in one group (build the groups with build_param_groups)")
            grouped = {id(p) for group in self.param_groups for p in group["params"]}
            absent = [f"{param_name} (requires_grad={p.requires_grad})"
                      for param_name, p in self._experts.params_of(bad[0]) if id(p) not in grouped]
            raise ValueError(f"expert {expert} of {name}: {', '.join(absent)} not in the optimizer; every parameter "
                             "of an expert must be trainable and given to the optimizer (a frozen expert "
                             "parameter is left out by build_param_groups)")
        return groups

    # ---- phase 1: gather ----

    def _gather(self) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            key = (gi, True) if len(params) == len(group["params"]) else (gi, tuple(map(id, params)))
            if key not in self._bucket_cache:
                self._bucket_cache[key] = self._build_buckets(gi, params)
            buckets.extend(self._bucket_cache[key])
        return buckets

    def _build_buckets(self, gi: int, params: list[Tensor]) -> list[_Bucket]:
        split: dict[tuple, list[Tensor]] = {}
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("MoLFAdamW does not support sparse gradients")
            is_expert = id(p) in self._experts.cell_of
            split.setdefault((p.device, p.dtype, is_expert), []).append(p)
        return [self._make_bucket(gi, ps, device, is_expert) for (device, _, is_expert), ps in split.items()]

    def _make_bucket(self, gi: int, params: list[Tensor], device: torch.device, is_expert: bool) -> _Bucket:
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=0.0, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                     exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        states = [self.state[p] for p in params]
        # Decided over all of the group's expert tensors of this device and dtype, not only those with a
        # gradient this step: a subset may pass where the whole does not, and the two would keep the step
        # count in two forms.
        use_native = is_expert and self.fused and self._native_bucket(
            [q for q in self.param_groups[gi]["params"]
             if q.device == device and q.dtype == params[0].dtype and id(q) in self._experts.cell_of], device)
        tensor_steps = self.fused and not use_native  # the native kernels take host numbers, like foreach
        for state, p in zip(states, params):  # the step's type follows the path (also after a load)
            state["step"] = _as_step(state["step"], p.device, tensor_steps)
        cells = np.array([self._experts.cell_of[id(p)] for p in params]) if is_expert else None
        cell_index = torch.as_tensor(cells, device=device) if is_expert else None
        steps = [s["step"] for s in states] if tensor_steps else None
        return _Bucket(gi, params, states, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       cells, cell_index, steps,
                       native=native.plan([p.numel() for p in params]) if use_native else None)

    def _native_bucket(self, params: list[Tensor], device: torch.device) -> bool:
        """Whether an expert bucket runs on the native kernels.

        Raises:
            ValueError: for ``score_backend='native'`` on tensors or a score the kernels do not handle.
        """
        if prepass.resolve_backend(self.score_backend, device) != "native":
            return False
        ok = native.supports(params) and self.score_fn.native_term is not None
        if not ok and self.score_backend == "native":
            raise ValueError("score_backend='native' needs contiguous fp32 CPU experts and a score with a native "
                             f"term (got {params[0].dtype}, score {self.score_fn.name!r}); use 'auto' or 'eager'")
        return ok

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` plus the ``nonfinite_resets`` count (an int)."""
        return {**super().state_dict(), "molf_nonfinite_resets": self.nonfinite_resets}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()`` (e.g. from an HF Trainer checkpoint), of either path."""
        super().load_state_dict(state_dict)
        self.nonfinite_resets = int(state_dict.get("molf_nonfinite_resets", 0))
        self._bucket_cache.clear()  # the cached buckets hold the replaced state tensors
        self._live_cache.clear()  # keyed by those buckets

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one routed AdamW step; returns the closure's loss when one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._gather()
        if not self.fused:
            for b in buckets:
                self._moments(b)
        for group in self.param_groups:
            group["molf_step"] += 1
        experts = [b for b in buckets if b.cells is not None]
        if not experts:  # nothing routed this step: no decision to log (not the previous step's)
            self.last_routing = None
        winners, bad = self._route(experts) if experts else (None, None)
        update = self._fused_update if self.fused else self._update
        for b in buckets:
            update(b, None if b.cells is None else winners[b.cells], None if b.cells is None else bad[b.cells])
        if bad is not None and bad.any():
            self._reset_nonfinite(experts, bad)
        return loss

    # ---- foreach path: moments ----

    def _moments(self, b: _Bucket) -> None:
        beta1, beta2 = self.param_groups[b.group_index]["betas"]
        grads = b.grads()
        torch._foreach_lerp_(b.exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(b.exp_avg_sqs, beta2)
        torch._foreach_addcmul_(b.exp_avg_sqs, grads, grads, 1 - beta2)
        for s in b.states:
            s["step"] += 1

    # ---- scores and selection ----

    def _consts(self, device: torch.device) -> tuple[Tensor, dict[int, Tensor]]:
        """``numel`` of each expert ``(M, E)`` and a 0/1 mask per param group, cached per device."""
        if device not in self._device_consts:
            shape = (self._experts.num_modules, self._experts.num_experts)
            masks = {int(g): torch.as_tensor((self._expert_groups == g).reshape(shape), dtype=torch.float32,
                                             device=device)
                     for g in np.unique(self._expert_groups) if g >= 0}
            self._device_consts[device] = (torch.as_tensor(self._experts.numel.view(shape), device=device), masks)
        return self._device_consts[device]

    def _tensor_sums(self, b: _Bucket) -> Tensor:
        """``(P,)`` fp32 score sums of the bucket's tensors, from this step's moments."""
        if b.native is not None:
            return self._native_pass(b)
        if not self.fused:  # the moments are already updated; sqrt(v) is kept for the update
            b.sqrts = torch._foreach_sqrt(b.exp_avg_sqs)
            if b.params[0].dtype == torch.float32:
                return self.score_fn.tensor_sums(b.exp_avgs, b.sqrts, SCORE_EPS)
            return prepass.moment_tensor_sums(self.score_fn, _eager_plan(b), b.exp_avgs, b.exp_avg_sqs)  # fp32 terms
        beta1, beta2 = self.param_groups[b.group_index]["betas"]
        backend = prepass.resolve_backend(self.score_backend, b.params[0].device)
        if backend == "triton":
            from molf.optim import triton_scores

            grads = b.grads()
            if triton_scores.supports(self.score_fn, b.params, grads):
                b.plan = triton_scores.plan_for(b.plan, b.params, b.exp_avgs, b.exp_avg_sqs)
                return triton_scores.tensor_sums(self.score_fn, b.plan, grads, beta1, beta2)
        if backend == "compile":  # ("native" lands below for the buckets the kernels do not take)
            return prepass.compiled_tensor_sums(self.score_fn, b.grads(), b.exp_avgs, b.exp_avg_sqs, beta1, beta2)
        return prepass.eager_tensor_sums(self.score_fn, _eager_plan(b), b.grads(), b.exp_avgs, b.exp_avg_sqs,
                                         beta1, beta2)

    def _native_pass(self, b: _Bucket) -> Tensor:
        """Native pass 1: moments, step counts, score sums, and the increments over the gradients."""
        group = self.param_groups[b.group_index]
        beta1, beta2 = group["betas"]
        for s in b.states:
            s["step"] += 1
        steps = np.fromiter((s["step"] for s in b.states), dtype=np.float64, count=len(b.states))
        b.increments = [g if g.is_contiguous() else g.contiguous() for g in b.grads()]
        return native.moments_scores(b.native, b.increments, b.exp_avgs, b.exp_avg_sqs, steps, group["lr"],
                                     beta1, beta2, group["eps"], SCORE_EPS, self.score_fn.native_term)

    def _route(self, buckets: list[_Bucket]) -> tuple[np.ndarray, np.ndarray]:
        """Score every expert, pick the winners and copy them to the host (the step's one sync).

        Returns:
            ``(M * E,)`` host bool arrays: the winners and the experts with a non-finite score.
        """
        device = buckets[0].params[0].device
        numel, group_masks = self._consts(device)
        sums = torch.zeros(numel.numel(), device=device)  # (M * E,)
        for b in buckets:
            tensor_sums = self._tensor_sums(b)  # (P,)
            if tensor_sums.device != device:  # a model spread over devices: gather the sums on the first
                tensor_sums = tensor_sums.to(device, non_blocking=True)
            cells = b.cell_index_on(device)
            sums.index_add_(0, cells, tensor_sums)
        lr = sum(mask * self.param_groups[g]["lr"] for g, mask in group_masks.items())  # (M, E)
        scores = self.score_fn.combine(sums.view(numel.shape), numel, lr)
        live = self._live(buckets, device)
        scores = torch.where(live, scores, torch.full_like(scores, float("-inf")))  # (M, E)
        winners = select_topk(scores, self.topk)
        self.last_routing = RoutingDecision(scores, winners, self.module_names, self.expert_names,
                                            self.param_groups[0]["molf_step"])
        # Non-finite: a live expert's score, or the sums of an expert scored out this step (a gradient on
        # only some of its tensors, one of them NaN/inf): its moments are reset and, on the fused pre-pass
        # path, its tensors are kept out of the lr = 0 kernel, where p - 0 * nan would write NaN into p.
        bad = (live & ~torch.isfinite(scores)) | ~torch.isfinite(sums.view(numel.shape))
        # The one host-device sync of the step: winners and non-finite flags travel together.
        host = torch.stack([winners, bad]).cpu().numpy().reshape(2, -1)
        return host[0], host[1]

    def _live(self, buckets: list[_Bucket], device: torch.device) -> Tensor:
        """``(M, E)`` bool: the experts to score this step. Padding cells and experts without a gradient on
        every tensor (a module the forward did not use) are not scored: a partial sum over N_e elements
        would understate the score. Which tensors have a gradient is the buckets' ``cells`` (host), so the
        mask is built on the host once per set of buckets and cached on the device."""
        key = tuple(map(id, buckets))  # the buckets live in _bucket_cache, so their ids are not reused
        if key not in self._live_cache:
            experts = self._experts
            graded = np.bincount(np.concatenate([b.cells for b in buckets]),
                                 minlength=experts.num_modules * experts.num_experts)
            live = experts.valid.numpy() & (graded == experts.num_tensors)
            self._live_cache[key] = torch.as_tensor(live.reshape(experts.num_modules, experts.num_experts),
                                                    device=device)
        return self._live_cache[key]

    def _reset_nonfinite(self, buckets: list[_Bucket], bad: np.ndarray) -> None:
        """Zero the moments and step of experts whose score is non-finite (see the class docstring)."""
        for b in buckets:
            hit = bad[b.cells]
            if hit.any():
                torch._foreach_zero_(list(compress(b.exp_avgs, hit)))
                torch._foreach_zero_(list(compress(b.exp_avg_sqs, hit)))
                for s in compress(b.states, hit):
                    if isinstance(s["step"], Tensor):
                        s["step"].zero_()
                    else:
                        s["step"] = 0.0
        self.nonfinite_resets += int(bad.sum())

    # ---- update ----

    def _update(self, b: _Bucket, mask: np.ndarray | None, bad: np.ndarray | None) -> None:
        """Foreach path: AdamW on the bucket's winners (all of it for non-expert buckets), as torch's
        foreach AdamW. Non-finite experts never win, so ``bad`` needs nothing here."""
        group = self.param_groups[b.group_index]
        params, exp_avgs, states = b.params, b.exp_avgs, b.states
        if mask is not None:
            params, exp_avgs, states = (list(compress(x, mask)) for x in (params, exp_avgs, states))
            sqrts, b.sqrts = list(compress(b.sqrts, mask)), None
            if not params:
                return
        else:
            sqrts = torch._foreach_sqrt(b.exp_avg_sqs)
        _adamw_apply(params, exp_avgs, sqrts, [s["step"] for s in states], group)

    def _fused_update(self, b: _Bucket, mask: np.ndarray | None, bad: np.ndarray | None) -> None:
        """Fused path: torch's fused AdamW kernel on the winners with the group's lr and weight decay,
        and on the losers with both zero (moments and step only). Experts with a non-finite score are
        left out (their state is reset afterwards): ``p - 0 * nan`` would not leave ``p`` unchanged."""
        group = self.param_groups[b.group_index]
        if b.native is not None:  # moments are done; add the increments to the winners
            native.apply(b.native, b.params, b.increments, mask, group["lr"], group["weight_decay"])
            b.increments = None
            return
        columns = (b.params, b.grads(), b.exp_avgs, b.exp_avg_sqs, b.steps)
        if mask is None:
            _fused_adamw(*columns, group, group["lr"], group["weight_decay"])
            return
        losers = ~mask & ~bad
        for select, lr, wd in ((mask, group["lr"], group["weight_decay"]), (losers, 0.0, 0.0)):
            if select.all():
                _fused_adamw(*columns, group, lr, wd)
            elif select.any():
                _fused_adamw(*(list(compress(c, select)) for c in columns), group, lr, wd)


def _eager_plan(b: _Bucket) -> prepass.EagerPlan:
    """The bucket's batching plan for the eager score sums, built on first use (buckets are cached)."""
    if not isinstance(b.plan, prepass.EagerPlan):
        b.plan = prepass.eager_plan([p.numel() for p in b.params], b.params[0].device)
    return b.plan


def _as_step(step: float | Tensor, device: torch.device, fused: bool) -> float | Tensor:
    """A step count in the form of the path: a float32 tensor on the parameter's device (fused, as
    torch's fused AdamW keeps it) or a Python float (foreach)."""
    if not fused:
        return float(step)
    if isinstance(step, Tensor):
        return step.to(device=device, dtype=torch.float32)
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _fused_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 steps: list[Tensor], group: dict, lr: float, weight_decay: float) -> None:
    """``step += 1`` then one fused AdamW kernel, as ``torch.optim.AdamW(fused=True)`` does per device."""
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=group["eps"], amsgrad=False, maximize=False,
                        grad_scale=None, found_inf=None)


def _adamw_apply(params: list[Tensor], exp_avgs: list[Tensor], denom: list[Tensor], steps: list[float],
                 group: dict) -> None:
    """Decoupled weight decay and the bias-corrected Adam step; ``denom`` holds ``sqrt(v)`` and is
    overwritten. The op sequence (and so every rounding) is that of torch's ``_multi_tensor_adam``.
    """
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    bias_correction1 = [1 - beta1 ** s for s in steps]
    bias_correction2 = [1 - beta2 ** s for s in steps]
    step_size = [(lr / bc) * -1 for bc in bias_correction1]
    bias_correction2_sqrt = [bc ** 0.5 for bc in bias_correction2]
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
