"""Turn a model's linears into ``MoLFLinear`` experts and back.

``wrap_model_with_molf`` replaces every target ``nn.Linear`` in place; the wrapped model's state-dict
keys are the original ones (``<module>.weight``, ``<module>.bias``) plus ``<module>.lora_A.<i>`` and
``<module>.lora_B.<i>`` for each LoRA expert ``i``. ``merge_and_unwrap`` merges the LoRA deltas in
fp32 and puts the original modules back, so the result is a vanilla model with its original names.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from molf.model.config import LoRAConfig
from molf.model.molf_linear import MoLFLinear


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_target_linears(model: nn.Module, targets: list[str] | None, exclude: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules to wrap: suffix match on ``targets`` (all linears when None),
    minus suffix matches on ``exclude``.

    Raises:
        ValueError: if nothing matches.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if (targets is None or _matches(n, targets)) and not _matches(n, exclude)]
    if not chosen:
        sample = ", ".join(linears[:8]) or "none"
        raise ValueError(
            f"no linear matches molf_target_modules={targets} (excluding {exclude}); "
            f"the model's linears include: {sample}. Pass module-name suffixes such as q_proj,v_proj")
    return chosen


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_model_with_molf(model: nn.Module, cfg: Any) -> list[str]:
    """Replace the target linears of ``model`` by ``MoLFLinear`` in place.

    Args:
        model: any ``nn.Module`` (linears may sit under any parent, ModuleList indices included).
        cfg: an object with the ``MoLFConfig`` and ``LoRAConfig`` fields (``molf_lora_ranks``,
            ``molf_fft``, ``molf_freeze_non_linear``, ``molf_target_modules``, ``molf_exclude_modules``,
            ``lora_alpha`` (default 32 per expert), ``lora_dropout``, ``use_rslora``), e.g. a
            ``molf.config.TrainingConfig``.

    Returns:
        The names of the wrapped modules, in model order.

    Raises:
        ValueError: if no linear matches, or a target's weight is tied to another module (exclude it).
    """
    names = select_target_linears(model, cfg.molf_target_modules, list(cfg.molf_exclude_modules))
    tied = _shared_weights(model)
    ranks = [int(r) for r in cfg.molf_lora_ranks]
    alphas = [LoRAConfig.molf_expert_alpha(cfg)] * len(ranks)
    for name in names:
        base = model.get_submodule(name)
        if id(base.weight) in tied:
            raise ValueError(f"{name}.weight is tied to another parameter (e.g. tied embeddings); "
                             f"add {name.rsplit('.', 1)[-1]!r} to molf_exclude_modules")
        wrapped = MoLFLinear(base, ranks, alphas, use_rslora=cfg.use_rslora, dropout=cfg.lora_dropout,
                             freeze_base=not cfg.molf_fft)
        _set_submodule(model, name, wrapped)
    if cfg.molf_freeze_non_linear:
        freeze_outside_molf(model)
    return names


def freeze_outside_molf(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter that is not inside a ``MoLFLinear``."""
    inside = {id(p) for _, m in molf_modules(model) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)


def molf_modules(model: nn.Module) -> list[tuple[str, MoLFLinear]]:
    """``(name, module)`` of every ``MoLFLinear`` in ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoLFLinear)]


def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """Merge every ``MoLFLinear``'s LoRA experts into its weight (fp32) and restore the original linears.

    All merges are computed before any module is touched, so a non-finite merge leaves the model
    unchanged.

    Returns:
        ``model`` itself, now with its original modules and parameter names.

    Raises:
        ValueError: if a merge yields non-finite weights, or the model has no ``MoLFLinear``.
    """
    modules = molf_modules(model)
    if not modules:
        raise ValueError("merge_and_unwrap: the model has no MoLFLinear (was it wrapped with wrap_model_with_molf?)")
    merged = [m.merged_weight() for _, m in modules]
    for (name, module), weight in zip(modules, merged):
        _set_submodule(model, name, module.unwrap(weight))
    return model
