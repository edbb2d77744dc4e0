"""molf.model: the MoLF expert module and the wrapping of a transformers model.

Exports load lazily: importing a config module stays cheap (no torch)."""

from molf._lazy import lazy_exports

_EXPORTS = {
    "LoRAConfig": "molf.model.config",
    "MoLFConfig": "molf.model.config",
    "MoLFLinear": "molf.model.molf_linear",
    "freeze_outside_molf": "molf.model.wrap",
    "merge_and_unwrap": "molf.model.wrap",
    "molf_modules": "molf.model.wrap",
    "wrap_model_with_molf": "molf.model.wrap",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
