"""Inject a strategy's structure, rebuild it on a fresh model to load a checkpoint, merge dense LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from molf.model.strategies.dense import inject_attn_lora, inject_dense_lora, scoped_blocks
from molf.model.strategies.fused_lora import ExpertsLoRADelta
from molf.model.strategies.lora_linear import LoRALinear
from molf.model.strategies.mixture import inject_mixture_lora
from molf.model.strategies.moe_expert import inject_moe_expert_lora
from molf.model.strategies.runtime import merge_dense, unwrap_faded
from molf.train.handoff import parse_handoff

STRATEGY_MODES = ("dense_lora", "mixture_lora", "moe_expert_lora")


def check_mode(mode: str) -> None:
    """Raises ValueError unless ``mode`` is a strategy mode."""
    if mode not in STRATEGY_MODES:
        raise ValueError(f"mode {mode!r} is not a LoRA strategy; choose one of {list(STRATEGY_MODES)}")


def inject_strategy(model: nn.Module, cfg, mode: str) -> int:
    """Insert the modules of ``mode`` into ``model`` (no freezing); return the number of wrapped modules.

    Raises:
        ValueError: an unknown mode, or targets missing from the model.
    """
    check_mode(mode)
    if mode == "dense_lora":
        return inject_dense_lora(model, cfg)
    if mode == "mixture_lora":
        count = inject_mixture_lora(model, cfg)
    else:
        count = inject_moe_expert_lora(model, cfg)
    return count + inject_attn_lora(scoped_blocks(model, cfg), cfg)


# Written next to an exported handoff checkpoint: the LoRA scale of each fade target when it was saved.
HANDOFF_SCALES_FILE = "handoff_lora_scales.json"


def save_handoff_scales(folder: str | Path, scales: dict[str, float]) -> None:
    """Record the LoRA scale of each fade target at export (``StrategyRuntime.export_scales``)."""
    (Path(folder) / HANDOFF_SCALES_FILE).write_text(json.dumps({"lora_scales": scales}, indent=2) + "\n")


def read_handoff_scales(folder: str | Path) -> dict[str, float] | None:
    """The scales ``save_handoff_scales`` wrote into ``folder``, or None (no handoff, or an older export)."""
    path = Path(folder) / HANDOFF_SCALES_FILE
    return json.loads(path.read_text())["lora_scales"] if path.is_file() else None


def rebuild_strategy_structure(model: nn.Module, cfg, mode: str, exported: bool = True,
                               lora_scales: dict[str, float] | None = None) -> nn.Module:
    """Re-create on a fresh base model the structure a strategy checkpoint was saved with.

    Then ``model.load_state_dict(saved)`` restores the trained routers and experts.

    Args:
        model: the base model, freshly loaded.
        cfg: the run's config (``resolved_config.yaml``): strategy and LoRA fields.
        mode: the strategy mode of the run.
        exported: True for a checkpoint written after ``StrategyRuntime.export`` (dense LoRA is then a
            plain model and nothing changes; a handoff's export is replayed: adapters whose fade ends at
            0 are removed when ``remove_zero_scale``, else merged when ``merge``; kept adapters get their
            scale at export); False for the training structure (mid-run checkpoints: fade scales are
            runtime state, restored by ``StrategyRuntime.on_step_begin(model, step)``).
        lora_scales: each fade target's scale at export (``read_handoff_scales`` of the checkpoint);
            a target missing from it gets its fade's ``end_scale``.

    Returns:
        ``model``, modified in place.
    """
    check_mode(mode)
    if mode == "dense_lora" and exported:
        return model
    inject_strategy(model, cfg, mode)
    handoff = parse_handoff(cfg.handoff) if exported and cfg.handoff is not None else None
    for fade in handoff.fades if handoff else ():
        _set_scale(model, fade.target, (lora_scales or {}).get(fade.target, fade.end_scale))
        unwrap_faded(model, fade.target, handoff.export.remove_zero_scale, handoff.export.merge)
    return model


def _set_scale(model: nn.Module, role: str, scale: float) -> None:
    for module in model.modules():
        if isinstance(module, (LoRALinear, ExpertsLoRADelta)) and module.role == role:
            module.lora_scale = scale


def merge_strategy(model: nn.Module) -> nn.Module:
    """Merge dense LoRA adapters into their base weights, leaving a plain transformers model.

    Raises:
        ValueError: for mixture/MoE structures, which cannot become a plain model.
    """
    merge_dense(model)
    return model


def load_strategy_model(checkpoint_dir: str | Path, cfg, mode: str, exported: bool = True,
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a strategy checkpoint written by ``save_pretrained`` for evaluation.

    Builds the base architecture from the checkpoint's ``config.json``, re-creates the strategy structure
    (``rebuild_strategy_structure``) and loads ``model.safetensors`` (or a sharded index) strictly, apart
    from weights the model ties (e.g. ``lm_head`` tied to the embeddings), which are re-tied.

    Args:
        checkpoint_dir: directory holding ``config.json`` and the weights.
        cfg: the run's config (strategy and LoRA fields).
        mode: the strategy mode.
        exported: see ``rebuild_strategy_structure``.
        dtype: dtype of the built model.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: no weights in ``checkpoint_dir``.
        ValueError: the weights do not match the rebuilt structure (wrong config or mode).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(checkpoint_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    rebuild_strategy_structure(model, cfg, mode, exported, read_handoff_scales(folder) if exported else None)
    mismatch = (f"{folder} does not match the {mode} structure of this config; load it with the run's "
                "resolved_config.yaml (and exported=False for mid-run checkpoints)")
    try:
        result = model.load_state_dict(_read_weights(folder), strict=False)
    except RuntimeError as err:  # shape mismatches, e.g. another num_experts
        raise ValueError(f"{mismatch}: {str(err).splitlines()[1].strip()}") from err
    tied = set(model.state_dict()) - set(dict(model.named_parameters())) - set(dict(model.named_buffers()))
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(f"{mismatch}: missing {sorted(missing)[:3]}, unexpected {sorted(result.unexpected_keys)[:3]}")
    model.tie_weights()
    return model.eval()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    return state
