"""End of training: merge and unwrap to a vanilla HF checkpoint, save adapters, clean checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

FINAL_DIR = "final"
ADAPTER_DIR = "adapter"


def _is_vanilla(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from molf.model.molf_linear import MoLFLinear

    return not any(isinstance(m, (MoLFLinear, BaseTunerLayer)) for m in model.modules())


def merged_model(model: nn.Module, cfg: Any, run_dir: Path) -> nn.Module:
    """The trained model as a vanilla transformers model (adapters saved on the way where the mode has them).

    Raises:
        RuntimeError: if a wrapper survives the merge (a wrapped model is never saved as final).
    """
    if cfg.mode == "lora":
        from molf.model.lora_peft import save_adapter_and_merge

        model = save_adapter_and_merge(model, run_dir / ADAPTER_DIR)
    elif cfg.mode in ("molf", "molf_e"):
        if cfg.mode == "molf_e":
            _save_molf_e_adapter(model, cfg, run_dir / ADAPTER_DIR)
        from molf.model.wrap import merge_and_unwrap

        model = merge_and_unwrap(model)
    if not _is_vanilla(model):
        raise RuntimeError(f"merging the {cfg.mode} model left adapter wrappers in place; refusing to save it "
                           "as a vanilla checkpoint")
    return model


def _save_molf_e_adapter(model: nn.Module, cfg: Any, adapter_dir: Path) -> None:
    """PEFT-format adapter of a MoLF-E model (its LoRA experts folded into one adapter per module)."""
    from molf.model.peft_export import save_peft_adapter

    save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model_name_or_path)


def save_final(model: nn.Module, tokenizer: Any, cfg: Any) -> Path:
    """Merge, unwrap and save ``<run_dir>/final`` (``save_pretrained`` + tokenizer).

    Returns:
        The directory of the vanilla checkpoint.
    """
    run_dir = Path(cfg.run_dir)
    model = merged_model(model, cfg, run_dir)
    model.config.use_cache = True
    final = run_dir / FINAL_DIR
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    return final


def clean_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the intermediate ``checkpoint-*`` directories of a run; returns what was removed."""
    removed = sorted(p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir())
    for path in removed:
        shutil.rmtree(path)
    return removed
