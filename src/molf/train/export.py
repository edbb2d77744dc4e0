"""End of training: merge and unwrap to a vanilla HF checkpoint, save adapters, clean checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from torch import nn

FINAL_DIR = "final"
STAGING_DIR = "final.partial"  # where the final checkpoint is written before it is renamed to final/
ADAPTER_DIR = "adapter"


def _is_vanilla(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from molf.model.molf_linear import MoLFLinear

    return not any(isinstance(m, (MoLFLinear, BaseTunerLayer)) for m in model.modules())


def merged_model(model: nn.Module, cfg: Any, run_dir: Path, strategy_runtime: Optional[Any] = None) -> nn.Module:
    """The trained model as a vanilla transformers model (adapters saved on the way where the mode has them).

    ``mixture_lora`` and ``moe_expert_lora`` keep their routed modules (unless a handoff merged them
    away): their checkpoint reloads with ``load_final``.

    Raises:
        RuntimeError: if a wrapper survives the merge (a wrapped model is never saved as final).
    """
    from molf.model.peft_export import save_peft_adapter

    if cfg.mode in ("dense_lora", "molf_e"):  # PEFT format: MoLF-E's experts fold into one adapter per module
        # A phase plan may have trained (and since frozen) base weights the adapter does not hold.
        trained = strategy_runtime.ever_trainable_parameters() if strategy_runtime is not None else None
        save_peft_adapter(model, run_dir / ADAPTER_DIR, base_model_name_or_path=cfg.model_name_or_path,
                          trained=trained)
    if strategy_runtime is not None:
        model = strategy_runtime.export(model)
        if cfg.mode != "dense_lora":
            return model
    elif cfg.mode == "lora":
        from molf.model.lora_peft import save_adapter_and_merge

        model = save_adapter_and_merge(model, run_dir / ADAPTER_DIR)
    elif cfg.mode in ("molf", "molf_e"):
        from molf.model.wrap import merge_and_unwrap

        model = merge_and_unwrap(model)
    if not _is_vanilla(model):
        raise RuntimeError(f"merging the {cfg.mode} model left adapter wrappers in place; refusing to save it "
                           "as a vanilla checkpoint")
    return model


def save_final(model: nn.Module, tokenizer: Any, cfg: Any,
               strategy_runtime: Optional[Any] = None) -> tuple[Path, nn.Module]:
    """Merge, unwrap and save ``<run_dir>/final`` (``save_pretrained`` + tokenizer), written under
    ``final.partial`` and renamed when complete.

    Returns:
        The directory of the checkpoint and the merged model (ready to evaluate).
    """
    run_dir = Path(cfg.run_dir)
    model = merged_model(model, cfg, run_dir, strategy_runtime)
    model.config.use_cache = True
    final, staging = run_dir / FINAL_DIR, run_dir / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if strategy_runtime is not None and strategy_runtime.export_scales:
        from molf.model.strategies.structure import save_handoff_scales

        save_handoff_scales(staging, strategy_runtime.export_scales)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)  # final/ exists only once complete: a run killed while saving leaves none
    return final, model


def load_final(final: Path, cfg: Any) -> nn.Module:
    """Load a run's ``final`` checkpoint for evaluation.

    A vanilla checkpoint loads with ``AutoModelForCausalLM``; a routed strategy's (``mixture_lora``,
    ``moe_expert_lora``) with ``load_strategy_model``: its structure (and a handoff's export scales)
    rebuilt first, then loaded strictly (only a tied output head may be absent from the files).

    Raises:
        ValueError: the files do not match the rebuilt structure.
    """
    from transformers import AutoModelForCausalLM

    if cfg.mode not in ("mixture_lora", "moe_expert_lora"):
        return AutoModelForCausalLM.from_pretrained(final)
    from molf.model.strategies import load_strategy_model

    return load_strategy_model(final, cfg, cfg.mode)


def clean_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the intermediate ``checkpoint-*`` directories of a run; returns what was removed."""
    removed = sorted(p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir())
    for path in removed:
        shutil.rmtree(path)
    return removed
