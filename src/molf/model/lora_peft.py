"""``--mode lora``: LoRA adapters via peft on every linear except the output head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from molf.model.dropout import LoRADropout


def lora_config(cfg: Any):
    """peft ``LoraConfig`` from the run's ``LoRAConfig`` fields.

    ``lora_alpha`` is ``cfg.alpha_for_rank(lora_rank)``: the given alpha, or the reference's
    heuristic (``round(scale * sqrt(r))`` with rsLoRA) that keeps the effective scale fixed.
    """
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha_for_rank(cfg.lora_rank),
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules="all-linear",
        bias="none",
    )


def apply_lora(model: nn.Module, cfg: Any):
    """Freeze ``model`` and add peft LoRA adapters to its linears.

    Args:
        model: a transformers causal LM.
        cfg: an object with the ``LoRAConfig`` fields (e.g. a ``TrainingConfig``).

    Returns:
        The ``PeftModel`` (only the adapters are trainable). Its dropout modules are
        ``LoRADropout`` (same ``p``; the fast counter-based mask on fp32 CPU tensors), so every mode
        drops its LoRA inputs the same way.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(cfg))
    use_lora_dropout(peft_model)
    return peft_model


def use_lora_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` inside peft's ``lora_dropout`` containers by a ``LoRADropout``
    with the same ``p``; returns how many were replaced."""
    count = 0
    for module in model.modules():
        container = getattr(module, "lora_dropout", None)
        if isinstance(container, nn.ModuleDict):
            for name, dropout in list(container.items()):
                if type(dropout) is nn.Dropout:
                    container[name] = LoRADropout(dropout.p)
                    count += 1
    return count


def save_adapter_and_merge(peft_model: Any, adapter_dir: Path) -> nn.Module:
    """Save the adapter in PEFT format, then merge it into the base weights.

    Args:
        peft_model: the trained ``PeftModel``.
        adapter_dir: where ``adapter_config.json`` and ``adapter_model.safetensors`` go.

    Returns:
        The base model with the LoRA deltas merged and the peft layers removed.
    """
    peft_model.save_pretrained(str(adapter_dir))
    return peft_model.merge_and_unload(safe_merge=True)
