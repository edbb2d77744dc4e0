"""``StrategyRuntime``: phases, handoff scales, router losses and LR multipliers during training."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from molf.model.strategies.fused_lora import ExpertsLoRADelta, fused_base_parameters, merge_fused_expert_lora
from molf.model.strategies.lora_linear import LoRALinear, merge_lora_linears, replace_module
from molf.model.strategies.mixture import MixtureLoRALinear
from molf.model.strategies.moe_expert import MoEExpertFFN
from molf.model.strategies.routing import TopKRouter
from molf.train.handoff import Handoff, milestones, parse_handoff, summary_line
from molf.train.phases import TRAINABLE_KINDS, describe_phases, parse_phases, phase_index_at

logger = logging.getLogger(__name__)


def _add(groups: dict[str, dict[int, nn.Parameter]], kind: str, params) -> None:
    for p in params:
        groups[kind].setdefault(id(p), p)


def collect_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of each trainable group (``router``, ``lora``, ``attn_lora``, ``base_ffn``), by module type.

    Args:
        model: a model the strategy was injected into.

    Returns:
        Kind -> parameters (each parameter in one group); parameters in no group never train.
    """
    groups: dict[str, dict[int, nn.Parameter]] = {kind: {} for kind in TRAINABLE_KINDS}
    for module in model.modules():
        if isinstance(module, TopKRouter):
            _add(groups, "router", module.parameters())
        elif isinstance(module, MixtureLoRALinear):
            _add(groups, "lora", module.lora_parameters())
            _add(groups, "base_ffn", module.base.parameters())
        elif isinstance(module, ExpertsLoRADelta):
            _add(groups, "lora", module.lora_parameters())
        elif isinstance(module, LoRALinear):
            _add(groups, "lora" if module.role == "ffn" else "attn_lora", module.lora_parameters())
            if module.role == "ffn":
                _add(groups, "base_ffn", module.base.parameters())
    _add(groups, "base_ffn", fused_base_parameters(model))
    for module in model.modules():
        if isinstance(module, MoEExpertFFN):
            taken = {id(p) for kind in ("lora", "attn_lora") for p in groups[kind].values()}
            _add(groups, "base_ffn", (p for p in module.experts.parameters() if id(p) not in taken))
    return {kind: list(params.values()) for kind, params in groups.items()}


