"""Declarative param groups: each trainable parameter goes to the first rule that claims it.

Groups carry the parameters, their names, a ``kind`` string and AdamW scalars only (no tensors in
metadata), so ``state_dict()`` / ``load_state_dict()`` and HF ``Trainer`` checkpoints round-trip.

Default kinds: ``fft`` (the FFT experts of ``MoLFLinear``: ``learning_rate``, ``weight_decay``),
``lora`` (the LoRA experts: ``lora_learning_rate``, ``lora_weight_decay``), ``other`` (every other
trainable matrix: ``learning_rate``, ``weight_decay``) and ``other_no_decay`` (biases and norm
weights outside experts, i.e. tensors with fewer than two dimensions: ``learning_rate``, no decay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from molf.model.molf_linear import FFT, LORA
from molf.model.wrap import molf_modules


@dataclass(frozen=True)
class ParamInfo:
    """What a rule sees of a parameter: its name, the tensor and its expert kind (None outside experts)."""

    name: str
    param: nn.Parameter
    expert_kind: Optional[str]


@dataclass(frozen=True)
class GroupRule:
    """A param group: ``kind``, which parameters it claims, and the config fields of its lr and wd.

    ``wd_field`` None means no weight decay.
    """

    kind: str
    claims: Callable[[ParamInfo], bool]
    lr_field: str
    wd_field: Optional[str]


DEFAULT_RULES: tuple[GroupRule, ...] = (
    GroupRule(FFT, lambda info: info.expert_kind == FFT, "learning_rate", "weight_decay"),
    GroupRule(LORA, lambda info: info.expert_kind == LORA, "lora_learning_rate", "lora_weight_decay"),
    GroupRule("other_no_decay", lambda info: info.expert_kind is None and info.param.ndim < 2, "learning_rate", None),
    GroupRule("other", lambda info: info.expert_kind is None, "learning_rate", "weight_decay"),
)


def expert_kinds_by_param(model: nn.Module) -> dict[int, str]:
    """``id(param) -> "fft" | "lora"`` for every expert parameter of the model's ``MoLFLinear``."""
    kinds: dict[int, str] = {}
    for _, module in molf_modules(model):
        for kind, params in zip(module.expert_kinds(), module.expert_params()):
            kinds.update((id(p), kind) for p in params)
    return kinds


def build_param_groups(model: nn.Module, cfg: Any, rules: Optional[Sequence[GroupRule]] = None) -> list[dict]:
    """Param groups of ``model``'s trainable parameters for ``MoLFAdamW`` or ``torch.optim.AdamW``.

    Args:
        model: a model, wrapped with ``wrap_model_with_molf`` or not (then only ``other*`` groups).
        cfg: an ``OptimConfig`` (or any object with the fields the rules name, e.g. ``TrainingConfig``).
        rules: custom rules; a custom rule that claims nothing raises. The default rules drop empty
            groups silently (e.g. ``fft`` in MoLF-E).

    Returns:
        Dicts with ``params``, ``names``, ``kind``, ``lr`` and ``weight_decay``, in rule order.

    Raises:
        ValueError: if the model has no trainable parameter, a custom rule claims nothing, or a
            trainable parameter is claimed by no rule.
    """
    custom = rules is not None
    rules = tuple(rules) if custom else DEFAULT_RULES
    kinds = expert_kinds_by_param(model)
    claimed: list[list[tuple[str, nn.Parameter]]] = [[] for _ in rules]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        info = ParamInfo(name, p, kinds.get(id(p)))
        index = next((i for i, rule in enumerate(rules) if rule.claims(info)), None)
        if index is None:
            raise ValueError(f"parameter {name} matches no param-group rule; add a rule for it or freeze it")
        claimed[index].append((name, p))
    if not any(claimed):
        raise ValueError("the model has no trainable parameter (requires_grad=True); nothing to optimize")
    groups = []
    for rule, members in zip(rules, claimed):
        if not members:
            if custom:
                raise ValueError(f"param-group rule {rule.kind!r} matches no trainable parameter; remove the rule")
            continue
        groups.append(dict(
            params=[p for _, p in members], names=[n for n, _ in members], kind=rule.kind,
            lr=float(getattr(cfg, rule.lr_field)),
            weight_decay=float(getattr(cfg, rule.wd_field)) if rule.wd_field else 0.0))
    return groups
