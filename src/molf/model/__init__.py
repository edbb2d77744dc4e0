"""molf.model: the MoLF expert module and the wrapping of a transformers model."""

from molf.model.config import LoRAConfig, MoLFConfig
from molf.model.molf_linear import MoLFLinear
from molf.model.wrap import freeze_outside_molf, merge_and_unwrap, molf_modules, wrap_model_with_molf

__all__ = ["LoRAConfig", "MoLFConfig", "MoLFLinear", "freeze_outside_molf", "merge_and_unwrap", "molf_modules",
           "wrap_model_with_molf"]
