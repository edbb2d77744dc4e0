"""Save adapters in the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

Works for a peft ``lora`` model (``save_pretrained``), ``dense_lora`` (``LoRALinear``) and MoLF-E
(``MoLFLinear`` with a frozen base). Every adapter's scaling is folded into ``lora_B`` and the config
says ``lora_alpha = r``, ``use_rslora = false``, so peft's own scaling is 1 and

    peft.PeftModel.from_pretrained(base_model, out_dir)

reproduces the trained model's logits. MoLF-E's experts ``(A_i, B_i, s_i)`` become one adapter of rank
``sum r_i``: ``A = [A_1; A_2]``, ``B = [s_1 B_1, s_2 B_2]``, so ``B A = sum_i s_i B_i A_i``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from molf.model.molf_linear import MoLFLinear
from molf.model.strategies.fused_lora import ExpertsLoRADelta
from molf.model.strategies.lora_linear import LoRALinear
from molf.model.strategies.mixture import MixtureLoRALinear
from molf.model.strategies.moe_expert import MoEExpertFFN

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _adapter_of(name: str, module: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(A (R, in), B (out, R))`` with the scaling folded into B, fp32; None if not an adapter module."""
    if isinstance(module, LoRALinear):
        return module.lora_A.detach().float(), module.lora_B.detach().float() * module.effective_scaling()
    if isinstance(module, MoLFLinear):
        if module.has_fft_expert:
            raise ValueError(f"{name} has an FFT expert (mode molf): its weight changes cannot be a PEFT adapter; "
                             "save the merged model instead (PEFT export is for lora, dense_lora and molf_e)")
        a = torch.cat([p.detach().float() for p in module.lora_A], dim=0)  # (sum r_i, in)
        b = torch.cat([p.detach().float() * s for p, s in zip(module.lora_B, module.scaling)], dim=1)  # (out, sum r_i)
        return a, b
    if isinstance(module, (MixtureLoRALinear, MoEExpertFFN, ExpertsLoRADelta)):
        raise ValueError(f"{name} is a {type(module).__name__}, which has no PEFT LoRA equivalent; "
                         "PEFT export supports lora, dense_lora on nn.Linear targets, and molf_e")
    return None


def collect_adapters(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> ``(lora_A, lora_B)`` (scaling folded into B) for every adapter of ``model``.

    Raises:
        ValueError: for modules with no PEFT equivalent (MoLF with FFT, mixture, MoE, fused experts) or
            when the model has no adapter at all.
    """
    adapters = {}
    for name, module in model.named_modules():
        pair = _adapter_of(name, module)
        if pair is not None:
            adapters[name] = pair
    if not adapters:
        raise ValueError("the model has no LoRALinear or MoLFLinear adapters to export; "
                         "PEFT export runs before merging (StrategyRuntime.export / merge_and_unwrap)")
    return adapters


def _warn_untracked_training(model: nn.Module, adapters: dict, trained: Optional[Iterable[nn.Parameter]]) -> None:
    adapter_params = set()
    for name in adapters:
        module = model.get_submodule(name)
        adapter_params |= {id(p) for p in (module.lora_A, module.lora_B)} if isinstance(module, LoRALinear) \
            else {id(p) for p in [*module.lora_A, *module.lora_B]}
    trained_ids = {id(p) for p in trained} if trained is not None else \
        {id(p) for p in model.parameters() if p.requires_grad}
    outside = [n for n, p in model.named_parameters() if id(p) in trained_ids and id(p) not in adapter_params]
    if outside:
        warnings.warn(f"{len(outside)} parameters outside the adapters (e.g. {outside[0]}) trained in this run and "
                      "are not in the PEFT adapter; the adapter reproduces the model only if they are still at their "
                      "base values (the merged final/ model holds everything)",
                      stacklevel=3)


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: Optional[str] = None,
                      trained: Optional[Iterable[nn.Parameter]] = None) -> Path:
    """Write ``model``'s adapters as a PEFT LoRA adapter into ``out_dir``.

    Args:
        model: a ``peft.PeftModel`` (saved with ``save_pretrained``) or a model holding ``LoRALinear`` /
            MoLF-E ``MoLFLinear`` modules (unmerged).
        out_dir: directory to create.
        base_model_name_or_path: recorded in ``adapter_config.json`` (defaults to the model config's
            ``_name_or_path``).
        trained: every parameter that trained at some point of the run (default: those with
            ``requires_grad`` now); any outside the adapters gets a warning, as the adapter does not
            hold them.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: the model has no exportable adapter (see ``collect_adapters``).
    """
    from peft import LoraConfig, PeftModel
    from safetensors.torch import save_file

    out = Path(out_dir)
    if isinstance(model, PeftModel):
        model.save_pretrained(out)
        return out
    adapters = collect_adapters(model)
    _warn_untracked_training(model, adapters, trained)
    ranks = {name: a.shape[0] for name, (a, _) in adapters.items()}
    r = max(ranks.values(), key=list(ranks.values()).count)
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    tensors = {}  # fp32: peft keeps adapters in fp32 by default, and the folded scaling should not round
    for name, (a, b) in adapters.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    base_name = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    config = LoraConfig(r=r, lora_alpha=r, use_rslora=False, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(adapters), rank_pattern=pattern,
                        alpha_pattern={name: rank for name, rank in pattern.items()},
                        base_model_name_or_path=base_name)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return out
