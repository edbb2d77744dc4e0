"""Loading a saved checkpoint for evaluation and recovering its run columns.

The run columns come from ``resolved_config.yaml`` in the checkpoint directory or one of its two
parents (a run directory holds ``final/`` and ``checkpoint-N/``). Without that file the row gets
``run_name`` = the checkpoint's directory name (its parent's when the directory is ``final`` or
``checkpoint-N``), ``model`` = the checkpoint path, ``dataset`` = the task, ``mode`` = ``unknown``
and empty hyperparameter columns.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from molf.eval.results import EVALUATOR_COLUMNS, RUN_COLUMNS

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "resolved_config.yaml"
VENDORED_TOKENIZER = Path(__file__).resolve().parents[3] / "assets" / "tokenizer" / "qwen2.5"
_STEP_DIR = re.compile(r"^(final|checkpoint-\d+)$")


def find_resolved_config(checkpoint: Path) -> Optional[Path]:
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        candidate = directory / RESOLVED_CONFIG
        if candidate.is_file():
            return candidate
    return None


def load_training_config(path: Path):
    """The run's ``TrainingConfig`` parsed from its resolved YAML."""
    import draccus

    from molf.config import TrainingConfig

    return draccus.parse(TrainingConfig, config_path=str(path), args=[])


def fallback_run_info(checkpoint: Path, task: str) -> dict[str, Any]:
    name_dir = checkpoint.parent if _STEP_DIR.match(checkpoint.name) else checkpoint
    info: dict[str, Any] = {column: None for column in RUN_COLUMNS if column not in EVALUATOR_COLUMNS}
    info.update(run_name=name_dir.name, mode="unknown", model=str(checkpoint), dataset=task, checkpoint=str(checkpoint))
    return info


def run_info_for(model_ref: str, task: str, training_config=None) -> dict[str, Any]:
    """Run columns for a checkpoint path or tiny model name, from its training config when known."""
    if training_config is not None:
        resolved = find_resolved_config(Path(model_ref))
        world_size = 1 if resolved is None else trained_world_size(training_config, resolved.parent.name)
        info = dict(training_config.to_run_info(world_size))
        info["checkpoint"] = model_ref
        return info
    return fallback_run_info(Path(model_ref), task)


def trained_world_size(training_config, run_dir_name: str) -> int:
    """How many processes trained the run in directory ``run_dir_name``: the ``N`` of its ``bs8x4xN``
    when the config's name for ``N`` processes is that name, else 1 (a renamed directory)."""
    match = re.search(r"_bs\d+x\d+x(\d+)_", run_dir_name)
    world_size = int(match.group(1)) if match else 1
    return world_size if training_config.run_name_for(world_size) == run_dir_name else 1


def check_checkpoint(model_ref: str) -> Path:
    """The checkpoint directory ``model_ref`` names (not a ``tiny-*`` name).

    Raises:
        FileNotFoundError: there is no such directory, or it holds no saved model.
    """
    path = Path(model_ref)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} not found; pass a saved model directory or tiny-<family>")
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        hint = f"; for a run directory pass {path / 'final'}" if (path / "final").is_dir() else ""
        raise FileNotFoundError(f"{path} holds no saved model (no config.json or adapter_config.json){hint}")
    return path


def load_model_and_tokenizer(model_ref: str, tokenizer_ref: Optional[str], dtype: torch.dtype, device: str):
    """A causal LM (a full checkpoint, a PEFT adapter directory, or a ``tiny-*`` name) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molf.model.tiny import build_tiny_model, is_tiny_name

    if is_tiny_name(model_ref):
        model = build_tiny_model(model_ref, dtype=dtype)
        tokenizer_ref = tokenizer_ref or str(VENDORED_TOKENIZER)
    else:
        path = check_checkpoint(model_ref)
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_ref or model_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer
