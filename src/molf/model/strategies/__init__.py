"""LoRA-strategy variants (DESIGN section 6): ``dense_lora``, ``mixture_lora``, ``moe_expert_lora``.

``validate_strategy`` checks a config without a model; ``apply_strategy`` injects the modules, freezes
everything but the first phase's groups and returns the ``StrategyRuntime`` the trainer drives.

Exports load lazily, so that ``molf.model.strategies.config`` imports without torch.
"""

from molf._lazy import lazy_exports

_EXPORTS = {
    "STRATEGY_MODES": "molf.model.strategies.structure",
    "LoRALinear": "molf.model.strategies.lora_linear",
    "MixtureLoRALinear": "molf.model.strategies.mixture",
    "MoEExpertFFN": "molf.model.strategies.moe_expert",
    "StrategyConfig": "molf.model.strategies.config",
    "StrategyLoRAConfig": "molf.model.strategies.config",
    "StrategyRuntime": "molf.model.strategies.runtime",
    "apply_strategy": "molf.model.strategies.api",
    "load_strategy_model": "molf.model.strategies.structure",
    "merge_strategy": "molf.model.strategies.structure",
    "rebuild_strategy_structure": "molf.model.strategies.structure",
    "validate_strategy": "molf.model.strategies.api",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