class StrategyRuntime:
    """Applies the phase plan and the handoff while training, and supplies the router losses.

    The trainer calls ``on_step_begin(model, step)`` before every optimizer step (``step`` = optimizer
    steps done so far) and rebuilds its optimizer over ``trainable_parameters()`` when it returns True;
    adds ``extra_loss(model)[0]`` to every micro-batch loss; multiplies the LR of each param group of
    kind ``k`` by ``lr_multipliers(step).get(k, 1)``; logs ``log_items(step)``.

    Args:
        model: the model after injection.
        cfg: a config with ``StrategyConfig`` fields (already validated).
        mode: ``dense_lora``, ``mixture_lora`` or ``moe_expert_lora``.
    """

    def __init__(self, model: nn.Module, cfg, mode: str) -> None:
        self.mode = mode
        self.phases = parse_phases(cfg.phases, mode, cfg.attn_lora)
        self.handoff: Optional[Handoff] = parse_handoff(cfg.handoff) if cfg.handoff is not None else None
        self.router_z_loss_coef = cfg.router_z_loss_coef
        self.router_aux_loss_coef = cfg.router_aux_loss_coef
        self.groups = collect_groups(model)
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self._faded = {"ffn": [], "attn": []}
        self.export_scales: dict[str, float] = {}  # set by export() with a handoff
        for m in model.modules():
            if isinstance(m, (LoRALinear, ExpertsLoRADelta)):
                self._faded[m.role].append(m)
        self._events = milestones(self.handoff, self.phases)
        self.active: frozenset[str] = frozenset()
        self._set_trainable(model, self.trainable_kinds_at(0))
        self._apply_scales(0)

    def trainable_kinds_at(self, step: int) -> frozenset[str]:
        """Groups training at ``step``: the phase's, less those a handoff fade has frozen."""
        kinds = set(self.phases[phase_index_at(self.phases, step)].trainable)
        if self.handoff is not None:
            kinds -= self.handoff.frozen_kinds_at(step)
        return frozenset(kinds)

    def _set_trainable(self, model: nn.Module, kinds: frozenset[str]) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for kind in kinds:
            for p in self.groups[kind]:
                p.requires_grad_(True)
        self.active = kinds

    def _apply_scales(self, step: int) -> None:
        for fade in self.handoff.fades if self.handoff else ():
            scale = fade.scale_at(step)
            for module in self._faded[fade.target]:
                module.lora_scale = scale

    def on_step_begin(self, model: nn.Module, step: int) -> bool:
        """Apply the phase and handoff state of optimizer step ``step``.

        Args:
            model: the trained model.
            step: optimizer steps completed so far.

        Returns:
            True when the trainable set changed: rebuild the optimizer over ``trainable_parameters()``.
        """
        self._apply_scales(step)
        for event in self.events_at(step):
            logger.info("step %d: %s", step, event)
        kinds = self.trainable_kinds_at(step)
        if kinds == self.active:
            return False
        self._set_trainable(model, kinds)
        return True

    def events_at(self, step: int) -> list[str]:
        """Milestones (phase boundaries, fade and ramp edges) that happen at ``step``."""
        return [text for s, text in self._events if s == step]

    def ever_trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of every group some phase trains (an earlier phase's included, whatever trains now)."""
        kinds = {kind for phase in self.phases for kind in phase.trainable}
        return [p for kind in TRAINABLE_KINDS if kind in kinds for p in self.groups[kind]]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the groups training now (the optimizer's parameters)."""
        return [p for kind in TRAINABLE_KINDS if kind in self.active for p in self.groups[kind]]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Currently trainable parameters by kind, to build one optimizer param group per kind."""
        return {kind: list(self.groups[kind]) for kind in TRAINABLE_KINDS if kind in self.active and self.groups[kind]}

    def set_token_mask(self, attention_mask: Optional[torch.Tensor]) -> None:
        """Make the router losses of this batch's forward (and of its recomputation under gradient
        checkpointing) skip padding: ``attention_mask`` (B, S) of the batch, or None to count every token."""
        mask = None if attention_mask is None else attention_mask.reshape(-1).float()  # (T,), once per batch
        for r in self.routers:
            r.token_mask = mask

    def extra_loss(self, model: nn.Module) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """Weighted router losses of the latest training forward, averaged over routers.

        Args:
            model: the trained model (its routers were found at construction).

        Returns:
            ``(router_z_loss_coef * z + router_aux_loss_coef * aux, {"router_z_loss": z, "router_aux_loss":
            aux})`` with the unweighted values detached for logging (tensors, so that reading them
            costs no host sync per micro-batch), or ``(None, {})`` without routers or forward.
        """
        pairs = [r.last_losses for r in self.routers if r.last_losses is not None]
        for r in self.routers:
            r.last_losses = None
        if not pairs:
            return None, {}
        z = torch.stack([zl for zl, _ in pairs]).mean()
        aux = torch.stack([al for _, al in pairs]).mean()
        total = self.router_z_loss_coef * z + self.router_aux_loss_coef * aux
        return total, {"router_z_loss": z.detach(), "router_aux_loss": aux.detach()}

    def lr_multipliers(self, step: int) -> dict[str, float]:
        """LR multiplier per param-group kind at ``step`` (``base_ffn`` during the handoff ramp)."""
        if self.handoff is None or self.handoff.lr_ramp is None:
            return {}
        return {"base_ffn": self.handoff.lr_ramp.multiplier_at(step)}

    def log_items(self, step: int) -> dict[str, float]:
        """Phase index, current fade scales and LR multipliers, for the log line of ``step``."""
        items: dict[str, float] = {"strategy_phase": float(phase_index_at(self.phases, step))}
        for fade in self.handoff.fades if self.handoff else ():
            items[f"handoff_{fade.target}_lora_scale"] = fade.scale_at(step)
        items.update({f"{kind}_lr_multiplier": m for kind, m in self.lr_multipliers(step).items()})
        return items

    def summary(self) -> str:
        """One line: the mode, the phase plan and the handoff schedule."""
        line = f"{self.mode}: {describe_phases(self.phases)}"
        return line + (f"; {summary_line(self.handoff)}" if self.handoff else "")

    def parameter_counts(self) -> dict[str, int]:
        """Elements per group, plus ``trainable`` (now) — what ``--preflight`` prints."""
        counts = {kind: sum(p.numel() for p in params) for kind, params in self.groups.items()}
        counts["trainable"] = sum(p.numel() for p in self.trainable_parameters())
        return counts

    def export(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` for saving.

        ``dense_lora`` merges every adapter (a plain transformers model results); ``moe_expert_lora`` with a
        handoff removes adapters whose scale is 0 (``remove_zero_scale``) and merges the rest when
        ``merge`` is set; routed structures otherwise stay (reload with ``rebuild_strategy_structure``).

        Returns:
            The model to save (the same object, modified in place).
        """
        if self.mode == "dense_lora":
            merge_dense(model)
        elif self.handoff is not None:
            # The scale each target trained with last (its fade's end_scale only if the fade ended
            # before the last step); saved with the checkpoint so a reload rebuilds the same model.
            self.export_scales = {fade.target: float(self._faded[fade.target][0].lora_scale)
                                  for fade in self.handoff.fades if self._faded[fade.target]}
            for fade in self.handoff.fades:
                unwrap_faded(model, fade.target, self.handoff.export.remove_zero_scale, self.handoff.export.merge)
        return model


def unwrap_faded(model: nn.Module, role: str, remove_zero_scale: bool, merge: bool) -> int:
    """Replace the ``LoRALinear`` of ``role``: by the bare base at scale 0 (if asked), else merged (if asked).

    Returns:
        How many adapters were removed or merged.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.role == role]
    count = 0
    for name in names:
        module = model.get_submodule(name)
        if remove_zero_scale and module.lora_scale == 0.0:
            replace_module(model, name, module.base)
        elif merge:
            replace_module(model, name, module.merge())
        else:
            continue
        count += 1
    return count


def merge_dense(model: nn.Module) -> int:
    """Merge every ``LoRALinear`` and fused-expert adapter into its weights; return how many.

    Raises:
        ValueError: if the model holds routed modules (mixture/MoE), which have no plain-model equivalent.
    """
    routed = [type(m).__name__ for m in model.modules() if isinstance(m, (MixtureLoRALinear, MoEExpertFFN))]
    if routed:
        raise ValueError(f"cannot merge {routed[0]} into a plain model (the routing depends on the token); "
                         "save it as is and reload it with rebuild_strategy_structure")
    return merge_lora_linears(model) + merge_fused_expert_lora(model)
