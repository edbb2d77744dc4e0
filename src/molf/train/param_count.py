"""Parameter counts per bucket: base weight, base bias, LoRA experts / adapters, routers, other
(``--preflight``, count_params)."""

from __future__ import annotations

from typing import Optional

from torch import nn

BUCKETS = ("base_weight", "base_bias", "lora_experts", "router", "other")


def _lora_params(model: nn.Module) -> set[int]:
    """ids of LoRA parameters: MoLF experts, the strategy variants' adapters and peft LoRA layers'."""
    from molf.model.molf_linear import MoLFLinear
    from molf.model.strategies.fused_lora import ExpertsLoRADelta
    from molf.model.strategies.lora_linear import LoRALinear
    from molf.model.strategies.mixture import MixtureLoRALinear

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, MoLFLinear):
            ids.update(id(p) for p in [*module.lora_A, *module.lora_B])
        elif isinstance(module, (LoRALinear, MixtureLoRALinear, ExpertsLoRADelta)):
            ids.update(id(p) for p in module.lora_parameters())
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return ids
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapters in (module.lora_A, module.lora_B):
                ids.update(id(p) for p in adapters.parameters())
    return ids


def _base_params(model: nn.Module, lora: set[int]) -> tuple[set[int], set[int]]:
    """ids of the weights and biases of linears (wrapped or not) that are neither LoRA adapters nor
    embeddings (an output head tied to the input embedding counts as an embedding: "other")."""
    from molf.model.molf_linear import MoLFLinear

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights, biases = set(), set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, MoLFLinear)) and id(module.weight) not in lora | embeddings:
            weights.add(id(module.weight))
            if module.bias is not None:
                biases.add(id(module.bias))
    return weights, biases


def _router_params(model: nn.Module) -> set[int]:
    """ids of the strategy variants' router weights."""
    from molf.model.strategies.routing import TopKRouter

    return {id(p) for module in model.modules() if isinstance(module, TopKRouter) for p in module.parameters()}


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{bucket: {"total": n, "trainable": n}}`` for every bucket plus ``all``; tied parameters count once."""
    lora, routers = _lora_params(model), _router_params(model)
    weights, biases = _base_params(model, lora)
    counts = {b: {"total": 0, "trainable": 0} for b in (*BUCKETS, "all")}
    for p in model.parameters():  # deduplicated by nn.Module
        pid = id(p)
        bucket = "lora_experts" if pid in lora else "router" if pid in routers else "base_weight" if pid in weights \
            else "base_bias" if pid in biases else "other"
        for key in (bucket, "all"):
            counts[key]["total"] += p.numel()
            counts[key]["trainable"] += p.numel() if p.requires_grad else 0
    return counts


def format_counts(counts: dict[str, dict[str, int]], before: Optional[dict[str, dict[str, int]]] = None) -> str:
    """A plain-text table; with ``before`` (the unmodified model) also what the mode adds."""
    lines = [f"{'bucket':<14}{'total':>16}{'trainable':>16}"]
    for bucket in (*BUCKETS, "all"):
        lines.append(f"{bucket:<14}{counts[bucket]['total']:>16,}{counts[bucket]['trainable']:>16,}")
    if before is not None:
        added = counts["all"]["total"] - before["all"]["total"]
        share = 100.0 * added / max(before["all"]["total"], 1)
        trainable = 100.0 * counts["all"]["trainable"] / max(counts["all"]["total"], 1)
        lines.append(f"added by the mode: {added:,} parameters ({share:.2f}% of the base model); "
                     f"trainable: {trainable:.2f}% of all")
    return "\n".join(lines)
