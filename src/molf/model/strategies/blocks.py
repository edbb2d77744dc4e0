"""Find the transformer blocks, their MLPs and attention modules in Qwen2/3, Llama, Gemma3, Mixtral models.

Discovery is structural: the decoder stack is the first ``nn.ModuleList`` whose every item has an MLP
child (``mlp``, ``block_sparse_moe`` or ``feed_forward``) and an attention child (``self_attn``,
``attention`` or ``attn``). No family names are hard-coded, so other decoder-only models usually work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

MLP_ATTRS = ("mlp", "block_sparse_moe", "feed_forward")
ATTN_ATTRS = ("self_attn", "attention", "attn")
# Mixtral's original per-expert naming (w1 = gate, w3 = up, w2 = down) maps onto the usual target names.
TARGET_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass
class Block:
    """One decoder block: its index in the stack and dotted names of its MLP and attention."""

    index: int
    name: str
    module: nn.Module
    mlp_name: str
    attn_name: str

    @property
    def mlp(self) -> nn.Module:
        return getattr(self.module, self.mlp_name.rpartition(".")[2])

    @property
    def attn(self) -> nn.Module:
        return getattr(self.module, self.attn_name.rpartition(".")[2])


def _child_name(module: nn.Module, candidates: Iterable[str]) -> str | None:
    return next((c for c in candidates if isinstance(getattr(module, c, None), nn.Module)), None)


def find_blocks(model: nn.Module) -> list[Block]:
    """Return the decoder blocks of ``model`` in order.

    Args:
        model: a transformers causal LM (or its base model).

    Returns:
        One ``Block`` per decoder layer.

    Raises:
        ValueError: if no stack of blocks with an MLP and an attention child exists.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        layers = list(module)
        mlps = [_child_name(layer, MLP_ATTRS) for layer in layers]
        attns = [_child_name(layer, ATTN_ATTRS) for layer in layers]
        if all(mlps) and all(attns):
            return [Block(i, f"{name}.{i}", layer, f"{name}.{i}.{m}", f"{name}.{i}.{a}")
                    for i, (layer, m, a) in enumerate(zip(layers, mlps, attns))]
    raise ValueError(f"could not find the decoder blocks of {type(model).__name__}: expected an nn.ModuleList of "
                     f"layers each with an MLP ({'/'.join(MLP_ATTRS)}) and attention ({'/'.join(ATTN_ATTRS)}) child")


def select_blocks(blocks: list[Block], start_layer: int, num_layers: int) -> list[Block]:
    """Blocks ``[start_layer, start_layer + num_layers)``; ``num_layers`` 0 means every block from ``start_layer``.

    Raises:
        ValueError: if ``start_layer`` is past the last block.
    """
    if start_layer >= len(blocks):
        raise ValueError(f"start_layer={start_layer} but the model has {len(blocks)} blocks; "
                         f"use a start_layer below {len(blocks)}")
    end = len(blocks) if num_layers == 0 else min(len(blocks), start_layer + num_layers)
    return blocks[start_layer:end]


def target_linears(module: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """``(relative name, linear)`` for every ``nn.Linear`` under ``module`` whose last name part is a target.

    Mixtral's ``w1/w3/w2`` count as ``gate_proj/up_proj/down_proj``.
    """
    wanted = set(targets)
    found = []
    for name, child in module.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(child, nn.Linear) and (leaf in wanted or TARGET_ALIASES.get(leaf) in wanted):
            found.append((name, child))
    return found


def fused_expert_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules under ``module`` that store experts as 3-D tensors (transformers 5 Mixtral ``MixtralExperts``)."""
    return [(name, child) for name, child in module.named_modules()
            if isinstance(getattr(child, "gate_up_proj", None), nn.Parameter)
            and getattr(child, "gate_up_proj").dim() == 3]
